"""Activation-aware, whitened SVD (SVD-LLM, Wang et al. 2024): truncate what the layer *outputs*.

The error that matters is on the layer's outputs over calibration inputs X (n, T):
‖(W − W')X‖²_F = tr((W − W') H (W − W')ᵀ) with H = X Xᵀ (the Gram matrix, ``Stats.gram``).
With a Cholesky factor H = S Sᵀ this equals ‖(W − W')S‖²_F, so by Eckart–Young the best rank-k
W' is W' = (W S)_k S⁻¹: SVD of W S, keep k, un-whiten the right factor. The truncation error on
the outputs is then exactly the tail Σ_{i>k} σ_i(W S)².

H is accumulated in float64 over calibration tokens; the Cholesky factor is taken of
H + λI, λ = damp · mean(diag H) (the minimiser then also pays λ‖W − W'‖², which keeps it
well-posed when some directions never occur in the calibration text). With fewer tokens than
input features H is singular: we warn and damp harder. When H + λI is still not positive
definite in floating point, we fall back to an eigendecomposition with eigenvalues clamped at λ.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from llmpress.tensor import Stats, register

from ..errors import DivergedError, InputError
from .base import LowRankCodec, RightTransform

log = logging.getLogger(__name__)

DAMP_FEW_TOKENS = 1e-2  # the damping used when the Gram matrix has fewer tokens than features


def whitening(gram: Tensor, n_tokens: int, damp: float = 1e-2) -> RightTransform:
    """S with S Sᵀ = H + λI for H = ``gram`` (n, n), float64; never NaN."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise InputError(f"a Gram matrix is square; got shape {tuple(gram.shape)}")
    if not 0.0 <= damp < 1.0:
        raise InputError(f"damp must be in [0, 1); got {damp}")
    h = gram.to(torch.float64)
    if not torch.isfinite(h).all():
        raise DivergedError("the Gram matrix holds inf/NaN: the calibration activations overflowed")
    d = h.shape[0]
    h = 0.5 * (h + h.T) / max(n_tokens, 1)  # symmetric; per token, so λ and the eigenvalues read as mean x²
    if n_tokens < d:
        log.warning("only %d calibration tokens for a %d-wide Gram matrix: it is singular; damping with %g "
                    "(give more calibration tokens for a real whitening)", n_tokens, d, max(damp, DAMP_FEW_TOKENS))
        damp = max(damp, DAMP_FEW_TOKENS)
    scale = float(torch.diagonal(h).mean())
    if scale <= 0.0:
        log.warning("the layer's calibration inputs are all zero: whitening is the identity (plain SVD)")
        return RightTransform("diag", torch.ones(d, dtype=torch.float64, device=h.device))
    lam = max(damp, 1e-10) * scale
    eye = torch.eye(d, dtype=torch.float64, device=h.device)
    s, info = torch.linalg.cholesky_ex(h + lam * eye)
    if int(info) == 0 and torch.isfinite(s).all():
        return RightTransform("cholesky", s)
    log.warning("Gram matrix + %g·I is not positive definite in float64; using its eigendecomposition", lam)
    evals, q = torch.linalg.eigh(h)
    return RightTransform("eigh", (evals.clamp_min(0) + lam).sqrt(), q)


@register("whiten")
class Whiten(LowRankCodec):
    """SVD-LLM whitened truncated SVD: minimises ‖(W − W')X‖ over calibration activations.

    Extra param: ``damp`` (λ relative to the mean diagonal of X Xᵀ / T, default 1e-2: chosen by
    the held-out output error over 1e-4..1e-1).
    """

    needs_stats = True
    gram = True
    extra = {"damp": 1e-2}

    def transform(self, w: Tensor, stats: Stats | None, **extra: Any) -> RightTransform:
        if stats is None or stats.gram is None:
            raise InputError("whiten needs calibration statistics with a Gram matrix (run it through the pipeline)")
        if stats.gram.shape[0] != w.shape[1]:
            raise InputError(f"Gram matrix {tuple(stats.gram.shape)} does not fit a weight of {w.shape[1]} inputs")
        return whitening(stats.gram, stats.n, float(extra["damp"]))
