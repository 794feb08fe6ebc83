"""The ``compressed-tensors`` export: what llm-compressor writes, loaded by transformers and vLLM.

Each quantized linear on an integer grid (``sym``, or ``asymz`` with its integer zero point) with
consecutive groups that divide its input width (or one group per row, or per tensor) is stored in
``pack-quantized`` form (:mod:`~llmpress.targets.ct_layout`): the same codes, scales and zero points
llmpress chose, nothing re-rounded. Layers sharing a scheme (bits, symmetry, group layout) form one
``config_groups`` entry whose ``targets`` name them; a model with a single scheme gets
llm-compressor's own ``targets: [Linear]``. ``ignore`` lists every other ``nn.Linear`` (the head,
layers kept unquantized, ``--fallback dense`` layers), which vLLM requires of unquantized linears.
vLLM also fuses q/k/v and gate/up into one layer whose parts must share a scheme: a recipe that
splits them exports and loads in transformers, but not there.

Scales are stored in float32 by default: the fp16 scale llmpress chose, widened exactly, so that
the loader's ``(q − z)·s``, computed in the scale's dtype, is llmpress's float32 decode bit for bit
(transformers with ``CompressedTensorsConfig(dequantize=True)``, or packed in a float32 model).
``dtype=float16|bfloat16`` stores scales and every other float tensor in that type and makes it the
config's dtype: half the scale bytes, and a loader computing in fp16 rounds each weight once
(relative error ≤ 2⁻¹¹; bf16 also rounds llmpress's fp16 scales).

Fallbacks for layers that do not transfer: ``dense`` stores the decoded weight as a float tensor and
lists the layer in ``ignore``; ``requantize`` rounds the decoded weight to nearest (RTN, min–max)
on the nearest scheme that transfers — ``asymz`` at the layer's bits (8 for a layer without bits,
e.g. low-rank) and the largest group size that divides the input width and is no larger than the
layer's (per channel when there is none of at least 8) — which changes its values (reported).
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io.folder import FolderWriter, copy_side_files
from ..quant.grids import BITS, PER_TENSOR, SCALE_DTYPES
from ..tensor import CompressedTensor, decode, get_codec
from . import Entry, ExportSource, Target, register_target
from .ct_layout import Scheme, layer_tensors, scheme_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the compressed-tensors release whose reader this layout was checked against (config "version")
CT_VERSION = "0.20.1"
REQUANT_DEFAULT_BITS = 8
MIN_GROUP = 8


@register_target("compressed-tensors")
class CompressedTensorsTarget(Target):
    fallbacks = ("dense", "requantize")

    def why_not(self, ct: CompressedTensor, **opts: Any) -> str | None:
        s = scheme_of(ct)
        return s if isinstance(s, str) else None

    def why_not_layer(self, src: ExportSource, name: str, **opts: Any) -> str | None:
        module, _, param = name.rpartition(".")
        kind = src.module_types.get(module)
        if param != "weight" or kind != "Linear":
            return f"{name} is not an nn.Linear weight ({kind or 'no module'}); pack-quantized stores Linear weights"
        return self.why_not(src.compressed(name), **opts)

    def write(self, src: ExportSource, out: Path, actions: dict[str, str], *, dtype: str | None = None,
              shard_bytes: int = 2 << 30, **opts: Any) -> dict[str, Any]:
        if dtype is not None and dtype not in DTYPES:
            raise InputError(f"compressed-tensors export: dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        # no scheme holds a weight that is not a Linear's (a Conv1D's (in, out)): rounding would not help
        actions = {n: "dense" if a == "requantize" and src.module_types.get(n.rpartition(".")[0]) != "Linear" else a
                   for n, a in actions.items()}
        if not any(a != "dense" for a in actions.values()):
            raise InputError(f"{src.model}: no layer would be stored quantized (an original model, or every layer "
                             "dense); quantize it first (grid asymz) or export it dense")
        to = DTYPES[dtype] if dtype else None
        scale_dtype = to or torch.float32
        writer = FolderWriter(out, shard_bytes=shard_bytes)
        packed: dict[str, Scheme] = {}
        requantized: dict[str, dict[str, Any]] = {}
        dense: list[str] = []
        for e in src.entries():
            if e.ct is None:
                t = e.tensor()
                writer.add_tensor(e.name, t.to(to) if to is not None and t.is_floating_point() else t)
                continue
            action = actions[e.name]
            if action == "dense":
                writer.add_tensor(e.name, e.tensor().to(to or torch.float32))
                dense.append(e.module)
                continue
            ct = e.ct
            if action == "requantize":
                ct, requantized[e.name] = _requantize(e)
            scheme = scheme_of(ct)
            if isinstance(scheme, str):  # the planner let through a layer the layout cannot hold
                raise InputError(f"{e.name}: {scheme}")
            for key, t in layer_tensors(ct, scheme, scale_dtype).items():
                writer.add_tensor(f"{e.module}.{key}", t)
            packed[e.module] = scheme
        files = writer.finish_shards()
        side = copy_side_files(src.root, out)
        linears = sorted(n for n, t in src.module_types.items() if t == "Linear")
        qcfg, schemes = quantization_config(packed, linears)
        cfg = dict(src.config)
        cfg["quantization_config"] = qcfg
        if dtype is not None:
            cfg["dtype"] = dtype
            cfg.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        groups = {g: {"scheme": s.label(), "layers": sum(p == s for p in packed.values())} for g, s in schemes.items()}
        return {
            "files": files + ["config.json"] + side,
            "schemes": groups,
            "ignore": qcfg["ignore"],
            "dense": dense,
            "requantized": requantized,
            "scale_dtype": str(scale_dtype).removeprefix("torch."),
            **transformers_loading(set(schemes.values())),
        }


def transformers_loading(schemes: set[Scheme]) -> dict[str, bool]:
    """How transformers 5.25 with compressed-tensors 0.20 loads the export (measured):

    * ``loads_packed`` (plain ``from_pretrained``; packed until the first forward decompresses
      it): only symmetric schemes — an asymmetric group's packed zero point does not fit the
      (out, groups) parameter the loader makes for it (upstream: its own checkpoints fail too);
    * ``loads_dequantize`` (``CompressedTensorsConfig(dequantize=True)``): only one scheme — that
      path decodes every layer with the first config group's scheme (upstream), silently wrong
      for the others.

    vLLM reads each layer's own group either way."""
    packed = all(s.symmetric for s in schemes)
    dequantize = len(schemes) == 1
    if not dequantize:
        log.warning("%d quantization schemes: transformers' dequantize=True path would decode every layer with the "
                    "first group's scheme; %s", len(schemes),
                    "load it packed (plain from_pretrained)" if packed else
                    "with an asymmetric group too, transformers cannot load it (vLLM can)")
    return {"loads_packed": packed, "loads_dequantize": dequantize}


# ---------------------------------------------------------------------------- requantize
def _dividing_group(inp: int, gs: int) -> int:
    """The largest group size ≤ gs that divides ``inp`` (−1, per channel, when none ≥ 8)."""
    if gs == PER_TENSOR or gs < 0 or gs >= inp:
        return gs if gs == PER_TENSOR else -1
    for d in range(gs, MIN_GROUP - 1, -1):
        if inp % d == 0:
            return d
    return -1


def _requantize(e: Entry) -> tuple[CompressedTensor, dict[str, Any]]:
    """RTN (min–max) of the layer's decoded weight on the nearest scheme that transfers."""
    w = e.decoded()  # (out, in) float32
    meta = e.ct.meta if e.ct is not None else {}
    bits = int(meta.get("bits", REQUANT_DEFAULT_BITS))
    bits = bits if bits in BITS else REQUANT_DEFAULT_BITS
    gs = _dividing_group(w.shape[1], int(meta.get("group_size", -1)))
    sd = meta.get("scale_dtype", "float16")
    ct = get_codec("rtn").encode(w, bits=bits, group_size=gs, grid="asymz", name=e.name,
                                 scale_dtype=sd if sd in SCALE_DTYPES else "float16")
    scheme = scheme_of(ct)
    assert isinstance(scheme, Scheme), scheme
    return ct, {"scheme": scheme.label(), "max_abs_change": float((decode(ct) - w).abs().max())}


# ---------------------------------------------------------------------------- config
def _suffix(name: str) -> str | None:
    """What follows the last all-digit component (``self_attn.q_proj`` of
    ``model.layers.3.self_attn.q_proj``), None when there is none."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1:]) if idx and idx[-1] < len(parts) - 1 else None


def _targets(modules: list[str], linears: list[str]) -> list[str]:
    """Targets that match exactly ``modules`` among ``linears``: a regex per suffix whose every
    layer is in ``modules``, the module's exact name otherwise."""
    by_suffix: dict[str | None, list[str]] = defaultdict(list)
    for n in linears:
        by_suffix[_suffix(n)].append(n)
    mine = set(modules)
    out: list[str] = []
    done: set[str] = set()
    for n in sorted(modules):
        s = _suffix(n)
        if n in done:
            continue
        if s is not None and all(m in mine for m in by_suffix[s]):
            out.append(f"re:.*\\.\\d+\\.{re.escape(s)}$")
            done.update(by_suffix[s])
        else:
            out.append(n)
            done.add(n)
    return out


def _matches(name: str, target: str) -> bool:
    """compressed-tensors' name match (``match_name``): ``re:`` is re.match, else equality; the
    class name ``Linear`` matches every linear."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


def quantization_config(packed: dict[str, Scheme], linears: list[str]) -> tuple[dict[str, Any], dict[str, Scheme]]:
    """The ``quantization_config`` llm-compressor writes for these layers — one config group per
    scheme (most layers first), ``ignore`` every linear not stored packed — and each group's
    scheme. Checked before it is written: every packed layer matches its own group's targets and
    no other group's, every other linear is ignored."""
    by_scheme: dict[Scheme, list[str]] = defaultdict(list)
    for m, s in packed.items():
        by_scheme[s].append(m)
    ignore = sorted(set(linears) - set(packed))
    order = sorted(by_scheme, key=lambda s: (-len(by_scheme[s]), s.label()))
    groups: dict[str, Any] = {}
    schemes: dict[str, Scheme] = {}
    for i, s in enumerate(order):
        name = f"group_{i}"
        schemes[name] = s
        targets = ["Linear"] if len(order) == 1 else _targets(by_scheme[s], linears)
        groups[name] = {"targets": targets, "weights": s.weights_args(), "input_activations": None,
                        "output_activations": None, "format": "pack-quantized"}
    for m, s in packed.items():
        hits = [g for g, v in groups.items() if any(_matches(m, t) for t in v["targets"])]
        if [schemes[g] for g in hits] != [s]:
            raise AssertionError(f"compressed-tensors config: {m} ({s.label()}) matches groups {hits}")
    qcfg = {
        "config_groups": groups,
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
    return qcfg, schemes
