"""GPTQ's inner loop, compiled: quantize a run of columns of one block and push each column's
error onto the block's later columns (numba, ``nogil``).

The loop is the same as the Python one in :mod:`.gptq`, column by column. In torch every column
costs about fifteen small tensor ops, almost all of it dispatch on a small layer, which made the
loop a large share of a whole GPTQ run. Compiled, a column costs its arithmetic. It serves the affine
grids, whose codes and values are

    q = clamp(round((w − a) / s) + z, 0, 2ᵇ − 1),     ŵ = (q − z)·s + a

(asym: a = offset, z = 0; asymz: a = 0, z = integer zero; sym: a = 0, z = 2ᵇ⁻¹), in float32 and
in the same order of operations as the torch path, so both give the same codes (tested).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, boundscheck=False)
def quantize_columns(W1, Hinv1, a, s, z, qmax, c0, c1, Q1, Err1):  # pragma: no cover - compiled
    """Columns c0..c1−1 of a block, in order.

    W1: (out, B) float32, the block's weights, updated in place (the columns of c0..c1−1 right of
    each quantized one receive its error); Hinv1: (B, B) float32, the block of the upper Cholesky
    factor of H⁻¹; a, s, z: (out, c1 − c0) float32, the grid parameters of columns c0..c1−1;
    Q1, Err1: (out, B) float32 outputs: the codes, and the errors (w − ŵ) / [H⁻¹]_ii that the
    caller carries to the columns from c1 on with one matrix product.
    """
    out = W1.shape[0]
    zero = np.float32(0.0)
    for i in range(c0, c1):
        d = Hinv1[i, i]
        j = i - c0
        for r in range(out):
            w = W1[r, i]
            q = np.float32(np.rint((w - a[r, j]) / s[r, j])) + z[r, j]
            q = min(max(q, zero), qmax)
            Q1[r, i] = q
            e = (w - ((q - z[r, j]) * s[r, j] + a[r, j])) / d
            Err1[r, i] = e
            for c in range(i + 1, c1):
                W1[r, c] -= e * Hinv1[i, c]
