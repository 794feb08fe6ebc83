"""AWQ (Lin et al., 2023): activation-aware weight quantization.

Weights that meet large activations matter more. AWQ scales input channel j of W by
s_j = (mean_t |x_tj|)^α (normalised so that √(max·min) = 1), quantizes W·diag(s) and
divides the input by s at run time:  y = Q(W·diag(s)) · (diag(s)⁻¹ x).  The exponent α is
searched on a grid in [0, 1) to minimise the layer's output error on calibration data; α = 0
is plain RTN, so the search never does worse than RTN on that data. A clipping search then
shrinks each group's range to minimise the same output error.

The output error of a weight error ΔW on inputs X is ‖ΔW X‖² = tr(ΔW H ΔWᵀ) with
H = Σ x xᵀ (Stats.gram), so both searches are exact on the calibration tokens without keeping
them. The clipping search uses, per group, the diagonal block of H (AWQ's auto-clip ignores
cross-group terms too).

Storage. Inside the sequential runner the scales are **folded** (:mod:`.fold`): where the
input of a group of linears comes from an RMSNorm/LayerNorm (q/k/v, gate/up) or from another
linear through a channel-wise op (v→o, up→down), one scale s is searched for the whole group
(as in the paper's grouped search), diag(1/s) is folded into the preceding op and diag(s) into
the weights, and nothing extra is stored. A linear that cannot be folded (called alone, e.g.
``codec.encode``, or whose neighbours are not all AWQ) keeps its own s **stored** with the
tensor as ``in_scale`` (float16, 16/out extra bits per weight), applied by QuantLinear;
``decode`` then returns the effective weight Ŵ·diag(1/s). Folding costs a little fidelity (the
shared scale of q/k/v and gate/up is less free than one per layer) and saves the stored scales;
``bench/quant.py`` measures both.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..tensor import Stats, register
from . import grids
from .codec import QuantCodec, QWeight
from .grids import GridSpec

log = logging.getLogger(__name__)


def output_error(dW: Tensor, H: Tensor) -> float:
    """tr(ΔW H ΔWᵀ) = ‖ΔW X‖² for H = X Xᵀ;  dW (out, in), H (in, in)."""
    return float(((dW @ H) * dW).sum())


def channel_scale(act: Tensor, alpha: float) -> Tensor:
    """s = act^α, clamped and normalised to √(max·min) = 1, rounded to float16 as stored.  (in,)"""
    s = act.to(torch.float32).clamp_min(1e-4).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.to(torch.float16).to(torch.float32)


def search_scale(ws: list[Tensor], specs: list[GridSpec], H: Tensor, act: Tensor, n_grid: int,
                 expand: Tensor | None = None) -> tuple[Tensor, float, float]:
    """Grid search of α for one scale s = act^α shared by linears that read the same input:
    minimise Σ_l ‖(W_l − Q(W_l·diag(s))·diag(1/s)) X‖².  ws: each (out_l, in); H (in, in); act
    (in,) — or (k,) with ``expand`` (in,) mapping each input channel to its entry of act (a
    scale tied across channels, e.g. GQA heads). α = 0 (s = 1) is RTN. Returns (s (in,), α, error)."""
    search = [GridSpec(**{**sp.__dict__, "range": "minmax" if sp.searched else sp.range}) for sp in specs]
    best = (float("inf"), 0.0, torch.ones(H.shape[0], device=H.device))
    for alpha in (i / n_grid for i in range(n_grid)):
        s = channel_scale(act, alpha)
        if expand is not None:
            s = s[expand]
        e = sum(output_error(w - grids.fake_quantize(w * s, sp) / s, H) for w, sp in zip(ws, search))
        if e < best[0]:
            best = (e, alpha, s)
    err, alpha, s = best
    return s, alpha, err


def clip_quantize(W: Tensor, H: Tensor, spec: GridSpec, s: Tensor | None, clip: bool) -> QWeight:
    """Quantize W·diag(s) (W itself when s is None: already scaled), groups fitted by the
    Hessian-weighted clipping search (``clip``) or by ``spec.range``."""
    Ws = W if s is None else W * s
    final = GridSpec(**{**spec.__dict__, "range": spec.range if spec.searched else "mse"}) if clip else spec
    loss = grids.group_hessian_loss(H, spec.group_size, s) if clip else None
    wg = grids.group_weights(Ws, spec.group_size)
    p = grids.fit(wg, final, loss)
    codes = grids.ungroup(grids.quantize(wg, p, spec), W.shape)
    return QWeight(codes=codes, params=p, in_scale=s)


def gptq_codes(W: Tensor, stats: Stats, spec: GridSpec, s: Tensor | None, clip: bool) -> QWeight:
    """Codes of W·diag(s) (W itself when s is None: already scaled, ``stats`` those of x/s) chosen by
    GPTQ against the Gram matrix of x/s, with GPTQ's own options; groups fitted by the
    Hessian-weighted clipping search (``clip``) or by ``spec.range``. The Hessian is prepared once
    per shared input."""
    from .fold import scaled_stats
    from .gptq import GPTQ, Hessian, gptq_quantize

    o = GPTQ.options
    final = GridSpec(**{**spec.__dict__, "range": spec.range if spec.searched else "mse"}) if clip else spec
    st = stats if s is None else scaled_stats(stats, s)
    hs = Hessian.of(st, float(o["damp"]), bool(o["act_order"]))
    q = gptq_quantize(W if s is None else W * s, hs, final, damp=o["damp"], act_order=o["act_order"],
                      static_groups=o["static_groups"], block_size=o["block_size"])
    q.in_scale = s
    return q


def awq_quantize(W: Tensor, stats: Stats, spec: GridSpec, *, n_grid: int = 20, clip: bool = True,
                 gptq: bool = False) -> QWeight:
    """Search α for s = act^α, then the clipping ranges; quantize W·diag(s) (its codes rounded, or
    chosen by GPTQ with ``gptq``). When the runner has folded the scale already (``stats.folded``:
    W is W·diag(s), the Stats those of x/s) only the codes are left and no scale is stored."""
    if stats.abs_mean is None or stats.gram is None:
        raise InputError("awq needs Stats.abs_mean and Stats.gram of the layer inputs")
    H = stats.gram.to(torch.float32) / max(1, stats.n)  # (in, in)
    if getattr(stats, "folded", False):
        return gptq_codes(W, stats, spec, None, clip) if gptq else clip_quantize(W, H, spec, None, clip)
    s, alpha, err = search_scale([W], [spec], H, stats.abs_mean, n_grid)
    log.debug("awq: alpha=%.2f output error %.4g", alpha, err)
    return gptq_codes(W, stats, spec, s, clip) if gptq else clip_quantize(W, H, spec, s, clip)


@register("awq")
class AWQ(QuantCodec):
    """``method: awq`` — params: the grid's plus ``n_grid`` (20 values of α), ``clip`` (true:
    Hessian-weighted clipping search after the scale search: ``range`` if it is a search (``mse2``),
    else ``mse``), ``fold``
    (true: fold the scales into the preceding norm/linear where the block allows, see :mod:`.fold`)
    and ``gptq`` (true: after the scales, the codes are chosen by GPTQ's column loop with its error
    feedback, on the scaled weights against the Gram matrix of x/s, instead of rounded)."""

    needs_stats = True
    gram = True
    gram_float32 = True  # reads the Gram matrix in float32 only, once its scales are folded (prepare_block)
    options = {"n_grid": 20, "clip": True, "fold": True, "gptq": False}

    def prepare_block(self, block: torch.nn.Module, prefix: str, params: dict[str, dict],
                      stats: dict[str, Stats], config: Any = None) -> dict[str, Tensor]:
        """Runner hook, before the block's linears are encoded: fold shared scales by the
        patterns of the model's family (:mod:`.fold`)."""
        from .fold import fold_block, patterns_for

        return fold_block(self, block, prefix, params, stats, patterns_for(config))

    def quantize(self, w: Tensor, stats: Stats | None, spec: GridSpec, *, n_grid: int, clip: bool,
                 fold: bool = True, gptq: bool = False) -> QWeight:
        if int(n_grid) < 1:
            raise InputError("awq: n_grid must be ≥ 1")
        assert stats is not None
        if stats.abs_mean is not None and stats.abs_mean.shape[0] != w.shape[1]:
            raise InputError(f"awq: statistics of {stats.abs_mean.shape[0]} inputs do not fit weight {tuple(w.shape)}")
        return awq_quantize(w, stats, spec, n_grid=int(n_grid), clip=bool(clip), gptq=bool(gptq))


@register("awq+gptq")
class AWQGPTQ(AWQ):
    """``method: awq+gptq`` — AWQ's scales (searched and folded as for ``awq``), then GPTQ's column
    loop choosing the codes of the scaled weights: ``awq`` with ``gptq: true``."""

    options = {**AWQ.options, "gptq": True}
