"""Compiled loops of gguf.py's merges (numba, ``nogil``): a chunk's codes, one a weight in
weight order, packed back into ggml's block bytes. Each is the exact inverse of gguf.py's numpy
split (tests/test_lossless_gguf.py)."""
from __future__ import annotations

from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(**_JIT)
def legacy_merge(codes, out, qs_off, qh_off):  # codes (nb·32,) u1, out (nb, block bytes) u1
    """Q4_0/Q4_1 (qh_off < 0) and Q5_0/Q5_1: weight j < 16 is the low nibble of qs[j], j + 16
    the high one; a Q5 code's fifth bit is bit j of the little-endian u32 at ``qh_off``."""
    nb = out.shape[0]
    for b in range(nb):
        base = b * 32
        if qh_off >= 0:
            h = 0
            for j in range(32):
                h |= ((codes[base + j] >> 4) & 1) << j
            for i in range(4):
                out[b, qh_off + i] = (h >> (8 * i)) & 0xFF
        for j in range(16):
            out[b, qs_off + j] = (codes[base + j] & 15) | ((codes[base + 16 + j] & 15) << 4)


@njit(**_JIT)
def q4k_merge(codes, out, qs_off, qh_off):  # codes (nb·256,) u1, out (nb, 144 or 176) u1
    """Q4_K (qh_off < 0) and Q5_K: weight 64j + l is the low nibble of qs[32j + l], 64j + 32 + l
    the high one; a Q5_K code's fifth bit is bit 2j (2j + 1) of qh[l]."""
    nb = out.shape[0]
    for b in range(nb):
        base = b * 256
        if qh_off >= 0:
            for l in range(32):
                out[b, qh_off + l] = 0
        for j in range(4):
            for l in range(32):
                c0 = codes[base + 64 * j + l]
                c1 = codes[base + 64 * j + 32 + l]
                out[b, qs_off + 32 * j + l] = (c0 & 15) | ((c1 & 15) << 4)
                if qh_off >= 0:
                    out[b, qh_off + l] |= (((c0 >> 4) & 1) << (2 * j)) | (((c1 >> 4) & 1) << (2 * j + 1))


@njit(**_JIT)
def q6k_merge(codes, out):  # codes (nb·256,) u1, out (nb, 210) u1
    """Q6_K: weight 128n + 32k + l is nibble k >> 1 of ql[64n + 32(k & 1) + l] and bits 2k of qh[32n + l]."""
    nb = out.shape[0]
    for b in range(nb):
        for n in range(2):
            base = b * 256 + 128 * n
            for l in range(32):
                c0 = codes[base + l]
                c1 = codes[base + 32 + l]
                c2 = codes[base + 64 + l]
                c3 = codes[base + 96 + l]
                out[b, 64 * n + l] = (c0 & 15) | ((c2 & 15) << 4)
                out[b, 64 * n + 32 + l] = (c1 & 15) | ((c3 & 15) << 4)
                out[b, 128 + 32 * n + l] = ((c0 >> 4) & 3) | (((c1 >> 4) & 3) << 2) | (((c2 >> 4) & 3) << 4) | (((c3 >> 4) & 3) << 6)
