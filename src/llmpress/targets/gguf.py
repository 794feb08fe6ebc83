"""The ``gguf`` export: one ``.gguf`` file that llama.cpp (and what is built on it) runs.

Quantized layers whose stored form is one of llama.cpp's legacy block types (groups of 32
consecutive weights, float16 parameters, a grid of the ``_0`` or ``_1`` form: see
:mod:`.gguf_blocks`; ``quantize --grid gguf:q4_0`` etc. choose codes on exactly these) or one of
its K-quants (``--grid gguf:q2_k`` .. ``gguf:q6_k``, :mod:`llmpress.quant.kquant`) are
written as those blocks, byte for byte what llmpress stored: llama.cpp's dequantization equals
llmpress's decode bit for bit (:func:`llmpress.targets.gguf_verify.verify` checks it).

Every other tensor is kept: 1-D tensors (norms, biases) in F32, 2-D ones (embeddings, an
untied head, all linears of an original model) in ``type`` — ``f32`` by default, which holds
the values exactly; ``f16``/``bf16`` round them; ``q8_0``/``q4_0``/``q4_1``/``q5_0``/``q5_1``
**re-quantize** them with gguf-py's quantizer (llama.cpp's reference rounding). A 2-D tensor
whose rows are not a multiple of 32 cannot take a block type and is written in F16 instead.

Layers that do not transfer exactly take the export's fallback: ``dense`` writes the decoded
weight in F32 (``dtype=float16``: F16), ``requantize`` re-quantizes the decoded weight to the
nearest block type (same bits, the grid's form; 2–3 bits go to 4, 6 to 8).

Architecture metadata and tensor names come from :mod:`.gguf_arch` (a table per
``model_type``), the tokenizer from :mod:`.gguf_vocab`.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import Tensor

from ..errors import InputError
from ..tensor import CompressedTensor
from . import ExportSource, Target, register_target
from .gguf_arch import Arch, arch_of, sliding_window
from .gguf_blocks import BLOCK, pack_blocks, why_not_blocks
from .gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

TYPES: dict[str, T] = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0,
                       "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}
FILE_TYPES: dict[T, gguf.LlamaFileType] = {
    T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16, T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    # one K type throughout: llama.cpp's nearest file types (its _S mixes are mostly that type)
    T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
    T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, T.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}
DENSE_DTYPES: dict[str, T] = {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16}
# requantize fallback: (bits, grid has an offset or zero point) → the nearest block type
_NEAREST = {(2, False): T.Q4_0, (3, False): T.Q4_0, (4, False): T.Q4_0, (5, False): T.Q5_0,
            (6, False): T.Q8_0, (8, False): T.Q8_0, (2, True): T.Q4_1, (3, True): T.Q4_1,
            (4, True): T.Q4_1, (5, True): T.Q5_1, (6, True): T.Q8_0, (8, True): T.Q8_0}


def parse_type(name: str | None) -> T:
    if name is None:
        return T.F32
    try:
        return TYPES[name.lower()]
    except KeyError:
        raise InputError(f"unknown GGUF tensor type {name!r}; known: {', '.join(TYPES)}") from None


def nearest_type(ct: CompressedTensor) -> T:
    """The block type closest to a layer's own quantization, for the ``requantize`` fallback."""
    bits = int(ct.meta.get("bits", 8))
    offset = any(k in ct.data for k in ("offset", "zero"))
    return _NEAREST.get((bits, offset), T.Q8_0)


def encode_float(t: Tensor, qtype: T) -> tuple[np.ndarray, T]:
    """A float tensor in ``qtype`` through gguf-py (F32 exact; others rounded or re-quantized);
    rows not a multiple of the block size fall back to F16."""
    a = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == T.F32:
        return a, T.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if a.ndim < 2 or a.shape[-1] % block:
        qtype = T.F16 if a.ndim >= 2 else T.F32
        if qtype == T.F32:
            return a, T.F32
    return gguf.quants.quantize(a, qtype), qtype


def tensor_plan(src: ExportSource, arch: Arch) -> list[tuple[str, list[str]]]:
    """(GGUF name, its checkpoint names) of every tensor llama.cpp reads, globals first, then by
    block; one name each, except a mixture of experts' stacked tensors (their experts in order)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in src.names():
        g = arch.gguf_name(name)
        if g is not None:
            e = arch.expert_of(name)
            groups.setdefault(g, []).append((-1 if e is None else e, name))
    dup = [g for g, parts in groups.items() if len(parts) > 1 and any(e < 0 for e, _ in parts)]
    if dup:
        raise InputError(f"tensors map to the same GGUF name: {', '.join(dup)}")
    for g, parts in groups.items():
        experts = sorted(e for e, _ in parts)
        if experts[0] >= 0 and experts != list(range(len(experts))):
            raise InputError(f"{g}: experts {experts} are not 0..{len(experts) - 1}")

    def key(g: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", g)
        return (int(m.group(1)) if m else -1, g)

    return [(g, [n for _, n in sorted(groups[g])]) for g in sorted(groups, key=key)]


# tensors llama.cpp's converter always writes in F32 (MoE routers)
_ALWAYS_F32 = re.compile(r"\.ffn_gate_inp(_shexp)?\.weight$")


def _permuted(t: Tensor, perm: Tensor | None) -> Tensor:
    return t if perm is None else t[perm]


def add_metadata(w: gguf.GGUFWriter, src: ExportSource, arch: Arch, quantized: bool) -> dict[str, Any]:
    """The key-value metadata every export writes (the file type aside): type, hyperparameters,
    tokenizer; returns the tokenizer's summary. (``gguf_size`` sizes a file by the same calls.)"""
    cfg = src.config
    w.add_type(gguf.GGUFType.MODEL)
    if quantized:
        w.add_quantized_by("llmpress")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, value in arch.hparams(cfg).items():
        getattr(w, method)(value)
    name = str(cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or Path(src.model).name)
    return add_tokenizer(w, src.root, cfg, name)


def kept_type_of(gname: str, shape: tuple[int, ...], kept_type: T) -> T:
    """The type a kept tensor is written in (as ``encode_float`` decides): 2-D ones in
    ``kept_type`` (F16 where the rows are not a multiple of its block), the rest F32."""
    if len(shape) < 2 or _ALWAYS_F32.search(gname) or kept_type == T.F32:
        return T.F32
    return T.F16 if shape[-1] % gguf.GGML_QUANT_SIZES[kept_type][0] else kept_type


@register_target("gguf")
class GGUF(Target):
    fallbacks = ("dense", "requantize")
    output_is_dir = False

    def why_not(self, ct: CompressedTensor, **opts: Any) -> str | None:
        return why_not_blocks(ct)

    @staticmethod
    def _encode(src: ExportSource, name: str, gname: str, arch: Arch, actions: dict[str, str], kept_type: T,
                dense_type: T) -> tuple[np.ndarray, T, bool, int]:
        """One checkpoint tensor as written: (data, type, re-quantized, weights it counts for the file type)."""
        e = src.get(name)
        perm = arch.row_perm(gname, src.config)
        if e.ct is not None:
            act = actions.get(name, "exact")
            if act == "exact":
                data, qtype = pack_blocks(e.ct, perm)
            else:
                target = dense_type if act == "dense" else nearest_type(e.ct)
                data, qtype = encode_float(_permuted(e.decoded(), perm), target)
            return data, qtype, act == "requantize", int(np.prod(e.ct.meta["shape"]))
        t = _permuted(e.out_in(), perm)
        want = kept_type if t.dim() >= 2 and not _ALWAYS_F32.search(gname) else T.F32
        data, qtype = encode_float(t, want)
        counted = int(t.numel()) if data.ndim >= 2 and not src.compressed_names else 0
        return data, qtype, qtype not in (T.F32, T.F16, T.BF16) and t.dim() >= 2, counted

    def output_path(self, out: Path) -> Path:
        return out if out.suffix == ".gguf" else out.with_name(out.name + ".gguf")

    def write(self, src: ExportSource, out: Path, actions: dict[str, str], *, type: str | None = None,
              dtype: str | None = None, **opts: Any) -> dict[str, Any]:
        cfg = src.config
        arch = arch_of(cfg)
        kept_type = parse_type(type)
        dense_type = DENSE_DTYPES.get(dtype or "float32")
        if dense_type is None:
            raise InputError(f"gguf export: dtype must be one of {', '.join(DENSE_DTYPES)}; got {dtype!r}")
        plan = tensor_plan(src, arch)
        window = sliding_window(cfg)
        if window is not None:
            log.warning("gguf: %s attends to a sliding window of %d tokens; llama.cpp's %r attends to the whole "
                        "context: its outputs differ from the model's past %d tokens", cfg.get("model_type"), window,
                        arch.gguf, window)

        w = gguf.GGUFWriter(out, arch.gguf, use_temp_file=True)
        tok = add_metadata(w, src, arch, bool(src.compressed_names))

        types: dict[str, str] = {}
        requantized: list[str] = []
        weights: Counter = Counter()  # weights per type: of the compressed layers, or of all 2-D tensors
        for gname, names in plan:
            parts = [self._encode(src, name, gname, arch, actions, kept_type, dense_type) for name in names]
            if len({q for _, q, _, _ in parts}) > 1:  # experts stored in different types: one float type for all
                log.warning("gguf: %s: its experts are stored in %s; written as %s", gname,
                            sorted({q.name for _, q, _, _ in parts}), dense_type.name)
                parts = [self._encode(src, name, gname, arch, {name: "dense"}, dense_type, dense_type) for name in names]
            data = parts[0][0] if len(parts) == 1 else np.stack([d for d, _, _, _ in parts])  # (E, out, row bytes)
            qtype = parts[0][1]
            if any(r for _, _, r, _ in parts):
                requantized.append(gname)
            w.add_tensor(gname, data, raw_dtype=qtype)
            types[gname] = qtype.name
            weights[qtype] += sum(n for _, _, _, n in parts)
        for gname, t in arch.extra(cfg).items():
            data, qtype = encode_float(t, T.F32)
            w.add_tensor(gname, data, raw_dtype=qtype)
            types[gname] = qtype.name
        main = max(weights, key=weights.get) if weights else T.F32
        w.add_file_type(FILE_TYPES.get(main, gguf.LlamaFileType.GUESSED))
        try:
            w.write_header_to_file(out)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
        if requantized:
            log.info("gguf: %d tensors re-quantized by gguf-py (not llmpress's values)", len(requantized))
        return {"arch": arch.gguf, "file_type": main.name, "tensors": len(types), "types": dict(Counter(types.values())),
                "requantized": requantized, "block": BLOCK, "sliding_window_ignored": window, **tok}
