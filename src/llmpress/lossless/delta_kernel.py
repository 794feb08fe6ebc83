"""Compiled loops of a delta chunk (delta.py): a fine-tune's words against its base's, as byte planes.

Two transforms of a word ``x`` against the base word ``b`` of the same position (``B`` bits,
sign-magnitude floats of any width):

- ``XOR`` (mode 1): ``v = x ^ b``: the bits that changed;
- ``DIFF`` (mode 2): the difference of the words as ordered integers, ``o(w) = mag`` for a
  positive word and ``−1 − mag`` for a negative one (so −0 sits just below +0 and the order is
  the values' order), taken modulo 2^B and zigzagged (0, −1, 1, −2, ... → 0, 1, 2, 3, ...):
  how many representable values the weight moved, small when training moved it a little,
  across zero included.

``v`` is cut into its ``B/8`` bytes (plane 0 the least significant), each a field of 8-bit
symbols. Both are bijections on every bit pattern (NaN payloads, −0, infinities). The encoder
counts both transforms' plane histograms in one pass (:func:`delta_hists`) to choose, then
writes the chosen one's planes (:func:`delta_planes`); the decoder decodes the planes' streams
and merges them against the base in one call without the GIL (:func:`decode_delta`).

numba's cache keys these functions on this file alone: what they call from chunk_kernel.py or
rans32.py takes effect in a process whose cache predates it only once this file changes too.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import rans8 as R8
from .chunk_kernel import RANS, _field, _u32

XOR, DIFF = 1, 2
_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(**_JIT)
def _ordered(w, B):  # a word (int64 of B bits) -> its ordered integer in [−2^(B−1), 2^(B−1))
    mag = w & ((np.int64(1) << (B - 1)) - 1)
    return mag if (w >> (B - 1)) & 1 == 0 else -1 - mag


@njit(**_JIT)
def _word(o, B):  # inverse of _ordered
    return o if o >= 0 else (-1 - o) | (np.int64(1) << (B - 1))


@njit(nogil=True, cache=True, inline="always")
def _diff(xi, bi, B):  # zigzag(o(x) − o(b)) on B bits (branch-free: vectorizes)
    magmask = (np.int64(1) << (B - 1)) - 1
    mask = (np.int64(1) << B) - 1
    half = np.int64(1) << (B - 1)
    ox = (xi & magmask) ^ -(xi >> (B - 1))  # _ordered
    ob = (bi & magmask) ^ -(bi >> (B - 1))
    d = ((ox - ob + half) & mask) - half  # signed, in [−2^(B−1), 2^(B−1))
    return ((d << 1) ^ (d >> 63)) & mask


@njit(**_JIT)
def _value(x, b, mode, B):  # the transformed word of x against b (int64, B bits)
    xi, bi = np.int64(x), np.int64(b)
    return xi ^ bi if mode == XOR else _diff(xi, bi, B)


@njit(**_JIT)
def delta_hists(x, b, hx, hd):  # x, b (n,) words; hx, hd (P, 256) int64 += XOR's / DIFF's plane counts
    """Byte-plane histograms of both transforms (P = bytes a word; added to hx and hd)."""
    P = hx.shape[0]
    B = 8 * P
    n = x.shape[0]
    if P == 2:
        for i in range(n):
            xi, bi = np.int64(x[i]), np.int64(b[i])
            vx = xi ^ bi
            vd = _diff(xi, bi, 16)
            hx[0, vx & 0xFF] += 1
            hx[1, vx >> 8] += 1
            hd[0, vd & 0xFF] += 1
            hd[1, vd >> 8] += 1
        return
    for i in range(n):
        xi, bi = np.int64(x[i]), np.int64(b[i])
        vx = xi ^ bi
        vd = _diff(xi, bi, B)
        for p in range(P):
            hx[p, (vx >> (8 * p)) & 0xFF] += 1
            hd[p, (vd >> (8 * p)) & 0xFF] += 1


@njit(**_JIT)
def delta_planes(x, b, mode, planes):  # x, b (n,) words; planes (P, n) uint8 <- the transform's bytes
    P = planes.shape[0]
    B = 8 * P
    n = x.shape[0]
    for p in range(P):  # a plane at a time: contiguous writes, a branch-free loop
        row = planes[p]
        if mode == XOR:
            for i in range(n):
                row[i] = ((np.int64(x[i]) ^ np.int64(b[i])) >> (8 * p)) & 0xFF
        else:
            for i in range(n):
                row[i] = (_diff(np.int64(x[i]), np.int64(b[i]), B) >> (8 * p)) & 0xFF


@njit(nogil=True, cache=True, inline="always")
def _undiff(v, bi, B):  # the word at zigzagged distance v from the base word bi (branch-free: vectorizes)
    magmask = (np.int64(1) << (B - 1)) - 1
    mask = (np.int64(1) << B) - 1
    half = np.int64(1) << (B - 1)
    d = (v >> 1) ^ -(v & 1)
    ob = (bi & magmask) ^ -(bi >> (B - 1))  # _ordered: −1 − mag = ~mag for a negative word
    o = ((ob + d + half) & mask) - half
    s = o >> 63  # −1 where negative
    return ((o ^ s) & magmask) | (s & half)  # _word


@njit(**_JIT)
def _merge(p0, p1, p2, p3, b, mode, out):  # the planes (n,) uint8 against b -> out; a loop per (mode, P)
    n = b.shape[0]
    P = out.itemsize
    if P == 1:
        if mode == XOR:
            for i in range(n):
                out[i] = np.int64(p0[i]) ^ np.int64(b[i])
        else:
            for i in range(n):
                out[i] = _undiff(np.int64(p0[i]), np.int64(b[i]), 8)
    elif P == 2:
        if mode == XOR:
            for i in range(n):
                out[i] = (np.int64(p0[i]) | (np.int64(p1[i]) << 8)) ^ np.int64(b[i])
        else:
            for i in range(n):
                out[i] = _undiff(np.int64(p0[i]) | (np.int64(p1[i]) << 8), np.int64(b[i]), 16)
    else:
        if mode == XOR:
            for i in range(n):
                v = np.int64(p0[i]) | (np.int64(p1[i]) << 8) | (np.int64(p2[i]) << 16) | (np.int64(p3[i]) << 24)
                out[i] = v ^ np.int64(b[i])
        else:
            for i in range(n):
                v = np.int64(p0[i]) | (np.int64(p1[i]) << 8) | (np.int64(p2[i]) << 16) | (np.int64(p3[i]) << 24)
                out[i] = _undiff(v, np.int64(b[i]), 32)


@njit(**_JIT)
def merge4(p0, p1, p2, p3, b, mode, out):  # the planes decoded elsewhere (those past P unused) -> out
    n = b.shape[0]
    _merge(p0[:n], p1[:n], p2[:n], p3[:n], b, mode, out)


@njit(**_JIT)
def merge_planes(planes, b, mode, out):  # planes (P, n) uint8, b (n,) base words -> out (n,) words
    P = planes.shape[0]
    _merge(planes[0], planes[min(1, P - 1)], planes[min(2, P - 1)], planes[min(3, P - 1)], b, mode, out)


@njit(**_JIT)
def _plane(p, p0, p1, p2, p3):
    return p0 if p == 0 else p1 if p == 1 else p2 if p == 2 else p3


@njit(**_JIT)
def decode_delta(buf, mode, b, out, p0, p1, p2, p3):
    """A delta payload ``u8 P | P × (u8 backend | u32 length | stream)`` (after the chunk's mode
    byte) decoded into the planes p0.. ((n,) uint8; those past P unused) and merged against the
    base words b into out ((n,) words); 0 on success, nonzero where the generic path must run.
    Two planes in a row coded ``rans`` decode together (rans8.decode_streams2: two chains in flight)."""
    n = b.shape[0]
    P = out.itemsize
    if buf.shape[0] < 1 or buf[0] != P or (mode != XOR and mode != DIFF):
        return -1
    m = buf.shape[0]
    pos = 1
    p = 0
    while p < P:
        if p + 1 < P and n >= R8.LANES and pos + 5 <= m:
            la = _u32(buf, pos + 1)
            q = pos + 5 + la
            if buf[pos] == RANS and q + 5 <= m and buf[q] == RANS:
                lb = _u32(buf, q + 1)
                if q + 5 + lb <= m:
                    rc = R8.decode_streams2(buf[pos + 5 : q], buf[q + 5 : q + 5 + lb], 256,
                                            _plane(p, p0, p1, p2, p3)[:n], _plane(p + 1, p0, p1, p2, p3)[:n])
                    if rc != 0:
                        return rc
                    pos = q + 5 + lb
                    p += 2
                    continue
        rc, pos = _field(buf, pos, 8, _plane(p, p0, p1, p2, p3)[:n])
        if rc != 0:
            return rc
        p += 1
    if pos != m:
        return -1
    _merge(p0[:n], p1[:n], p2[:n], p3[:n], b, mode, out)
    return 0
