"""AWQ scale folding: one scale per group of linears, folded into the op that feeds them.

AWQ quantizes W·diag(s) and needs the input divided by s. When the input x of a group of
linears (q/k/v, gate/up) is the output of a norm  y = γ ⊙ x̂ (+ β),  dividing γ (and β) by s
divides the input of all of them by s, so no scale has to be stored or applied at run time:

    W_l x = (W_l·diag(s)) (x / s)   for every consumer l, with  γ' = γ / s,  β' = β / s.

Every consumer of that norm must take the same s, so s is searched for the group at once
(the paper's grouped search: the error summed over q, k and v). The same holds when the
producer is a linear followed by a channel-wise op: v_proj → attention → o_proj (attention
mixes tokens, not channels, and each output channel of o's input is one channel of v for one
query head) and up_proj → (act(gate) ⊙ up) → down_proj: the producer's output rows are divided
by s and the consumer's columns multiplied by s. With grouped-query attention o_proj sees each
kv channel once per query head of its group, so its s is tied across those heads.

The Stats of the consumers are rewritten for the scaled input (H' = D⁻¹HD⁻¹, |x|/s), marked
``folded``, and the AWQ codec then only runs its clipping search on the scaled weights.

Patterns (``PATTERNS``) are data: producer → consumers, by module name inside a block. A
pattern applies when its modules exist, every consumer is quantized by AWQ with ``fold``
on, the shapes fit, and (for a norm) the norm's output is checked to scale as γ does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..moe import fold_patterns
from ..tensor import Stats
from .awq import search_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldPattern:
    """``producer`` (a norm, or a linear whose output rows are scaled) feeds ``consumers``."""

    producer: str
    consumers: tuple[str, ...]
    kind: str  # "norm" | "linear" | "attn_v" (v → o through attention, GQA-tied)


PATTERNS: list[FoldPattern] = [
    FoldPattern("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
    FoldPattern("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
    FoldPattern("self_attn.v_proj", ("self_attn.o_proj",), "attn_v"),
    FoldPattern("mlp.up_proj", ("mlp.down_proj",), "linear"),
]


@dataclass
class FoldedStats(Stats):
    """Stats of the input x/s of linears whose weights already hold diag(s)."""

    folded: bool = True


def scaled_stats(st: Stats, s: Tensor) -> FoldedStats:
    """The Stats of x / s from those of x."""
    s64 = s.to(torch.float64)
    return FoldedStats(
        gram=None if st.gram is None else st.gram / (s64[:, None] * s64[None, :]),
        abs_mean=None if st.abs_mean is None else st.abs_mean / s64,
        sq_mean=None if st.sq_mean is None else st.sq_mean / (s64 * s64),
        n=st.n,
    )


def _norm_scales(norm: nn.Module, width: int) -> bool:
    """True when dividing the norm's affine parameters by s divides its output by s (checked
    on a random input): RMSNorm/LayerNorm with a plain γ, not Gemma's (1 + γ)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.shape != (width,):
        return False
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(device=w.device, dtype=w.dtype)
    s = torch.linspace(0.5, 2.0, width, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        ref = norm(x)
        saved = {k: p.detach().clone() for k, p in norm.named_parameters(recurse=False)}
        for p in norm.parameters(recurse=False):
            p.div_(s)
        got = norm(x)
        for k, p in norm.named_parameters(recurse=False):
            p.copy_(saved[k])
    return bool(torch.allclose(got * s, ref, rtol=1e-4, atol=1e-5))


def _gqa_expand(attn: nn.Module, v_out: int, o_in: int) -> Tensor | None:
    """Index (o_in,) of the v channel behind each input channel of o_proj, or None."""
    if v_out == o_in:
        return torch.arange(o_in)
    hd = getattr(attn, "head_dim", None)
    if not hd or o_in % v_out or v_out % hd:
        return None
    rep = o_in // v_out
    c = torch.arange(o_in)
    return (c // hd // rep) * hd + c % hd  # query head h reads kv head h // rep


def _scale_rows(lin: nn.Module, s: Tensor) -> None:
    """Divide a linear's output channels (weight rows, bias) by s."""
    from ..skeleton import linear_weight, set_linear_weight

    set_linear_weight(lin, linear_weight(lin) / s[:, None])
    if getattr(lin, "bias", None) is not None:
        lin.bias.data.div_(s.to(lin.bias.dtype))


def apply_fold(mods: dict[str, nn.Module], prefix: str, pat: FoldPattern, s: Tensor,
               expand: Tensor | None = None) -> dict[str, Tensor]:
    """Consumers' weights ← W·diag(s); the producer's output ← output / s (norm γ, β or the
    producer linear's rows and bias; with ``expand`` the producer's channel expand[c] carries
    s[c]). mods: the block's modules by relative name. Returns the changed non-weight tensors."""
    from ..skeleton import linear_weight, set_linear_weight

    changed: dict[str, Tensor] = {}
    prod = mods[pat.producer]
    for c in pat.consumers:
        set_linear_weight(mods[c], linear_weight(mods[c]) * s)
    if pat.kind == "norm":
        with torch.no_grad():
            for k, p in prod.named_parameters(recurse=False):
                p.div_(s.to(p.dtype))
                changed[f"{prefix}{pat.producer}.{k}"] = p.detach().clone()
    else:
        s_prod = s if expand is None else torch.ones(linear_weight(prod).shape[0], device=s.device).index_copy_(0, expand, s)
        _scale_rows(prod, s_prod)
        if getattr(prod, "bias", None) is not None:
            changed[f"{prefix}{pat.producer}.bias"] = prod.bias.detach().clone()
    return changed


def fold_block(codec: Any, block: nn.Module, prefix: str, params: dict[str, dict], stats: dict[str, Stats]) -> dict[str, Tensor]:
    """Fold AWQ scales inside one block, in place: consumer weights ← W·diag(s), producer ←
    producer / s, ``stats`` of the consumers ← those of x/s (FoldedStats). ``params``: the AWQ
    rule of each linear of the block (full names). Returns {full state key: tensor} of the
    tensors outside the encoded linear weights that changed (norm γ/β, producer biases)."""
    from ..skeleton import linear_weight

    changed: dict[str, Tensor] = {}
    parsed = {n: codec.parse(p) for n, p in params.items()}  # name -> (spec, opts, tname)
    mods = dict(block.named_modules())
    for pat in PATTERNS + fold_patterns(block):  # an MoE block adds its per-expert ones
        names = [prefix + c for c in pat.consumers]
        if pat.producer not in mods or not all(c in mods for c in pat.consumers):
            continue
        if not all(n in parsed and parsed[n][1]["fold"] for n in names):
            continue
        st = stats.get(names[0])
        if st is None or st.gram is None or st.abs_mean is None or any(stats.get(n) is not st for n in names):
            continue  # consumers must read one and the same input
        if isinstance(st, FoldedStats):
            continue
        prod = mods[pat.producer]
        ws = [linear_weight(mods[c]) for c in pat.consumers]
        width = ws[0].shape[1]
        act, expand = st.abs_mean.float(), None
        if pat.kind == "norm" and not _norm_scales(prod, width):
            continue
        if pat.kind in ("linear", "attn_v"):
            if not hasattr(prod, "weight") or prod.weight.dim() != 2:
                continue
            p_out = linear_weight(prod).shape[0]
            if pat.kind == "attn_v":
                expand = _gqa_expand(mods[pat.producer.rsplit(".", 1)[0]], p_out, width)
                if expand is None:
                    continue
                expand = expand.to(act.device)
                # one scale per v channel: the mean |x| over the query heads that read it
                act = torch.zeros(p_out, device=act.device).index_add_(0, expand, act) / torch.bincount(expand, minlength=p_out)
            elif p_out != width:
                continue
        H = st.gram.to(torch.float32) / max(1, st.n)
        opts = parsed[names[0]][1]
        s, alpha, err = search_scale(ws, [parsed[n][0] for n in names], H, act, int(opts["n_grid"]), expand)
        log.debug("awq fold %s%s → %s: alpha=%.2f error %.4g", prefix, pat.producer, pat.consumers, alpha, err)
        changed.update(apply_fold(mods, prefix, pat, s, expand))
        folded = scaled_stats(st, s)
        for n in names:
            stats[n] = folded
    return changed
