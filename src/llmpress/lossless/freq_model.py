"""Compact bytes of a static rANS model (the ``rans`` and ``rans4`` backends).

A chunk's model is a handful of present symbols with smooth frequencies, stored as a bit
stream (LSB-first; docs/FORMAT.md gives it in full):

- ``u8 pb`` (byte-aligned); ``pb = 0``: a single-symbol model, then ``varint symbol``, done;
- ``varint lo``, ``varint hi - lo`` (both present, ``hi > lo``);
- the symbols strictly between: one mode bit, then either a presence bitmap of ``hi - lo - 1``
  bits (dense alphabets) or the gaps between present symbols as Elias-gamma codes (sparse);
- the frequencies of all present symbols but the last (it is ``2**pb`` minus their sum): each
  as its bit length ``L`` coded as the Elias-gamma code of ``zigzag(L - L_prev) + 1`` (neighbours
  have similar lengths, so this is mostly 1–3 bits), then the ``L - 1`` bits below its top bit.

The frequencies are exact (the model is unchanged; only its bytes shrink, ~1.2 bytes a symbol).
``read_model`` checks every field and every read against the buffer's end.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(inline="always", **_JIT)
def _put(out, st, v, nb):  # st: [byte pos, bit acc, acc bits]; append nb (<= 32) bits of v
    st[1] |= (v & ((1 << nb) - 1)) << st[2]
    st[2] += nb
    while st[2] >= 8:
        out[st[0]] = st[1] & 0xFF
        st[0] += 1
        st[1] >>= 8
        st[2] -= 8


@njit(inline="always", **_JIT)
def _gamma(out, st, v):  # v >= 1: (L-1) zero bits, then v's L bits from its top, as one bit each
    L = 0
    t = v
    while t > 0:
        L += 1
        t >>= 1
    _put(out, st, 0, L - 1)
    for j in range(L - 1, -1, -1):
        _put(out, st, (v >> j) & 1, 1)


@njit(**_JIT)
def write_model(freq, pb):  # freq: (A,) int64, present symbols > 0 (sum 2**pb unless one symbol) -> uint8
    A = freq.shape[0]
    out = np.zeros(32 + 8 * A, np.uint8)
    k = 0
    lo = -1
    hi = -1
    for s in range(A):
        if freq[s] > 0:
            k += 1
            if lo < 0:
                lo = s
            hi = s
    st = np.zeros(3, np.int64)
    if k <= 1:
        out[0] = 0
        st[0] = 1
        x = max(lo, 0)
        while x >= 0x80:
            out[st[0]] = (x & 0x7F) | 0x80
            x >>= 7
            st[0] += 1
        out[st[0]] = x
        return out[: st[0] + 1].copy()
    out[0] = pb
    st[0] = 1
    for x in (lo, hi - lo):
        while x >= 0x80:
            out[st[0]] = (x & 0x7F) | 0x80
            x >>= 7
            st[0] += 1
        out[st[0]] = x
        st[0] += 1
    # the cheaper of bitmap (hi-lo-1 bits) and gamma gaps
    gbits = 0
    prev = lo
    for s in range(lo + 1, hi + 1):
        if freq[s] > 0:
            g = s - prev
            L = 0
            while g > 0:
                L += 1
                g >>= 1
            gbits += 2 * L - 1
            prev = s
    if hi - lo - 1 <= gbits:
        _put(out, st, 0, 1)
        for s in range(lo + 1, hi):
            _put(out, st, np.int64(freq[s] > 0), 1)
    else:
        _put(out, st, 1, 1)
        prev = lo
        for s in range(lo + 1, hi + 1):
            if freq[s] > 0:
                _gamma(out, st, s - prev)
                prev = s
    Lp = 7
    for s in range(lo, hi):
        f = freq[s]
        if f <= 0:
            continue
        L = 0
        t = f
        while t > 0:
            L += 1
            t >>= 1
        d = L - Lp
        z = 2 * d if d >= 0 else -2 * d - 1
        _gamma(out, st, z + 1)
        _put(out, st, f, L - 1)
        Lp = L
    if st[2] > 0:
        out[st[0]] = st[1] & 0xFF
        st[0] += 1
    return out[: st[0]].copy()


@njit(inline="always", **_JIT)
def _get(buf, st, nb):  # st: [byte pos, bit acc, acc bits]; -> nb bits, or -1 past the end
    m = buf.shape[0]
    while st[2] < nb:
        if st[0] >= m:
            return -1
        st[1] |= np.int64(buf[st[0]]) << st[2]
        st[0] += 1
        st[2] += 8
    v = st[1] & ((1 << nb) - 1)
    st[1] >>= nb
    st[2] -= nb
    return v


@njit(inline="always", **_JIT)
def _ungamma(buf, st):  # -> v >= 1, or -1 on a bad / truncated code
    z = 0
    while True:
        b = _get(buf, st, 1)
        if b < 0 or z > 24:
            return -1
        if b == 1:
            break
        z += 1
    v = 1
    for _ in range(z):
        b = _get(buf, st, 1)
        if b < 0:
            return -1
        v = (v << 1) | b
    return v


@njit(inline="always", **_JIT)
def _uvarint(buf, st):  # byte-aligned varint at st[0]; -> value or -1
    x = 0
    sh = 0
    m = buf.shape[0]
    while True:
        if st[0] >= m or sh > 28:
            return -1
        b = np.int64(buf[st[0]])
        st[0] += 1
        x |= (b & 0x7F) << sh
        sh += 7
        if b < 0x80:
            return x


@njit(**_JIT)
def read_model(buf, A, freq):  # buf: (m,) uint8; freq: (A,) int64 zeros -> (pb, bytes used); pb < 0: malformed
    """Inverse of :func:`write_model` (pb = 0 returned for a single-symbol model)."""
    if buf.shape[0] < 2 or buf[0] > 16:
        return -1, 0
    pb = np.int64(buf[0])
    st = np.zeros(3, np.int64)
    st[0] = 1
    if pb == 0:
        s = _uvarint(buf, st)
        if s < 0 or s >= A:
            return -1, 0
        freq[s] = 1
        return 0, st[0]
    T = 1 << pb
    lo = _uvarint(buf, st)
    span = _uvarint(buf, st) if lo >= 0 else -1
    if lo < 0 or span < 1 or lo + span >= A:
        return -1, 0
    hi = lo + span
    freq[lo] = 1  # presence marks first
    freq[hi] = 1
    mode = _get(buf, st, 1)
    if mode < 0:
        return -1, 0
    k = 2
    if mode == 0:
        for s in range(lo + 1, hi):
            b = _get(buf, st, 1)
            if b < 0:
                return -1, 0
            if b:
                freq[s] = 1
                k += 1
    else:
        s = lo
        while True:
            g = _ungamma(buf, st)
            if g < 0 or s + g > hi:
                return -1, 0
            s += g
            if s == hi:
                break
            freq[s] = 1
            k += 1
    if k > T:
        return -1, 0
    Lp = 7
    total = 0
    for s in range(lo, hi):
        if freq[s] == 0:
            continue
        z = _ungamma(buf, st)
        if z < 0:
            return -1, 0
        z -= 1
        d = z >> 1 if z % 2 == 0 else -((z + 1) >> 1)
        L = Lp + d
        if L < 1 or L > pb:
            return -1, 0
        r = _get(buf, st, L - 1)
        if r < 0:
            return -1, 0
        f = (np.int64(1) << (L - 1)) | r
        freq[s] = f
        total += f
        Lp = L
    if total >= T:
        return -1, 0
    freq[hi] = T - total
    return pb, st[0]


@njit(**_JIT)
def read_model_or_fill(buf, A, freq, out):  # -> (pb, bytes used)
    """:func:`read_model` for a stream of model ‖ coded symbols: pb > 0, a model (in freq) to
    decode the rest with; 0, a single-symbol stream, already written into ``out``; -8, a
    malformed model; -9, bytes after a single-symbol model."""
    pb, used = read_model(buf, A, freq)
    if pb < 0:
        return -8, 0
    if pb == 0:
        if used != buf.shape[0]:
            return -9, 0
        for s in range(A):
            if freq[s]:
                out[:] = s
    return pb, used
