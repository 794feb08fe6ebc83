"""The clipping search's error pass, compiled (numba, ``nogil``).

A range search (``range: mse``) tries ~32 shrunk ranges per group and scores each by its
quantization error. In torch each try is five passes over the weights (scale, round, clamp,
dequantize, subtract) plus a transposed copy for the batched Hessian loss, a large share of
GPTQ's search time. Here one pass computes the error of every weight
under an affine grid, q = clamp(round((w − a)/s) + z, 0, 2ᵇ − 1) and ŵ = (q − z)·s + a (the
form of :meth:`grids.Grid.affine`), in float32 and in the torch path's order of operations.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, boundscheck=False)
def affine_error(wg, a, s, z, qmax, out):  # pragma: no cover - compiled
    """out[g, r, k] = ŵ − w for w = wg[r, g, k]: wg (R, G, S) float32 grouped weights (NaN where a
    ragged last group is padded: error 0 there); a, s, z (R, G) float32 per-group parameters;
    out (G, R, S) float32, group-major as the batched Hessian loss takes it."""
    R, G, S = wg.shape
    zero = np.float32(0.0)
    for r in range(R):
        for g in range(G):
            aa, ss, zz = a[r, g], s[r, g], z[r, g]
            for k in range(S):
                w = wg[r, g, k]
                q = np.float32(np.rint((w - aa) / ss)) + zz
                q = min(max(q, zero), qmax)
                e = (q - zz) * ss + aa - w
                out[g, r, k] = e if w == w else zero
