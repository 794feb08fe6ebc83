"""Fused fake-quantization kernels for QAT on CPU (numba, parallel over output rows).

Training a quantized model on a CPU is bound by passes over the weights, not by the matrix
products: the straight-through fake quantizer in plain torch reads and writes every latent
weight about fourteen times per step (round, clamp, scale, offset; then the range mask, the
masked gradient, the recomputed levels and two reductions). These two kernels do the same
arithmetic in one pass each, for the grids whose unit-scale level has a closed form
(``asym``: clamp(round(u), 0, 2^b − 1); ``sym``: clamp(round(u), −2^(b−1), 2^(b−1) − 1)) and
whole consecutive groups, the layout of RTN, AWQ, HQQ and static-group GPTQ:

    forward   ŵ[r,g,k] = s[r,g]·L(u[r,g,k]) + m[r,g]
    backward  ∂u[r,g,k] = s[r,g]·∂ŵ[r,g,k]·1[lo ≤ u ≤ hi]
              ∂s[r,g]   = Σ_k L(u[r,g,k])·∂ŵ[r,g,k],    ∂m[r,g] = Σ_k ∂ŵ[r,g,k]

Rounding is half-to-even (``np.rint``), as ``torch.round``: the levels are bit-identical to the
torch path (tests/test_finetune.py compares both).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

_JIT = dict(nogil=True, cache=True, boundscheck=False, parallel=True, fastmath=False)


@njit(**_JIT)
def _forward(u, s, m, lo, hi, out):  # u, out (R, G, S); s, m (R, G)
    R, G, S = u.shape
    for r in prange(R):
        for g in range(G):
            sc, off = s[r, g], m[r, g]
            for k in range(S):
                q = min(max(np.rint(u[r, g, k]), lo), hi)
                out[r, g, k] = sc * q + off


@njit(**_JIT)
def _backward(u, grad, s, lo, hi, gu, gs, gm):  # u, grad, gu (R, G, S); s, gs, gm (R, G)
    R, G, S = u.shape
    for r in prange(R):
        for g in range(G):
            sc = s[r, g]
            acc_s = 0.0
            acc_m = 0.0
            for k in range(S):
                x, d = u[r, g, k], grad[r, g, k]
                q = min(max(np.rint(x), lo), hi)
                acc_s += q * d
                acc_m += d
                gu[r, g, k] = sc * d if (x >= lo and x <= hi) else 0.0
            gs[r, g] = acc_s
            gm[r, g] = acc_m


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def fake_quant_forward(u: Tensor, s: Tensor, m: Tensor | None, lo: float, hi: float) -> Tensor:
    """ŵ (R, G, S) from latent u (R, G, S) and group parameters s, m (R, G, 1) or (R, G)."""
    R, G, S = u.shape
    out = torch.empty_like(u)
    mm = m.reshape(R, G) if m is not None else torch.zeros(R, G)
    _forward(_np(u), _np(s.reshape(R, G)), _np(mm), np.float32(lo), np.float32(hi), out.numpy())
    return out


def fake_quant_backward(u: Tensor, grad: Tensor, s: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor]:
    """(∂u (R, G, S), ∂s (R, G), ∂m (R, G)) for the upstream gradient ``grad`` of ŵ."""
    R, G, S = u.shape
    gu = torch.empty_like(u)
    gs = torch.empty(R, G, dtype=torch.float64)
    gm = torch.empty(R, G, dtype=torch.float64)
    _backward(_np(u), _np(grad.float()), _np(s.reshape(R, G)), np.float32(lo), np.float32(hi), gu.numpy(), gs.numpy(), gm.numpy())
    return gu, gs.float(), gm.float()
