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

Patterns are data, one tuple per family keyed by ``model_type`` (``FOLDS``; Llama's by
default): producer → consumers, by module name inside a block, with a norm's offset (Gemma's
x̂·(1 + γ)), the rows of a fused producer (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn)
and the config values a pattern needs (OPT: pre-norm, relu). A pattern applies when its modules
exist, every consumer is quantized by AWQ with ``fold`` on, the shapes fit, and (for a norm)
the norm's output is checked to scale as the fold assumes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..moe import fold_patterns
from ..tensor import Stats
from .awq import search_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldPattern:
    """``producer`` (a norm, or a linear whose output rows are scaled) feeds ``consumers``.

    ``offset``: a norm computing x̂·(offset + γ) (Gemma's 1 + γ) folds as offset + γ' = (offset + γ)/s.
    ``rows``: for a fused producer, which of its output rows feed the consumers (a key of
    :data:`PRODUCER_ROWS`: the v part of a fused qkv, the up half of a fused gate_up)."""

    producer: str
    consumers: tuple[str, ...]
    kind: str  # "norm" | "linear" | "attn_v" (v → o through attention, GQA-tied)
    offset: float = 0.0
    rows: str | None = None
    when: tuple[tuple[str, Any], ...] = ()  # config values the pattern needs: (attribute, value) pairs


def _v_of_qkv(p_out: int, c_in: int) -> slice:
    """q, k, v stacked: q has the consumer's width (o's input), k and v the rest in halves."""
    return slice(c_in + (p_out - c_in) // 2, p_out)


def _second_half(p_out: int, c_in: int) -> slice:
    return slice(p_out // 2, p_out)


# rows of a fused producer that feed the consumers: (producer rows, consumer width) -> slice
PRODUCER_ROWS: dict[str, Callable[[int, int], slice]] = {"v_of_qkv": _v_of_qkv, "second_half": _second_half}

# Llama's block, which Mistral, Qwen2 (q/k/v biases: the v bias folds with its rows) and Qwen3
# (q/k norms act after q/k, untouched) share; up → down holds because act(gate) ⊙ up is channel-wise in up
_LLAMA = (
    FoldPattern("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
    FoldPattern("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
    FoldPattern("self_attn.v_proj", ("self_attn.o_proj",), "attn_v"),
    FoldPattern("mlp.up_proj", ("mlp.down_proj",), "linear"),
)
# Gemma 2/3: norms scale by (1 + γ); the MLP reads pre_feedforward_layernorm (post_attention_layernorm
# and post_feedforward_layernorm act on the outputs of o_proj and down_proj, feeding no linear)
_GEMMA = (
    FoldPattern("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", offset=1.0),
    FoldPattern("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm", offset=1.0),
    FoldPattern("self_attn.v_proj", ("self_attn.o_proj",), "attn_v"),
    FoldPattern("mlp.up_proj", ("mlp.down_proj",), "linear"),
)
# Gemma (1): (1 + γ) norms like Gemma 2/3, but Llama's block (the MLP reads post_attention_layernorm)
_GEMMA1 = (
    FoldPattern("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", offset=1.0),
    FoldPattern("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm", offset=1.0),
    FoldPattern("self_attn.v_proj", ("self_attn.o_proj",), "attn_v"),
    FoldPattern("mlp.up_proj", ("mlp.down_proj",), "linear"),
)
# Phi-3: fused qkv_proj and gate_up_proj (gate rows first, up rows second)
_PHI3 = (
    FoldPattern("input_layernorm", ("self_attn.qkv_proj",), "norm"),
    FoldPattern("post_attention_layernorm", ("mlp.gate_up_proj",), "norm"),
    FoldPattern("self_attn.qkv_proj", ("self_attn.o_proj",), "attn_v", rows="v_of_qkv"),
    FoldPattern("mlp.gate_up_proj", ("mlp.down_proj",), "linear", rows="second_half"),
)
# GPT-2: Conv1D layers (weights (in, out)), LayerNorms with β, fused c_attn; c_fc → gelu → c_proj
# does not fold (gelu(x/s) ≠ gelu(x)/s)
_GPT2 = (
    FoldPattern("ln_1", ("attn.c_attn",), "norm"),
    FoldPattern("ln_2", ("mlp.c_fc",), "norm"),
    FoldPattern("attn.c_attn", ("attn.c_proj",), "attn_v", rows="v_of_qkv"),
)
# OPT: LayerNorms with β; fc1 → relu → fc2 folds because relu(x/s) = relu(x)/s for s > 0
_OPT = (
    FoldPattern("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm",
                when=(("do_layer_norm_before", True),)),  # post-norm OPT (350m): the norm follows attention
    FoldPattern("final_layer_norm", ("fc1",), "norm", when=(("do_layer_norm_before", True),)),
    FoldPattern("self_attn.v_proj", ("self_attn.out_proj",), "attn_v"),
    FoldPattern("fc1", ("fc2",), "linear", when=(("activation_function", "relu"),)),
)
# per ``model_type``; a model type not listed gets Llama's (a pattern applies only where its
# modules exist and its checks pass, so it never folds wrongly, at worst not at all)
FOLDS: dict[str, tuple[FoldPattern, ...]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma": _GEMMA1, "gemma2": _GEMMA, "gemma3_text": _GEMMA,
    "phi3": _PHI3, "gpt2": _GPT2, "opt": _OPT,
}
PATTERNS = _LLAMA  # the default


def patterns_for(config: Any) -> tuple[FoldPattern, ...]:
    """The fold patterns of a model's family (``config.model_type``) that its config allows."""
    pats = FOLDS.get(getattr(config, "model_type", None), PATTERNS)
    return tuple(p for p in pats if all(getattr(config, k, None) == v for k, v in p.when))


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


def _fold_norm(norm: nn.Module, s: Tensor, offset: float) -> None:
    """Divide the norm's output by s: γ ← (offset + γ)/s − offset, any other parameter (β) ← β/s."""
    with torch.no_grad():
        for k, p in norm.named_parameters(recurse=False):
            sp = s.to(p.dtype)
            if k == "weight":
                p.copy_((p + offset) / sp - offset)
            else:
                p.div_(sp)


def _norm_scales(norm: nn.Module, width: int, offset: float) -> bool:
    """True when :func:`_fold_norm` divides the norm's output by s (checked on a random input):
    a plain γ with offset 0, Gemma's (1 + γ) with offset 1."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.shape != (width,):
        return False
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(device=w.device, dtype=w.dtype)
    s = torch.linspace(0.5, 2.0, width, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        ref = norm(x)
        saved = {k: p.detach().clone() for k, p in norm.named_parameters(recurse=False)}
        _fold_norm(norm, s, offset)
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


def _producer_rows(pat: FoldPattern, p_out: int, c_in: int) -> slice:
    return PRODUCER_ROWS[pat.rows](p_out, c_in) if pat.rows else slice(0, p_out)


def apply_fold(mods: dict[str, nn.Module], prefix: str, pat: FoldPattern, s: Tensor,
               expand: Tensor | None = None) -> dict[str, Tensor]:
    """Consumers' weights ← W·diag(s); the producer's output ← output / s (norm γ, β or the
    producer linear's rows and bias, those of ``pat.rows`` for a fused one; with ``expand``
    the producer's channel expand[c] carries s[c]). mods: the block's modules by relative name.
    Returns the changed non-weight tensors."""
    from ..skeleton import linear_weight, set_linear_weight

    changed: dict[str, Tensor] = {}
    prod = mods[pat.producer]
    width = linear_weight(mods[pat.consumers[0]]).shape[1]
    for c in pat.consumers:
        set_linear_weight(mods[c], linear_weight(mods[c]) * s)
    if pat.kind == "norm":
        _fold_norm(prod, s, pat.offset)
        for k, p in prod.named_parameters(recurse=False):
            changed[f"{prefix}{pat.producer}.{k}"] = p.detach().clone()
    else:
        p_out = linear_weight(prod).shape[0]
        rows = _producer_rows(pat, p_out, width)
        part = s if expand is None else torch.ones(rows.stop - rows.start, device=s.device).index_copy_(0, expand, s)
        s_prod = torch.ones(p_out, device=s.device)
        s_prod[rows] = part
        _scale_rows(prod, s_prod)
        if getattr(prod, "bias", None) is not None:
            changed[f"{prefix}{pat.producer}.bias"] = prod.bias.detach().clone()
    return changed


def fold_block(codec: Any, block: nn.Module, prefix: str, params: dict[str, dict], stats: dict[str, Stats],
               patterns: tuple[FoldPattern, ...] = PATTERNS) -> dict[str, Tensor]:
    """Fold AWQ scales inside one block, in place: consumer weights ← W·diag(s), producer ←
    producer / s, ``stats`` of the consumers ← those of x/s (FoldedStats). ``params``: the AWQ
    rule of each linear of the block (full names); ``patterns``: the family's
    (:func:`patterns_for`). Returns {full state key: tensor} of the tensors outside the encoded
    linear weights that changed (norm γ/β, producer biases)."""
    from ..skeleton import linear_weight

    changed: dict[str, Tensor] = {}
    parsed = {n: codec.parse(p) for n, p in params.items()}  # name -> (spec, opts, tname)
    mods = dict(block.named_modules())
    for pat in (*patterns, *fold_patterns(block)):  # an MoE block adds its per-expert ones
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
        if pat.kind == "norm" and not _norm_scales(prod, width, pat.offset):
            continue
        if pat.kind in ("linear", "attn_v"):
            if not hasattr(prod, "weight") or prod.weight.dim() != 2:
                continue
            rows = _producer_rows(pat, linear_weight(prod).shape[0], width)
            p_out = rows.stop - rows.start
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
