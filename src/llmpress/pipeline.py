"""The sequential runner: compress a model block by block with bounded memory.

Without calibration (every rule's codec is calibration-free) tensors are streamed straight
from the safetensors shards through their codecs. With calibration the runner follows the
layer-wise scheme of GPTQ's ``llama.py``:

1. capture the inputs of block 0 for the calibration samples, and what the model passes every
   block (masks, rotary tables: they differ between a model's sliding and global layers), with
   the blocks replaced by the identity (only the embeddings are loaded);
2. for each block i: load its tensors, hook its linears to accumulate input Stats, run it,
   encode every linear by its rule, put the decoded weights back, run it again to produce the
   inputs of block i+1 (so later blocks see the errors of earlier ones), write, release.

Peak memory: one block, plus the calibration activations (samples × seq_len × hidden).
With ``device`` (``--device cuda``) the embeddings, each block in turn and the activations live on
the device; the codecs compute there and their stored tensors come back to the CPU for writing.
"""
from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError, UnsupportedModelError
from . import moe, skeleton as sk
from .io.atomic import atomic_dir, scratch_dir
from .io.folder import FolderWriter
from .device import resolve_device, to_cpu
from .models import TensorStore, config as source_config, load_tokenizer, resolve
from .recipe import KEEP, Recipe
from .tensor import CompressedTensor, Stats, get_codec

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the hook on block 0 once its inputs are captured."""


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def calib_ids(tokenizer, text: str, samples: int, seq_len: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens spread evenly over the text: (samples, seq_len)."""
    if samples < 1 or seq_len < 2:
        raise InputError(f"need samples ≥ 1 and seq_len ≥ 2 (got {samples}, {seq_len})")
    need = samples * seq_len
    ids: list[int] = []
    chars = need * 6
    while True:  # tokenize only as much text as the windows need
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise InputError(
            f"calibration text too short: {len(ids)} tokens for {samples} samples × {seq_len} tokens; "
            "give a longer text or fewer samples"
        )
    stride = (len(ids) - seq_len) // max(1, samples - 1) if samples > 1 else 0
    stride = max(stride, seq_len)
    rows = [ids[i * stride : i * stride + seq_len] for i in range(samples)]
    return torch.tensor(rows, dtype=torch.long)


def _calib_text(calib: str | None) -> str:
    from .text import CALIB_DEFAULT, load_text

    return load_text(calib or CALIB_DEFAULT)


@dataclass
class _Plan:
    """Which linear gets which codec, decided before any work starts."""

    rules: dict[str, tuple[str, dict[str, Any]]]  # linear module name -> (codec, params)

    @property
    def needs_stats(self) -> bool:
        return any(get_codec(c).needs_stats for c, _ in self.rules.values())


def _plan(model: nn.Module, recipe: Recipe, keep_all_ok: bool = False) -> _Plan:
    """``keep_all_ok``: a recipe that keeps every layer is accepted (a rotation alone changes the model)."""
    names = sk.linear_names(model)
    if keep_all_ok:
        for r in recipe.rules:
            if r.method != KEEP:
                get_codec(r.method)
    else:
        recipe.validate(names)
    dense = moe.kept_dense(model)  # an MoE's routers and gates stay as they are
    if dense:
        log.info("kept dense (MoE routers, gates): %s", ", ".join(sorted(dense)[:4]) + (" …" if len(dense) > 4 else ""))
    rules = {}
    for n in (n for n in names if n not in dense):
        r = recipe.rule_for(n)
        if r is not None and r.method != KEEP:
            rules[n] = (r.method, r.params)
    skipped = [
        n for n, m in model.named_modules()
        if not sk.is_linear(m) and next(m.children(), None) is None and n not in dense
        and any(p.ndim == 2 for p in m.parameters(recurse=False))
        and (r := recipe.rule_for(n)) is not None and r.method != KEEP
    ]
    if skipped:
        log.warning("not linear, left as they are: %s", ", ".join(skipped[:8]) + (" …" if len(skipped) > 8 else ""))
    refused = []
    for n, (method, params) in rules.items():
        codec = get_codec(method)
        shape = tuple(sk.linear_weight(sk.get_module(model, n)).shape)
        try:
            codec.check_params(shape, params)
        except InputError as e:
            raise InputError(f"{n}: {e}") from None
        why = codec.why_not_shape(shape, params)
        if why is not None:
            refused.append(f"{n} {shape}: {why}")
    if refused:
        raise InputError(f"{len(refused)} layer(s) cannot take their rule's grid: " + "; ".join(refused[:4])
                         + (" …" if len(refused) > 4 else ""))
    return _Plan(rules)


def _encode(name: str, w: torch.Tensor, codec_name: str, params: dict[str, Any], stats: Stats | None) -> CompressedTensor:
    """Encode one (out, in) float32 weight; refuse NaN/Inf naming the tensor."""
    if not torch.isfinite(w).all():
        raise InputError(f"{name}.weight has NaN or Inf values; refusing to compress it")
    codec = get_codec(codec_name)
    ct = codec.encode(w, stats, **params)
    ct.meta.setdefault("shape", list(w.shape))
    return ct


def _layer_report(w: torch.Tensor, w_hat: torch.Tensor, ct: CompressedTensor, stats: Stats | None, secs: float) -> dict[str, Any]:
    w = w.to(torch.float32)
    d = w - w_hat.to(torch.float32)  # (out, in)
    rep = {
        "codec": ct.codec,
        "bpw": ct.bpw(),
        "numel": ct.numel(),
        "bits": ct.nbits(),
        "rel_err": float(d.double().norm() / w.double().norm().clamp_min(1e-30)),
        "seconds": secs,
    }
    if stats is not None and stats.gram is not None:
        # relative output error ‖(W−Ŵ)X‖² / ‖WX‖² = tr(D H Dᵀ) / tr(W H Wᵀ): one float32 product
        # for both traces (a report, not an input to any method; float64 cost ~9 % of a GPTQ run)
        dw = torch.cat([d, w])  # (2·out, in)
        t = torch.zeros(len(dw), dtype=torch.float64, device=dw.device)  # (2·out,), over column blocks of H: no whole float32 copy
        step = max(1, (64 << 20) // (4 * max(1, len(dw))))
        for c in range(0, dw.shape[1], step):
            t += ((dw @ stats.gram[:, c : c + step].to(torch.float32)) * dw[:, c : c + step]).double().sum(1)
        rep["rel_out_err"] = float(t[: len(d)].sum() / t[len(d):].sum().clamp_min(1e-30))
    return rep


def compress(
    model: str | Path,
    recipe: Recipe,
    out: str | Path,
    *,
    calib: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    force: bool = False,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    trial_blocks: int | None = None,
    device: str | torch.device | None = "cpu",
    workers: int = 1,
    address: str | None = None,
    rotate: Any = None,
) -> dict[str, Any]:
    """Compress ``model`` by ``recipe`` into the folder ``out`` (see ``llmpress.io.folder``).
    ``rotate`` (True, a dict or a :class:`llmpress.quant.rotate.RotateSpec`): an orthogonal rotation
    of the residual stream fused into the weights as they are read (statistics are gathered on the
    rotated model; the folder holds the rotated weights and records the rotation).
    ``device``: cpu | cuda | auto, where blocks, activations and the codecs' work go.
    ``workers`` > 1 or ``address``: a mixture of experts' calibrated expert linears are encoded
    in Ray tasks (``llmpress.cluster``), with the same results as in one process.

    ``trial_blocks=N`` sizes a long run instead: only the first N blocks are compressed (then the
    tensors outside the blocks, so their cost is measured too), into a temporary folder beside
    ``out`` that is deleted; nothing is written to ``out``. The summary's ``trial`` gives the
    seconds of each block and the whole run's time extrapolated from their mean."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if (workers > 1 or address) and dev.type != "cpu":
        raise InputError(f"workers fan an MoE's expert encoding out to CPU processes; on device {dev} "
                         "the experts are encoded on that device in this process: use one worker or the cpu device")
    src = resolve(model)
    store = TensorStore(src)
    cfg = sk.folder_config(src.folder)
    skel = sk.build_meta(cfg)
    out_config = source_config(src)
    rotation = _rotation(skel, store, rotate)
    if rotation is not None:
        store = rotation.wrap(store)
        if rotation.untie:  # the head gets its own tensor
            cfg.tie_word_embeddings = out_config["tie_word_embeddings"] = False
            skel = sk.build_meta(cfg)
    plan = _plan(skel, recipe, keep_all_ok=rotation is not None)
    if rotation is not None and (rotation.online or rotation.stream):
        if rotation.online:
            _check_online(plan, rotation.online)
        from .quant.rotate import install_online

        # statistics see the rotated inputs, as the loaders will give them
        install_online(skel, rotation.online, rotation.stream)
    if trial_blocks is not None and (trial_blocks < 1 or not plan.needs_stats):
        raise InputError("trial blocks: give N ≥ 1, with a method that calibrates block by block (gptq, awq); "
                         "the others stream tensor by tensor")
    if plan.needs_stats:
        sk.check_walkable(skel)
    torch.manual_seed(0)
    timing: dict[str, Any] = {}
    with contextlib.ExitStack() as stack, \
            (_discarded_dir(out) if trial_blocks is not None else atomic_dir(out, force=force)) as tmp:
        writer = FolderWriter(tmp)
        if plan.needs_stats:
            text = _calib_text(calib)
            ids = calib_ids(load_tokenizer(src.name if src.kind == "embedded" else src.folder), text, samples, seq_len)
            cluster = None
            if (workers > 1 or address) and any(moe.is_expert(n) for n in plan.rules):
                from .cluster import ray_cluster

                cluster = stack.enter_context(ray_cluster(workers, address, what="per-expert encoding"))
            layers = _run_sequential(skel, store, plan, writer, ids, batch_size, progress, dev, cluster,
                                     trial_blocks, timing)
        else:
            layers = _run_streaming(skel, store, plan, writer, progress, dev)
        bytes_in = sum(f.stat().st_size for f in store.files)
        lin_bits = sum(r["bits"] for r in layers.values())
        lin_n = sum(r["numel"] for r in layers.values())
        summary = {
            "source": str(src.name),
            "recipe": recipe.to_dict(),
            "calibration": {"text": calib, "samples": samples, "seq_len": seq_len} if plan.needs_stats else None,
            "bpw": lin_bits / max(1, lin_n),
            "linear_params": lin_n,
            "bytes_in": bytes_in,
            "layers": layers,
            "versions": _versions(),
            **({"rotation": rotation.record()} if rotation is not None else {}),
            **(extra_meta or {}),
        }
        manifest = writer.finish(src.folder, out_config, summary)
    seconds = time.perf_counter() - t0
    summary.update(
        bytes_out=manifest["bytes_out"],
        ratio=manifest["bytes_out"] / max(1, bytes_in),
        seconds=seconds,
        peak_rss_bytes=peak_rss_bytes(),
        device=str(dev),
        out=str(out),
    )
    if timing:
        summary["timing"] = timing
    if trial_blocks is not None:
        done, total = len(timing["block_seconds"]), timing["blocks_total"]
        per = sum(timing["block_seconds"]) / max(1, done)
        summary.update(out=None, bytes_out=None, ratio=None, bpw=None, trial={
            "blocks_done": done, "blocks_total": total, "seconds_per_block": per,
            "extrapolated_seconds": seconds + (total - done) * per,
            "note": "trial run: nothing written; extrapolated = this run + the remaining blocks at the mean seconds per block"})
    return summary


def _rotation(skel: nn.Module, store: TensorStore, rotate: Any) -> Any:
    """The planned rotation (``quant/rotate.py``) or None; refuses an unsupported family before any work."""
    from .quant.rotate import RotateSpec, plan

    spec = RotateSpec.of(rotate)
    return None if spec is None else plan(skel, store, spec)


def _check_online(plan: _Plan, online: dict[str, Any]) -> None:
    """An online rotation sits between a linear and what feeds it: a codec that rewrites the block
    (AWQ folds a scale of down_proj's input into up_proj's rows) would fold through it wrongly."""
    from .tensor import Codec

    folding = sorted({c for n, (c, _) in plan.rules.items()
                      if type(get_codec(c)).prepare_block is not Codec.prepare_block})
    if folding:
        raise InputError(f"rotate mlp (an online rotation before {', '.join(online)}) does not go with "
                         f"{', '.join(folding)}, which fold(s) scales across it; use gptq or rtn, or rotate without mlp")


@contextlib.contextmanager
def _discarded_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` (the same disk), deleted afterwards whatever happens."""
    with scratch_dir(Path(out).parent, f"{Path(out).name}.trial") as tmp:
        yield tmp


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"llmpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _keep_report(t: torch.Tensor) -> dict[str, Any]:
    """A linear weight stored as it was: its own bits count."""
    return {"codec": KEEP, "bits": t.numel() * t.element_size() * 8, "numel": t.numel(), "bpw": t.element_size() * 8.0}


def _compress_linear(name: str, w: torch.Tensor, plan: _Plan, stats: Stats | None,
                     last: bool = False) -> tuple[CompressedTensor, torch.Tensor, dict[str, Any]]:
    """Encode one (out, in) weight by its rule; return the stored form, its decoding and its report.
    ``last``: no other linear reads ``stats``: what a method derived from it goes before the report."""
    codec_name, params = plan.rules[name]
    codec = get_codec(codec_name)
    if stats is None and codec.needs_stats:  # an expert the router sent no calibration token
        stats = moe.no_input_stats(name, w.shape[1], codec.gram)
    tt = time.perf_counter()
    ct = _encode(name, w, codec_name, params, stats)
    w_hat = codec.decode(ct)  # where w is
    secs = time.perf_counter() - tt
    if last and stats is not None:
        stats.derived.clear()
    rep = _layer_report(w, w_hat, ct, stats, secs)
    ct.data = to_cpu(ct.data)  # stored from host memory
    return ct, w_hat, rep


def _stream_tensor(key: str, t: torch.Tensor, linears: dict[str, nn.Module], plan: _Plan, writer: FolderWriter,
                   layers: dict[str, Any], dev: torch.device) -> None:
    """One checkpoint tensor, straight through its codec (no calibration) or kept as it is."""
    mod_name, _, leaf = key.rpartition(".")
    if leaf == "weight" and mod_name in plan.rules:
        t = t.to(dev)
        w = t.float().T if type(linears[mod_name]).__name__ == "Conv1D" else t.float()
        ct, _, layers[mod_name] = _compress_linear(mod_name, w, plan, None)
        writer.add_compressed(key, ct)
    else:
        if leaf == "weight" and mod_name in linears:
            layers[mod_name] = _keep_report(t)
        writer.add_tensor(key, t)


def _run_streaming(skel: nn.Module, store: TensorStore, plan: _Plan, writer: FolderWriter, progress: bool,
                   dev: torch.device) -> dict[str, Any]:
    """No calibration: each tensor goes from the shards through its codec to the output."""
    layers: dict[str, Any] = {}
    linears = {n: m for n, m in skel.named_modules() if sk.is_linear(m)}
    for key in tqdm(store.keys(), desc="compress", disable=not progress, unit="tensor"):
        _stream_tensor(key, store.get(key), linears, plan, writer, layers, dev)
    return layers


@dataclass
class BlockCall:
    """What the model passes one block besides its hidden states: positional arguments after
    them (GPT-2 passes its cache and mask so) and keyword arguments (masks, rotary tables)."""

    args: tuple
    kwargs: dict[str, Any]


def _block_out(block: nn.Module, h: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(h, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _identity_forward(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def _capture_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, bs: int) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Run the model through its blocks, each replaced by the identity (their weights are not
    loaded), for each batch; return block 0's hidden inputs (one per batch) and every block's
    call (``calls[block][batch]``). Blocks differ in what they are passed: Gemma's sliding
    layers get a banded mask and local rotary tables, its global layers others. The forward
    stops before the last block's output reaches the final norm and head."""
    hs: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1

    def grab(i: int):
        def hook(_mod, args, kwargs):
            kw = dict(kwargs)
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hs.append(h)
            calls[i].append(BlockCall(tuple(args[1:]), kw))
            if i == last:
                raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for b in blocks:
        b.forward = _identity_forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        with torch.inference_mode():
            for i in range(0, ids.shape[0], bs):
                try:
                    extra = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
                    model(input_ids=ids[i : i + bs], **extra)
                except _Stop:
                    pass
    finally:
        for b in blocks:
            del b.forward
        for hd in handles:
            hd.remove()
    if any(len(c) != len(hs) for c in calls):
        raise UnsupportedModelError(f"{type(model).__name__}: not every block was called once per batch; the sequential runner "
                           "cannot walk this model")
    return hs, calls


@dataclass
class _Walk:
    """The start of a block-by-block walk: the blocks, and the inputs of block 0."""

    prefix: str                        # e.g. "model.layers."
    blocks: nn.ModuleList
    outside: set[str]                  # state-dict keys outside the blocks
    hs: list[torch.Tensor]             # block-0 hidden states, one (B, T, C) per batch
    calls: list[list[BlockCall]]       # calls[block][batch]: what each block is passed besides them


def open_walkable(model: str | Path) -> tuple[Any, TensorStore, nn.Module]:
    """``(source, its tensor store, its meta skeleton)`` of an ORIGINAL checkpoint that the
    block-by-block walk can run; an unwalkable family is refused before any work."""
    src = resolve(model)
    skel = sk.build_meta(sk.folder_config(src.folder))
    sk.check_walkable(skel)
    return src, TensorStore(src), skel


def _start_walk(skel: nn.Module, store: TensorStore, ids: torch.Tensor, bs: int, dev: torch.device) -> _Walk:
    """Capture every block's inputs on ``dev``. Only the modules outside the blocks that the
    forward actually calls before block 0 (embeddings, position embeddings, an input projection)
    are loaded, each when it is called, onto ``dev``, and all are released afterwards: the head
    and final norm never are (an 8B model's untied head would be 2 GiB of float32). A plain
    embedding table stays in its stored dtype, its rows cast to float32 as they are looked up
    (the same values as a float32 table)."""
    blocks_name, blocks = sk.blocks_of(skel)
    prefix = blocks_name + "."
    outside = {k for k in skel.state_dict() if not k.startswith(prefix)}
    sk.move(skel, dev)  # the rebuilt rotary buffers; everything else is still on meta
    handles, loaded = _load_when_called(skel, prefix, store, dev)
    try:
        hs, calls = _capture_inputs(skel, blocks, ids.to(dev), bs)
    finally:
        for h in handles:
            h.remove()
        for m in loaded:
            sk.release(m)
    return _Walk(prefix, blocks, outside, hs, calls)


def walk_forward(walk: _Walk, store: TensorStore, hs: list[torch.Tensor], dev: torch.device,
                 calls: list[list[BlockCall]] | None = None, desc: str = "forward",
                 progress: bool = False) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """The ORIGINAL model's blocks in turn, each loaded in float32 on ``dev``, run without
    gradients over every batch (``hs``: block 0's inputs, one per batch; then the previous
    block's outputs) and released: yields ``(i, block i's outputs)``. The caller keeps what it
    needs (the last outputs, or every boundary); ``calls`` replaces ``walk.calls``."""
    calls = walk.calls if calls is None else calls
    for i in tqdm(range(len(walk.blocks)), desc=desc, disable=not progress, unit="block"):
        block = walk.blocks[i]
        sk.fill(block, f"{walk.prefix}{i}.", store.get, dtype=torch.float32)
        sk.move(block, dev)
        try:
            with torch.no_grad():
                hs = [_block_out(block, h, kw) for h, kw in zip(hs, calls[i])]
        finally:
            sk.release(block)
        yield i, hs


def _tied_sources(skel: nn.Module) -> dict[str, str]:
    """{input embedding's weight key: output embedding's weight key} when the config ties them
    (a checkpoint may store only one of the two)."""
    if not getattr(skel.config, "tie_word_embeddings", False) or not hasattr(skel, "get_output_embeddings"):
        return {}
    out, inp = skel.get_output_embeddings(), skel.get_input_embeddings()
    if out is None or inp is None:
        return {}
    names = {m: n for n, m in skel.named_modules()}
    if out not in names or inp not in names:
        return {}
    return {f"{names[inp]}.weight": f"{names[out]}.weight"}


def _load_when_called(skel: nn.Module, prefix: str, store: TensorStore,
                      dev: torch.device) -> tuple[list, list[nn.Module]]:
    """Pre-hooks that fill each module outside the blocks with its own tensors on ``dev`` when it
    is first called; returns (hook handles, the list the loaded modules are appended to)."""
    handles: list = []
    loaded: list[nn.Module] = []
    tied = _tied_sources(skel)
    tied.update({v: k for k, v in tied.items()})  # a tied head reads the embedding's table, and the other way round

    def cast_out(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.float()

    def make(name: str, keep_dtype: bool):
        def pre(m: nn.Module, _args: tuple) -> None:
            if m in loaded:
                return
            own = [k for k in m.state_dict() if "." not in k]
            sd = {}
            for k in own:
                key = f"{name}.{k}" if name else k
                key = key if key in store.where else tied.get(key, key)
                if key in store.where:
                    t = store.get(key)
                    sd[k] = (t if keep_dtype or not t.is_floating_point() else t.float()).to(dev)
            m.load_state_dict(sd, assign=True, strict=False)
            loaded.append(m)
            if keep_dtype:
                handles.append(m.register_forward_hook(cast_out))

        return pre

    for name, m in skel.named_modules():
        if name.startswith(prefix) or f"{name}." == prefix or not any("." not in k for k in m.state_dict()):
            continue
        # only a plain lookup keeps the stored dtype (a subclass may compute in the table's dtype,
        # e.g. Gemma's scaled embedding multiplies in it)
        handles.append(m.register_forward_pre_hook(make(name, type(m).forward is nn.Embedding.forward)))
    return handles, loaded


def _run_sequential(skel: nn.Module, store: TensorStore, plan: _Plan, writer: FolderWriter, ids: torch.Tensor, bs: int,
                    progress: bool, dev: torch.device, cluster: Any = None, max_blocks: int | None = None,
                    timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress block by block (the first ``max_blocks`` only, if given); ``timing`` receives the
    set-up seconds, each block's seconds and the peak RSS after each block."""
    t0 = time.perf_counter()
    walk = _start_walk(skel, store, ids, bs, dev)
    prefix, blocks, outside, hs = walk.prefix, walk.blocks, walk.outside, walk.hs
    n_blocks = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    timing = {} if timing is None else timing
    timing.update(setup_seconds=time.perf_counter() - t0, block_seconds=[], block_peak_rss_bytes=[],
                  blocks_total=len(blocks))
    layers: dict[str, Any] = {}
    outside_linears = {n: m for n, m in skel.named_modules() if sk.is_linear(m) and not n.startswith(prefix)}
    for i in tqdm(range(n_blocks), desc="compress", disable=not progress, unit="block"):
        tb = time.perf_counter()
        bp = f"{prefix}{i}."
        block, kws = blocks[i], walk.calls[i]
        sk.fill(block, bp, store.get, dtype=torch.float32)
        sk.move(block, dev)
        lin = {f"{bp}{n}": m for n, m in block.named_modules() if sk.is_linear(m)}
        stats = _collect(block, lin, plan, hs, kws)
        changed = _prepare_block(block, bp, lin, plan, stats, skel.config)  # e.g. AWQ folds its scales into the norms
        _narrow_grams(stats, plan)
        done = {} if cluster is None else moe.fan_out(_compress_linear, {  # an MoE's experts, in Ray tasks
            n: (n, sk.linear_weight(m), plan, stats.get(n)) for n, m in lin.items() if n in plan.rules and moe.is_expert(n)
        }, cluster)
        order = list(lin)
        for j, (name, m) in enumerate(lin.items()):
            if name not in plan.rules:
                layers[name] = _keep_report(m.weight)
                continue
            st = stats.get(name)
            last = st is not None and not any(stats.get(n) is st for n in order[j + 1:])
            ct, w_hat, layers[name] = done.pop(name) if name in done else \
                _compress_linear(name, sk.linear_weight(m), plan, st, last)
            sk.set_linear_weight(m, w_hat)
            writer.add_compressed(f"{name}.weight", ct)
            del ct, w_hat
            if last:
                st.gram = None  # its last reader is done: free the Gram matrix
        stats.clear()
        if i + 1 < n_blocks:  # the inputs of the next block, through the compressed one
            with torch.inference_mode():
                hs = [_block_out(block, h, kw) for h, kw in zip(hs, kws)]
        for k in block.state_dict():
            key = f"{bp}{k}"
            mod_name = key.rsplit(".", 1)[0]
            if not (mod_name in plan.rules and key.endswith(".weight")):
                orig = store.get(key)
                writer.add_tensor(key, changed[key].to(device="cpu", dtype=orig.dtype) if key in changed else orig)
        sk.release(block)
        timing["block_seconds"].append(time.perf_counter() - tb)
        timing["block_peak_rss_bytes"].append(peak_rss_bytes())
    del hs
    t1 = time.perf_counter()
    for key in sorted(outside):
        if key in store.where:  # absent when tied to another tensor
            _stream_tensor(key, store.get(key), outside_linears, plan, writer, layers, dev)
    timing["outside_seconds"] = time.perf_counter() - t1
    return layers


def _narrow_grams(stats: dict[str, Stats], plan: _Plan) -> None:
    """Gram matrices accumulated in float64 kept in float32 where every linear reading them has a codec
    that computes with them in float32 only (``gram_float32``: GPTQ, AWQ): the same results, half the
    memory (an 8B model's down_proj Gram is 1.6 GB in float64) while the block's linears are encoded."""
    readers: dict[int, list[str]] = {}
    for n, st in stats.items():
        readers.setdefault(id(st), []).append(n)
    for n, st in stats.items():
        if st.gram is None or st.gram.dtype != torch.float64:
            continue
        if all(m in plan.rules and get_codec(plan.rules[m][0]).gram_float32 for m in readers[id(st)]):
            st.gram = st.gram.to(torch.float32)


def _prepare_block(block: nn.Module, bp: str, lin: dict[str, nn.Module], plan: _Plan, stats: dict[str, Stats],
                   config: Any = None) -> dict[str, torch.Tensor]:
    """Let the codecs' ``prepare_block`` hooks rewrite the block before its linears are encoded
    (they may change weights, other tensors and ``stats`` in place); returns {state key: tensor}
    of the tensors outside the encoded linear weights that they changed. ``config``: the model's
    (a hook may key its knowledge of the block by ``model_type``)."""
    changed: dict[str, torch.Tensor] = {}
    for c in sorted({plan.rules[n][0] for n in lin if n in plan.rules}):
        changed.update(get_codec(c).prepare_block(
            block, bp, {n: plan.rules[n][1] for n in lin if n in plan.rules and plan.rules[n][0] == c}, stats, config=config))
    return changed


class _AllInputsSeen(Exception):
    """Raised by the last pre-hook of a batch whose block output nobody needs."""


class _StatsHooks:
    """Pre-hooks that accumulate each linear's input Stats. Linears fed the very same input
    tensor (q/k/v, gate/up) share one Stats object, so its Gram matrix is computed once.

    With ``outputs=False`` the block's output is not wanted (the statistics of the original
    block, before its linears are compressed): each batch stops as soon as every hooked linear
    has seen its input, so the rest of the block (in a Llama block the down projection, a
    quarter of its linear work) is not computed. This assumes each linear runs once a forward,
    as in the transformers blocks."""

    def __init__(self, modules: dict[str, nn.Module], gram: dict[str, bool], outputs: bool = True):
        self.stats: dict[str, Stats] = {}
        self._seen: dict[int, tuple[torch.Tensor, Stats, bool]] = {}  # id(input) -> (input, its Stats, has gram)
        self._fired: set[str] = set()  # hooked linears that saw this batch
        self._stop_after = None if outputs else len(modules)
        self._handles = [m.register_forward_pre_hook(self._hook(n, gram[n])) for n, m in modules.items()]

    def _hook(self, name: str, want_gram: bool):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            hit = self._seen.get(id(x))
            if hit is not None and hit[0] is x and (hit[2] or not want_gram):
                self.stats[name] = hit[1]
            else:
                st = self.stats.setdefault(name, Stats())
                st.add(x, gram=want_gram)
                self._seen[id(x)] = (x, st, want_gram)  # holding x keeps its id unique for this batch
            self._fired.add(name)
            if len(self._fired) == self._stop_after:
                raise _AllInputsSeen

        return hook

    def run(self, block: nn.Module, hs: list[torch.Tensor], kws: list[BlockCall]) -> list[torch.Tensor | None]:
        """Run the block on every batch; return its outputs (None for a batch stopped early)."""
        outs: list[torch.Tensor | None] = []
        try:
            with torch.inference_mode():
                for h, kw in zip(hs, kws):
                    self._seen.clear()
                    self._fired.clear()
                    try:
                        outs.append(_block_out(block, h, kw))
                    except _AllInputsSeen:
                        outs.append(None)
        finally:
            self._seen.clear()
            for hd in self._handles:
                hd.remove()
        return outs


def _collect(block: nn.Module, lin: dict[str, nn.Module], plan: _Plan, hs: list[torch.Tensor], kws: list[BlockCall]) -> dict[str, Stats]:
    """Run the block on every batch, accumulating the input Stats of the linears whose codec needs them."""
    hooked = {n: m for n, m in lin.items() if n in plan.rules and get_codec(plan.rules[n][0]).needs_stats}
    if not hooked:
        return {}
    hooks = _StatsHooks(hooked, {n: get_codec(plan.rules[n][0]).gram for n in hooked}, outputs=False)
    hooks.run(block, hs, kws)
    return hooks.stats


def iter_stats(
    model: str | Path,
    *,
    calib: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    match: str = ".*",
    gram: bool = True,
    progress: bool = True,
    device: str | torch.device | None = "cpu",
) -> Iterator[dict[str, Stats]]:
    """Input Stats of every matching linear of the ORIGINAL model, yielded one block at a time
    (no change to the weights). A caller that drops each block's dict before asking for the next
    holds at most one block's Gram matrices. The Stats live on ``device``."""
    import re

    dev = resolve_device(device)
    src, store, skel = open_walkable(model)
    rx = re.compile(match)
    ids = calib_ids(load_tokenizer(src.name if src.kind == "embedded" else src.folder), _calib_text(calib), samples, seq_len)
    walk = _start_walk(skel, store, ids, batch_size, dev)
    prefix, blocks, hs = walk.prefix, walk.blocks, walk.hs
    for i in tqdm(range(len(blocks)), desc="stats", disable=not progress, unit="block"):
        bp = f"{prefix}{i}."
        block, kws = blocks[i], walk.calls[i]
        sk.fill(block, bp, store.get, dtype=torch.float32)
        sk.move(block, dev)
        lin = {f"{bp}{n}": m for n, m in block.named_modules() if sk.is_linear(m) and rx.search(f"{bp}{n}")}
        hooks = _StatsHooks(lin, {n: gram for n in lin})
        hs = hooks.run(block, hs, kws)
        sk.release(block)
        stats = hooks.stats
        del hooks
        yield stats
        del stats


def collect_stats(
    model: str | Path,
    *,
    calib: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    match: str = ".*",
    gram: bool = True,
    progress: bool = True,
    device: str | torch.device | None = "cpu",
) -> dict[str, Stats]:
    """Input Stats of every matching linear of the ORIGINAL model (block by block, no change
    to the weights), all at once: for sensitivity measurements. ``iter_stats`` gives them one
    block at a time."""
    out: dict[str, Stats] = {}
    for stats in iter_stats(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, match=match,
                            gram=gram, progress=progress, device=device):
        out.update(stats)
    return out
