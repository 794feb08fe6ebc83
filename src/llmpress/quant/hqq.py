"""HQQ-like calibration-free optimiser (Badri & Shaji, 2023, "Half-Quadratic Quantization").

Instead of the squared error, HQQ minimises a sparsity-promoting ‖W − Ŵ‖_p^p (p < 1), which
tolerates a few large outlier errors in exchange for a better fit of the bulk. With the scale
s fixed by min–max, it optimises the offset m of each group by half-quadratic splitting:
introduce We ≈ W − Ŵ and alternate

    We ← shrink_p(W − Ŵ, β)                        (proximal step of |·|^p)
    m  ← mean_group(W − We − q·s),  q = clamp(round((W − m)/s))
    β  ← κ·β

where shrink_p(x, β) = sign(x)·max(|x| − |x|^(p−1)/β, 0). We keep the offset of least
mean |W − Ŵ| seen. Only the asym grid has an offset to optimise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ..tensor import Stats, register
from . import grids
from .codec import QuantCodec, QWeight
from .grids import GridSpec


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def hqq_quantize(W: Tensor, spec: GridSpec, *, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                 iters: int = 20) -> QWeight:
    if spec.grid_name != "asym":
        raise InputError(f"hqq optimises the offset of the asym grid; got grid {spec.grid_name!r}")
    wg = grids.group_weights(W, spec.group_size)  # (R, G, S)
    pad = torch.isnan(wg)
    n = (~pad).sum(-1, keepdim=True).clamp_min(1)
    x = wg.masked_fill(pad, 0.0)
    p = grids.fit(wg, spec)
    s, m = p["scale"], p["offset"]
    hi = 2**spec.bits - 1

    def err_of(m: Tensor) -> Tensor:
        q = torch.round((x - m) / s).clamp_(0, hi)
        return q, (x - (q * s + m)).masked_fill(pad, 0.0)

    best_m = m
    best = err_of(m)[1].abs().sum(-1, keepdim=True)  # (R, G, 1)
    for _ in range(int(iters)):
        q, e = err_of(m)
        we = shrink_lp(e, beta, lp_norm)
        m = ((x - we - q * s).masked_fill(pad, 0.0).sum(-1, keepdim=True) / n).to(spec.dtype).to(torch.float32)
        beta *= kappa
        cur = err_of(m)[1].abs().sum(-1, keepdim=True)
        better = cur < best
        best_m = torch.where(better, m, best_m)
        best = torch.minimum(cur, best)
    p = {"scale": s, "offset": best_m}
    codes = grids.ungroup(grids.quantize(wg, p, spec), W.shape)
    return QWeight(codes=codes, params=p)


@register("hqq")
class HQQ(QuantCodec):
    """``method: hqq`` — calibration-free; params: the grid's (asym only) plus ``lp_norm`` (0.7),
    ``beta`` (10), ``kappa`` (1.01), ``iters`` (20)."""

    options = {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}

    def quantize(self, w: Tensor, stats: Stats | None, spec: GridSpec, **opts: float) -> QWeight:
        if not 0 < float(opts["lp_norm"]) <= 1:
            raise InputError("hqq: lp_norm must be in (0, 1]")
        return hqq_quantize(w, spec, **{k: float(v) for k, v in opts.items()})
