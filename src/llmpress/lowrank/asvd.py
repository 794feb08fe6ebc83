"""ASVD (Yuan et al. 2023): activation-aware SVD by scaling input channels, the cheap option.

Input channels that carry large activations matter more to the output. ASVD scales the weight's
columns by s_j = (mean_t |x_tj|)^α (α = 0.5 by default), truncates the SVD of W diag(s), and
folds the scale back: W' = (W diag(s))_k diag(s)⁻¹. It needs only the mean |x| per channel
(``Stats.abs_mean``), not the n×n Gram matrix, and no Cholesky; it approximates the whitened
objective with a diagonal S.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llmpress.tensor import Stats, register

from ..errors import DivergedError, InputError
from .base import LowRankCodec, RightTransform


def channel_scale(abs_mean: Tensor, alpha: float = 0.5) -> RightTransform:
    """S = diag((mean |x|)^α), floored so that dead channels keep a finite inverse."""
    if not 0.0 <= alpha <= 2.0:
        raise InputError(f"alpha must be in [0, 2]; got {alpha}")
    a = abs_mean.to(torch.float64)
    if not torch.isfinite(a).all():
        raise DivergedError("mean |x| holds inf/NaN: the calibration activations overflowed")
    s = a.clamp_min(0).pow(alpha)
    top = float(s.max()) if s.numel() else 0.0
    if top <= 0.0:
        return RightTransform("diag", torch.ones_like(s))
    return RightTransform("diag", s.clamp_min(1e-6 * top))


@register("asvd")
class ASVD(LowRankCodec):
    """ASVD: SVD of W·diag(mean|x|^α), then the scale folded back. Extra param: ``alpha`` (0.5)."""

    needs_stats = True
    gram = False
    compute_dtype = torch.float64
    extra = {"alpha": 0.5}

    def transform(self, w: Tensor, stats: Stats | None, **extra: Any) -> RightTransform:
        if stats is None or stats.abs_mean is None:
            raise InputError("asvd needs calibration statistics (mean |x| per input channel)")
        if stats.abs_mean.numel() != w.shape[1]:
            raise InputError(f"mean |x| has {stats.abs_mean.numel()} channels; the weight has {w.shape[1]} inputs")
        return channel_scale(stats.abs_mean, float(extra["alpha"]))
