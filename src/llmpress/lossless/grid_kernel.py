"""Compiled inner loop of grid.py's affine fit: for each block, the first candidate scale whose
codes reproduce every value, in one pass over the values (numba, ``nogil``).

It only proposes: grid.py recomputes every value of the chosen codes and parameters with numpy
(the decoder's own arithmetic) and compares the bits before any chunk is coded on a grid.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(**_JIT)
def affine_codes(x, m, cand, k, codes, pick):  # x (nb, B) f32, m (nb,) f32, cand (nc, nb) f32
    """codes[b] = rint((x − m)/d) for the first candidate d = cand[j, b] (j → pick[b]) with
    float32((d·q) + m) == x for every value of block b (−0 told from +0); pick[b] = −1 if none."""
    nb, B = x.shape
    nc = cand.shape[0]
    for b in range(nb):
        pick[b] = -1
        mb = m[b]
        for j in range(nc):
            d = cand[j, b]
            good = True
            for i in range(B):
                v = x[b, i]
                if d > 0:
                    q = math.floor((np.float64(v) - np.float64(mb)) / np.float64(d) + 0.5)
                    q = min(max(q, 0.0), np.float64(k))
                else:
                    q = 0.0
                r = d * np.float32(q) + mb  # float32: two roundings (no fast-math, no contraction)
                if r != v or math.copysign(1.0, r) != math.copysign(1.0, v):
                    good = False
                    break
                codes[b, i] = q
            if good:
                pick[b] = j
                break


@njit(**_JIT)
def block_minmax(x, lo, hi):  # x (nb, B) f32 -> lo, hi (nb,) f32; NaN anywhere in a block: lo = NaN
    """Each block's smallest and largest value (−0 below +0 is not told apart: the check is exact)."""
    nb, B = x.shape
    for b in range(nb):
        a = x[b, 0]
        z = a
        for i in range(1, B):
            v = x[b, i]
            if v < a:
                a = v
            if v > z:
                z = v
            if v != v:
                a = v
                break
        if a != a or z != z:
            a = np.float32(np.nan)
        lo[b] = a
        hi[b] = z


@njit(nogil=True, cache=True)
def _parts(w):  # float32 word -> (biased exponent, 1 for subnormals and zeros; significand, implicit bit set)
    e = np.int64((w >> 23) & 0xFF)
    man = np.int64(w & 0x7FFFFF)
    if e > 0:
        man |= 1 << 23
    else:
        e = 1
    return e, man


@njit(**_JIT)
def scale_gcd(u, G, emin, c, cmin, cmax, flags):  # u (nb, B) uint32 words of float32 values
    """Per block, in units of 2^(emin − 150) (its smallest nonzero exponent): every value is an
    integer I (sign apart); G = gcd of the |I|, c = ±I/G, cmin/cmax their range; flags: 1 a −0,
    2 a +0, 4 not a scale block here (Inf/NaN, or exponents more than 30 apart)."""
    nb, B = u.shape
    for b in range(nb):
        lo = 1 << 20
        f = 0
        for i in range(B):
            w = u[b, i]
            if (w >> 23) & 0xFF == 0xFF:
                f |= 4
            e, man = _parts(w)
            if man == 0:  # ±0
                f |= 1 if w >> 31 else 2
                continue
            if e < lo:
                lo = e
        emin[b] = lo
        g = np.int64(0)
        if not f & 4:
            for i in range(B):
                e, man = _parts(u[b, i])
                if man == 0:
                    continue
                if e - lo > 30:
                    f |= 4
                    break
                v = man << (e - lo)
                while v:  # Euclid: g = gcd(g, v)
                    g, v = v, g % v
        G[b] = g
        flags[b] = f
        a, z = np.int64(0), np.int64(0)
        for i in range(B):
            w = u[b, i]
            if f & 4 or g == 0:
                c[b, i] = 0
                continue
            e, man = _parts(w)
            v = (man << (e - lo)) // g if man else np.int64(0)
            if w >> 31:
                v = -v
            c[b, i] = v
            if i == 0 or v < a:
                a = v
            if i == 0 or v > z:
                z = v
        cmin[b] = a
        cmax[b] = z
