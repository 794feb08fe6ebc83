"""Rotations that stay a plain model: an orthogonal Q fused into the weights (QuaRot's residual rotation).

In a pre-norm transformer with RMSNorm every block reads the residual stream h through a norm
and adds its output back. With row vectors (a linear computes y = x Wᵀ + b) and Q orthogonal:

- RMSNorm commutes with Q once its scale is folded out: rms(h Q) = rms(h), so with γ = 1 the norm
  of the rotated stream h Q is x̂ Q. The scale goes into every linear reading the norm's output:
  x̂ diag(γ) Wᵀ = (x̂ Q)(W diag(γ) Q)ᵀ, so a **reader** W ← W diag(γ) Q (q/k/v, gate/up, the head
  after the final norm; Gemma's x̂ (1 + γ): diag(1 + γ), γ ← 0);
- a **writer** (o_proj, down_proj) adds y = z Wᵀ + b to the stream, which must become y Q:
  W ← Qᵀ W, b ← b Q;
- the **embedding** writes the stream: E ← E Q (Gemma's √hidden scale is a scalar, it commutes).

Nothing else sees the residual, so the logits are unchanged (up to rounding), and the model is
the same architecture with new weights: GPTQ, exports, loading and recovery need no change.
The readers' outputs (q, k, v, gate, up) are in their original basis, so Qwen3's q/k norms and
the biases of readers are untouched. A tied embedding and head share E: the head needs
E diag(γ_final) Q and the embedding E Q, equal only when the final norm's scale is 1 — otherwise
the head is **untied** (its own tensor, ``tie_word_embeddings`` false in the written config).

Optionally (``heads``) a second rotation R (head_dim × head_dim) per attention head between
v_proj and o_proj: attention mixes tokens, not channels, so v_h ← v_h R (v_proj's rows of head h:
W ← Rᵀ W, b ← b R) and o_proj's input columns of every query head ← W R (grouped-query heads
read the same R). The MLP's hidden width cannot be rotated this way (act(gate) ⊙ up is not
rotation-equivariant: QuaRot puts an online Hadamard before down_proj), nor can a LayerNorm
stream (GPT-2, OPT: the mean subtraction needs QuaRot's centering), nor Gemma 2/3's norms on the
blocks' outputs (they scale o_proj's and down_proj's outputs per channel before the residual
add): those families are refused before any work.

With ``inputs`` there is no residual rotation: folding γ into the readers puts the stream's massive
channels (which a small γ damps) into every weight's quantization error, and on SmolLM2 that fold
alone costs GPTQ more than the rotation wins back. Instead each linear reading a block norm's output
reads it rotated online, x̂ diag(γ) H, and stores W H (one H a norm, shared by its readers): γ stays
in the norm, the weights' outliers are still spread, and the online products are stated in the
folder like ``mlp``'s (the dense export folds them back: W H Hᵀ).

The rotation changes which grid fits. A rotated group is close to a centred Gaussian, whose best
few-level uniform quantizer has no level at 0 (at 2 bits: ±Δ/2, ±3Δ/2); GPTQ's default integer
zero point puts 0 on the grid and so wastes a level, while the unrotated weights, peaked at 0 with
heavy tails, want that level. The sweep's rotated points therefore use the float-offset grid
(``grid: asym``) and the unrotated ones keep ``asymz`` (``bench/rotate.py`` measures both grids
both ways); with four levels a group's longer tail is best clipped harder than its shorter one,
which ``range: mse2`` searches.

Every transform runs in float64 and is cast back to the stored dtype, one tensor at a time as the
runner reads it (:class:`RotatedStore` wraps a ``TensorStore``): the rotated model is never
materialized whole. Per-family knowledge is data: the norms and their readers come from
``fold.FOLDS`` (its ``norm`` patterns, their offsets; the ``attn_v`` pattern for heads), what
writes the residual and which norms stay from :data:`RESIDUAL`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .fold import PRODUCER_ROWS, patterns_for
from .hadamard import Orthogonal, orthogonal
from ..errors import InputError, UnsupportedModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Residual:
    """Who else touches a family's residual stream, by module name inside a block (readers and
    their norms are ``fold.FOLDS``' ``norm`` patterns)."""

    writers: tuple[str, ...]             # block linears whose output is added to the stream
    final_norm: str = "model.norm"       # the norm before the head (full name)
    inner_norms: tuple[str, ...] = ()    # norms that act inside a block, not on the stream
    hidden_reader: str | None = "mlp.down_proj"  # the linear reading the MLP's hidden width (online rotation)


_LLAMA = Residual(("self_attn.o_proj", "mlp.down_proj"))
RESIDUAL: dict[str, Residual] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma": _LLAMA,
    "qwen3": Residual(("self_attn.o_proj", "mlp.down_proj"), inner_norms=("self_attn.q_norm", "self_attn.k_norm")),
    "phi3": Residual(("self_attn.o_proj", "mlp.down_proj")),
}
_LAYERNORM = "its LayerNorm subtracts the mean, which a fused rotation does not commute with (QuaRot's centering is not done here)"
_SANDWICH = ("its norms on the blocks' outputs (post_attention_layernorm, post_feedforward_layernorm) scale o_proj's "
             "and down_proj's outputs per channel before the residual add; no fused rotation passes them")
REFUSED: dict[str, str] = {"gpt2": _LAYERNORM, "opt": _LAYERNORM, "gemma2": _SANDWICH, "gemma3_text": _SANDWICH}


@dataclass(frozen=True)
class RotateSpec:
    """What ``--rotate`` asks for: the residual rotation, with ``heads`` the per-head V→O one, with
    ``mlp`` an online rotation of the MLP's hidden width before down_proj (not fusable: stated in
    the folder, applied by llmpress's loaders, refused by the exports that cannot express it); with
    ``keep_head`` the embedding, the final norm and the head stay as stored (a tied head stays tied,
    the same bytes as unrotated) and the stream is rotated online instead: h ← h Q after the
    embedding, h ← h Qᵀ before the final norm (stated and applied like ``mlp``'s). With ``inputs``
    the stream is not rotated and no norm scale is folded: the linears reading each block norm's
    output (q/k/v, gate/up) read it rotated online instead, one Hadamard a norm (stated and applied
    like ``mlp``'s; why: the module's docstring)."""

    seed: int = 0
    kind: str = "auto"   # auto (Hadamard where a construction exists) | hadamard | random
    heads: bool = True
    mlp: bool = False
    keep_head: bool = False  # embedding, final norm and head as stored; the stream rotated online at its ends
    inputs: bool = False  # no residual rotation, no fold: each block norm's readers read its output rotated online

    def __post_init__(self) -> None:
        if self.inputs and self.keep_head:
            raise InputError("rotate: inputs leaves the residual stream unrotated; keep_head has no stream to keep")

    @classmethod
    def of(cls, value: bool | dict | RotateSpec | None) -> RotateSpec | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, RotateSpec):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"seed", "kind", "heads", "mlp", "keep_head", "inputs"}
            if unknown:
                raise InputError(f"rotate: unknown option(s) {sorted(unknown)} (seed, kind, heads, mlp, keep_head, inputs)")
            return cls(**value)
        raise InputError(f"rotate: give True, a dict or a RotateSpec, got {value!r}")


class UnsupportedRotation(UnsupportedModelError):
    pass


def _unsupported(why: str) -> UnsupportedRotation:
    return UnsupportedRotation(f"unsupported: rotate: {why}")


# ---- the transforms (float64, on a tensor as stored) -------------------------------------------

Step = tuple[str, dict[str, Any]]  # (name in STEPS, arguments)


def _right(t: Tensor, m: Tensor) -> Tensor:
    return t @ m


def _reader(t: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """(out, in) W ← W diag(scale) Q."""
    return (t * scale) @ q


def _writer(t: Tensor, q: Tensor) -> Tensor:
    """(out=hidden, in) W ← Qᵀ W; a bias (hidden,) ← b Q."""
    return q.T @ t if t.dim() == 2 else t @ q


def _per_head_rows(t: Tensor, r: Tensor, rows: slice) -> Tensor:
    """The rows ``rows`` (heads × hd of them) of a weight (each head's block ← Rᵀ W_h) or a bias (b_h ← b_h R)."""
    hd = r.shape[0]
    out = t.clone()
    part = t[rows]
    if t.dim() == 2:
        out[rows] = torch.einsum("ji,hjc->hic", r, part.reshape(-1, hd, part.shape[1])).reshape(part.shape)
    else:
        out[rows] = (part.reshape(-1, hd) @ r).reshape(part.shape)
    return out


def _per_head_cols(t: Tensor, r: Tensor) -> Tensor:
    """(out, heads·hd) W: each head's columns ← W_h R."""
    hd = r.shape[0]
    return (t.reshape(t.shape[0], -1, hd) @ r).reshape(t.shape)


def _constant(t: Tensor, value: float) -> Tensor:
    return torch.full_like(t, value)


STEPS: dict[str, Callable[..., Tensor]] = {
    "right": _right, "reader": _reader, "writer": _writer, "head_rows": _per_head_rows,
    "head_cols": _per_head_cols, "constant": _constant,
}
ROW_WISE = {"right", "reader", "head_cols", "constant"}  # steps acting on each row alone: run in row chunks
_CHUNK = 1 << 22  # float64 elements per row chunk (32 MiB)


def apply_steps(t: Tensor, steps: list[Step]) -> Tensor:
    """The steps applied in float64, cast back to ``t``'s dtype; row by row chunks when every
    step acts on rows alone (an embedding of 128k × 4096 never exists whole in float64)."""
    def run(x: Tensor) -> Tensor:
        x = x.to(torch.float64)
        for name, kw in steps:
            x = STEPS[name](x, **kw)
        return x.to(t.dtype)

    if t.dim() == 2 and all(n in ROW_WISE for n, _ in steps) and t.numel() > _CHUNK:
        rows = max(1, _CHUNK // t.shape[1])
        return torch.cat([run(t[i : i + rows]) for i in range(0, t.shape[0], rows)])
    return run(t)


# ---- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    """The residual rotation Q applied online at the stream's ends (``keep_head``): the output of
    ``embedding`` ← · Q, the input of ``final_norm`` ← · Qᵀ (full module names); between them
    every block's readers and writers hold it fused."""

    embedding: str
    final_norm: str
    q: Orthogonal

    def record(self) -> dict[str, str]:
        return {"after": self.embedding, "before": self.final_norm}


def is_online(record: Any) -> bool:
    """Whether a folder's ``rotation`` record asks its loaders for an online rotation."""
    return isinstance(record, dict) and bool(record.get("online") or record.get("stream"))


@dataclass
class Rotation:
    """The rotation of one model: the steps of each stored tensor it changes."""

    q: Orthogonal | None  # the residual rotation (None: the stream as it is, ``inputs``)
    r: Orthogonal | None
    steps: dict[str, list[Step]] = field(default_factory=dict)  # state key -> steps
    sources: dict[str, str] = field(default_factory=dict)       # key not stored -> the stored key it comes from
    untie: bool = False
    online: dict[str, Orthogonal] = field(default_factory=dict)  # module in every block -> its input's rotation
    stream: Stream | None = None  # keep_head: the residual rotation applied online at the stream's ends

    def record(self) -> dict[str, Any]:
        rec = {"residual": None if self.q is None else self.q.record(), "heads": None if self.r is None else self.r.record(),
               "untied_head": self.untie}
        if self.online:
            rec["online"] = {m: o.record() for m, o in self.online.items()}
        if self.stream is not None:
            rec["stream"] = self.stream.record()
        return rec

    def wrap(self, store: Any) -> RotatedStore:
        return RotatedStore(store, self)


class RotatedStore:
    """A ``TensorStore`` whose tensors come out rotated (each one as it is read)."""

    def __init__(self, base: Any, rotation: Rotation):
        self.base, self.rotation = base, rotation
        self.files = base.files
        self.where = dict(base.where)
        for k, src in rotation.sources.items():
            self.where[k] = base.where[src]

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> Tensor:
        t = self.base.get(self.rotation.sources.get(name, name))
        steps = self.rotation.steps.get(name)
        return t if not steps else apply_steps(t, steps)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for k in self.keys():
            yield k, self.get(k)


def _is_rms(norm: nn.Module) -> bool:
    return type(norm).__name__.endswith("RMSNorm") and [n for n, _ in norm.named_parameters(recurse=False)] == ["weight"]


def why_not(skel: nn.Module) -> str | None:
    """Why ``skel``'s family cannot be rotated here (None when it can); from the config and the
    module tree alone."""
    from .. import skeleton as sk

    mt = getattr(skel.config, "model_type", None)
    if mt in REFUSED:
        return f"{mt}: {REFUSED[mt]}"
    if mt not in RESIDUAL:
        return f"{mt}: no residual-stream table for this family (quant/rotate.py RESIDUAL)"
    fam = RESIDUAL[mt]
    try:
        _, blocks = sk.blocks_of(skel)
    except ValueError as e:
        return str(e)
    norms = [p for p in patterns_for(skel.config) if p.kind == "norm"]
    for block in blocks:
        mods = dict(block.named_modules())
        known = {*fam.writers, *(c for p in norms for c in p.consumers)}
        for n, m in mods.items():
            if sk.is_linear(m) and n not in known:
                return f"{mt}: block linear {n} is neither a reader nor a writer of the residual stream in the tables"
            if "norm" in type(m).__name__.lower() and next(m.children(), None) is None \
                    and n not in {p.producer for p in norms} and n not in fam.inner_norms:
                return f"{mt}: block norm {n} is not one the tables fold"
        for p in norms:
            if p.producer not in mods or not all(c in mods for c in p.consumers):
                return f"{mt}: block lacks {p.producer} → {p.consumers}"
            if not _is_rms(mods[p.producer]):
                return f"{mt}: {p.producer} is {type(mods[p.producer]).__name__}, not an RMSNorm with a scale alone"
        if not all(w in mods for w in fam.writers):
            return f"{mt}: block lacks a writer of {fam.writers}"
    names = dict(skel.named_modules())
    if fam.final_norm not in names or not _is_rms(names[fam.final_norm]):
        return f"{mt}: no RMSNorm {fam.final_norm} before the head"
    if skel.get_input_embeddings() is None or skel.get_output_embeddings() is None:
        return f"{mt}: no input or output embedding"
    return None


def plan(skel: nn.Module, store: Any, spec: RotateSpec) -> Rotation:
    """The rotation of the model ``skel`` (on meta) whose tensors ``store`` holds. Refuses, as
    ``unsupported: rotate: <why>``, a family it does not handle, before any work. Reads the
    final norm's scale (to decide whether a tied head must be untied)."""
    from .. import skeleton as sk

    why = why_not(skel)
    if why is not None:
        raise _unsupported(why)
    cfg = skel.config
    fam = RESIDUAL[cfg.model_type]
    names = {m: n for n, m in skel.named_modules()}
    emb, head = names[skel.get_input_embeddings()], names[skel.get_output_embeddings()]
    hidden = skel.get_input_embeddings().weight.shape[1]
    q = None if spec.inputs else orthogonal(hidden, spec.seed, spec.kind)
    pats = patterns_for(cfg)
    norms = [p for p in pats if p.kind == "norm"]
    attn_v = next((p for p in pats if p.kind == "attn_v"), None)
    blocks_name, blocks = sk.blocks_of(skel)
    r = None
    if spec.heads:
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if attn_v is None:
            raise _unsupported(f"{cfg.model_type}: no v → o pattern for the head rotation (give heads=False)")
        r = orthogonal(int(hd), spec.seed + 1, spec.kind)
    rot = Rotation(q, r)
    if spec.mlp:
        if fam.hidden_reader is None or fam.hidden_reader not in dict(blocks[0].named_modules()):
            raise _unsupported(f"{cfg.model_type}: no linear reading the MLP's hidden width in the tables (give mlp=False)")
        inner = sk.linear_weight(dict(blocks[0].named_modules())[fam.hidden_reader]).shape[1]
        rot.online[fam.hidden_reader] = orthogonal(int(inner), spec.seed + 2, spec.kind)
    if spec.inputs:  # one rotation a block norm, for every linear reading its output
        for k, p in enumerate(norms):
            for c in p.consumers:
                rot.online[c] = orthogonal(hidden, spec.seed + 3 + k, spec.kind)
    steps = rot.steps

    def add(key: str, step: Step) -> None:
        steps.setdefault(key, []).append(step)

    def scale_of(key: str, offset: float) -> Tensor:
        return store.get(key).to(torch.float64) + offset

    def residual(bp: str, mods: dict[str, nn.Module], Q: Tensor) -> None:  # one block's fold and stream rotation
        for p in norms:
            gamma = scale_of(f"{bp}{p.producer}.weight", p.offset)
            add(f"{bp}{p.producer}.weight", ("constant", {"value": 1.0 - p.offset}))
            for c in p.consumers:
                add(f"{bp}{c}.weight", ("reader", {"q": Q, "scale": gamma}))
        for w in fam.writers:
            add(f"{bp}{w}.weight", ("writer", {"q": Q}))
            if getattr(mods[w], "bias", None) is not None:
                add(f"{bp}{w}.bias", ("writer", {"q": Q}))

    if spec.keep_head:  # (RotateSpec refuses it with inputs: q is the residual rotation here)
        rot.stream = Stream(emb, fam.final_norm, q)
    elif q is not None:
        add(f"{emb}.weight", ("right", {"m": q.matrix}))
    for i, block in enumerate(blocks):
        bp = f"{blocks_name}.{i}."
        mods = dict(block.named_modules())
        if q is not None:  # inputs: the stream, the norms, the embedding and the head as they are
            residual(bp, mods, q.matrix)
        if r is not None and attn_v is not None:
            R = r.matrix
            o = attn_v.consumers[0]
            o_in = sk.linear_weight(mods[o]).shape[1]
            p_out = sk.linear_weight(mods[attn_v.producer]).shape[0]
            rows = PRODUCER_ROWS[attn_v.rows](p_out, o_in) if attn_v.rows else slice(0, p_out)
            add(f"{bp}{attn_v.producer}.weight", ("head_rows", {"r": R, "rows": rows}))
            if getattr(mods[attn_v.producer], "bias", None) is not None:
                add(f"{bp}{attn_v.producer}.bias", ("head_rows", {"r": R, "rows": rows}))
            add(f"{bp}{o}.weight", ("head_cols", {"r": R}))
        for m, h in rot.online.items():  # y = x Wᵀ = (x H)(W H)ᵀ: the stored W H reads the input rotated online
            add(f"{bp}{m}.weight", ("right", {"m": h.matrix}))
    if spec.keep_head:  # the final norm reads the stream un-rotated (online): it, the head and the embedding stay
        log.info("rotate: the embedding, final norm and head as stored; the stream rotated online after %s, "
                 "back before %s", emb, fam.final_norm)
    elif q is not None:
        _fold_head(rot, store, cfg, fam, emb, head, next((p.offset for p in norms), 0.0))
    log.info("rotate: residual %s%s%s%s", None if q is None else q.record(), "" if r is None else f", heads {r.record()}",
             "".join(f", online before {m} {h.record()}" for m, h in rot.online.items()),
             "" if rot.stream is None else ", online at the stream's ends")
    return rot


def _fold_head(rot: Rotation, store: Any, cfg: Any, fam: Residual, emb: str, head: str, offset: float) -> None:
    """The final norm's scale folded into the head, which reads the rotated stream: W diag(γ) Q; a
    tied head is untied unless γ = 1 (E Q then serves both)."""
    g_final = store.get(f"{fam.final_norm}.weight").to(torch.float64) + offset
    rot.steps.setdefault(f"{fam.final_norm}.weight", []).append(("constant", {"value": 1.0 - offset}))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied and bool((g_final == 1).all()):
        log.info("rotate: the final norm's scale is 1: the tied embedding E Q serves the head too")
        return
    if tied:
        rot.untie = True
        log.info("rotate: the head reads E diag(γ_final) Q, the embedding E Q: the head is untied (its own tensor)")
    if f"{head}.weight" not in store.where:
        rot.sources[f"{head}.weight"] = f"{emb}.weight"
    rot.steps.setdefault(f"{head}.weight", []).append(("reader", {"q": rot.q.matrix, "scale": g_final}))


# ---- online rotations: what a loader applies ---------------------------------------------------

def online_of(record: Any) -> dict[str, Orthogonal]:
    """{module in every block: the rotation of its input} of a folder's ``rotation`` record
    (empty when the record is None or names no online rotation); refuses a malformed one."""
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise InputError(f"rotation record: an object expected, got {type(record).__name__}")
    online = record.get("online") or {}
    if not isinstance(online, dict) or not all(isinstance(m, str) and isinstance(r, dict) for m, r in online.items()):
        raise InputError(f"rotation record: 'online' must map a module name to its rotation, got {online!r}")
    return {m: Orthogonal.of_record(r) for m, r in online.items()}


def online_modules(model: nn.Module, online: dict[str, Orthogonal]) -> dict[str, Orthogonal]:
    """{full module name: the rotation of its input} over every block of ``model``; a module
    missing from a block, or whose input width is not H's order, is refused."""
    from .. import skeleton as sk

    if not online:
        return {}
    blocks_name, blocks = sk.blocks_of(model)
    out = {}
    for i, block in enumerate(blocks):
        mods = dict(block.named_modules())
        for m, h in online.items():
            if m not in mods:
                raise InputError(f"online rotation: block {i} has no module {m!r}")
            width = getattr(mods[m], "in_features", None)
            if width is not None and width != h.matrix.shape[0]:
                raise InputError(f"online rotation: {m} of block {i} reads {width} features, the rotation has order "
                                 f"{h.matrix.shape[0]}")
            out[f"{blocks_name}.{i}.{m}"] = h
    return out


def stream_of(record: Any) -> Stream | None:
    """The online rotation at the stream's ends (``keep_head``) of a folder's ``rotation`` record,
    or None; refuses a malformed one."""
    if not isinstance(record, dict) or not record.get("stream"):
        return None
    st = record["stream"]
    if not isinstance(st, dict) or not all(isinstance(st.get(k), str) for k in ("after", "before")) \
            or not isinstance(record.get("residual"), dict):
        raise InputError(f"rotation record: 'stream' must name the modules 'after' and 'before' which the residual "
                         f"rotation is applied, beside a 'residual' rotation; got {st!r}")
    return Stream(st["after"], st["before"], Orthogonal.of_record(record["residual"]))


def _check_stream(model: nn.Module, stream: Stream) -> None:
    names = dict(model.named_modules())
    n = stream.q.matrix.shape[0]
    for m in (stream.embedding, stream.final_norm):
        if m not in names:
            raise InputError(f"online rotation: the model has no module {m!r}")
    if model.get_input_embeddings() is not names[stream.embedding]:
        raise InputError(f"online rotation: {stream.embedding} is not the model's input embedding")
    width = model.get_input_embeddings().weight.shape[-1]
    if width != n:
        raise InputError(f"online rotation: the stream is {width} wide, the rotation has order {n}")


def install_online(model: nn.Module, online: dict[str, Orthogonal], stream: Stream | None = None) -> dict[str, Any]:
    """Rotate the input of each block's module named in ``online`` (x ← x H) by a forward
    pre-hook that runs before any other; with ``stream`` the embedding's output (h ← h Q, a forward
    hook) and the final norm's input (h ← h Qᵀ, a pre-hook). Returns {full module name: its hook's
    handle}. Everything is checked (:func:`online_modules`) before any hook is added."""
    targets = online_modules(model, online)
    if stream is not None:
        _check_stream(model, stream)

    def hook(h: Orthogonal) -> Callable[..., tuple]:
        return lambda _mod, args: (h.right(args[0]), *args[1:])

    handles = {n: model.get_submodule(n).register_forward_pre_hook(hook(h), prepend=True) for n, h in targets.items()}
    if stream is not None:
        q = stream.q
        handles[stream.embedding] = model.get_submodule(stream.embedding).register_forward_hook(
            lambda _mod, _args, out: q.right(out), prepend=True)
        handles[stream.final_norm] = model.get_submodule(stream.final_norm).register_forward_pre_hook(
            lambda _mod, args: (q.right(args[0], inverse=True), *args[1:]), prepend=True)
    return handles


def _stream_linears(model: nn.Module) -> tuple[list[str], list[str]]:
    """(readers, writers) of the residual stream: full module names over every block."""
    from .. import skeleton as sk

    fam = RESIDUAL[model.config.model_type]
    norms = [p for p in patterns_for(model.config) if p.kind == "norm"]
    blocks_name, blocks = sk.blocks_of(model)
    readers = [f"{blocks_name}.{i}.{c}" for i in range(len(blocks)) for p in norms for c in p.consumers]
    writers = [f"{blocks_name}.{i}.{w}" for i in range(len(blocks)) for w in fam.writers]
    return readers, writers


def unrotation(model: nn.Module, online: dict[str, Orthogonal], stream: Stream | None = None) -> dict[str, list[Step]]:
    """{state key: the steps that fold the online rotations back into that stored tensor}, so that
    the model reads plain inputs with no hook: a linear reading x H stores W H, which becomes
    W H Hᵀ; with ``stream`` every reader of the stream W Q → W Q Qᵀ and every writer Qᵀ W → Q Qᵀ W
    (its bias b Q → b Q Qᵀ), which leaves the fused rotations (heads) and the folded norm scales in
    place: a plain model of the same architecture, embedding and head as stored."""
    steps: dict[str, list[Step]] = {}
    for n, h in online_modules(model, online).items():
        steps.setdefault(f"{n}.weight", []).append(("right", {"m": h.matrix.T}))
    if stream is not None:
        _check_stream(model, stream)
        qt = stream.q.matrix.T
        readers, writers = _stream_linears(model)
        for n in readers:
            steps.setdefault(f"{n}.weight", []).append(("right", {"m": qt}))
        for n in writers:
            steps.setdefault(f"{n}.weight", []).append(("writer", {"q": qt}))
            if getattr(model.get_submodule(n), "bias", None) is not None:
                steps.setdefault(f"{n}.bias", []).append(("writer", {"q": qt}))
    return steps


ONLINE_NOTE = ("an online rotation ({where} multiplied by a Hadamard matrix in the forward), "
               "which this format cannot express")


def online_where(online: dict[str, Orthogonal], stream: Stream | None) -> str:
    """Where a model's online rotations act, in words (for :data:`ONLINE_NOTE`)."""
    parts = [f"the input of {', '.join(sorted({n.rpartition('.')[2] for n in online}))}"] if online else []
    if stream is not None:
        parts.append(f"the residual stream after {stream.embedding} and before {stream.final_norm}")
    return "; ".join(parts)
