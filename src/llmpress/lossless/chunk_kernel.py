"""A float chunk's fields decoded in one compiled call: parse the fields, decode each.

chunk.decode_chunk's generic path does the same in Python, one backend call per field; that
holds the GIL for tens of µs a chunk (parsing, dispatch, numba's argument checks), a large share
of a BF16 chunk's decoding. With two decoding threads those parts run one at a time, so the
generic path scaled poorly with threads. Here the fields decode in one call without the GIL,
and the caller merges them with the layout's compiled merge (a second call: a merge inside
would make this a closure over the layout's kernel, which numba's cache cannot key, so every
process would compile it again).

numba's cache keys these functions on this file alone: a kernel they call from kernels.py or
rans32.py (``unpack_bits``'s unrolled 1-bit path for FP8's sign field, say) takes effect in a
process whose cache predates it only once this file changes too (or the cache is cleared); so
did rans32's vector tail (a skewed stream's last words) and unpack_bits' 3- and 5-bit
branches (GGUF codes stored raw), which this line's change brings in.

Handled: the backends a float chunk is written with (``raw`` up to 8 bits, ``rans`` (rans32.py),
``rans4`` (the four-lane coder of kernels.py), ``split`` of those). Anything else, and
any stream that does not decode, returns a nonzero code: the caller then takes the generic
path, which decodes what this does not and raises the error that names the problem.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import kernels as K
from . import rans32 as R32
from .freq_model import read_model_or_fill

RAW, RANS4, SPLIT, RANS = 0, 4, 6, 7  # backend ids (entropy.py; checked in tests)
OTHER = 1  # a backend this module leaves to the generic path

_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(**_JIT)
def _u32(buf, o):
    return np.int64(buf[o]) | (np.int64(buf[o + 1]) << 8) | (np.int64(buf[o + 2]) << 16) | (np.int64(buf[o + 3]) << 24)


@njit(**_JIT)
def _rans4(p, A, dst):
    f = np.zeros(A, np.int64)
    pb, used = read_model_or_fill(p, A, f, dst)
    if pb <= 0:
        return pb
    if (p.shape[0] - used) % 2:
        return -1
    dsym, dinfo = K.decode_table(f, pb)
    return K.rans_decode(p[used:].view(np.uint16), dst.shape[0], dsym, dinfo, pb, dst)


@njit(**_JIT)
def _stream(bid, p, width, dst):  # p: (m,) uint8 payload; dst: (n,) -> 0, OTHER or an error code
    n = dst.shape[0]
    if bid == RAW:
        if width > 8:
            return OTHER
        if p.shape[0] != (n * width + 7) // 8:
            return -1
        if width == 8:
            dst[:] = p
        else:
            K.unpack_bits(p, width, dst)
        return 0
    if n == 0 and p.shape[0] == 0 and (bid == RANS or bid == RANS4):
        return 0
    if bid == RANS:
        return R32.decode_stream(p, 1 << width, dst)
    if bid == RANS4:
        return _rans4(p, 1 << width, dst)
    return OTHER


@njit(**_JIT)
def _split(p, width, dst):  # entropy.Split's layout: u8 k | k × (u8 id | u32 length) | payloads
    n = dst.shape[0]
    m = p.shape[0]
    if m < 1:
        return -1
    k = np.int64(p[0])
    if k < 1 or m < 1 + 5 * k:
        return -1
    step = (n + k - 1) // k
    if (k - 1) * step >= n:
        return -1
    pos = 1 + 5 * k
    for i in range(k):
        bid = p[1 + 5 * i]
        ln = _u32(p, 2 + 5 * i)
        if bid == SPLIT or pos + ln > m:
            return -1
        a = i * step
        b = min(a + step, n)
        rc = _stream(bid, p[pos : pos + ln], width, dst[a:b])
        if rc != 0:
            return rc
        pos += ln
    return 0 if pos == m else -1


@njit(**_JIT)
def _field(buf, pos, width, dst):  # one field's header and stream at buf[pos] -> (code, next pos)
    m = buf.shape[0]
    if pos + 5 > m:
        return -1, pos
    bid = buf[pos]
    ln = _u32(buf, pos + 1)
    pos += 5
    if pos + ln > m:
        return -1, pos
    p = buf[pos : pos + ln]
    rc = _split(p, width, dst) if bid == SPLIT else _stream(bid, p, width, dst)
    return rc, pos + ln


@njit(**_JIT)
def decode_fields(buf, head_width, widths, head, t0, t1, t2):
    """A float chunk's payload buf (uint8) decoded into its field arrays: the head (n,) of
    ``head_width`` bits, the tail pieces t0.. (n,) uint8 of ``widths`` (int64, 1–3 entries;
    arrays past them unused); 0 on success (the caller merges the fields)."""
    P = widths.shape[0]
    if buf.shape[0] < 1 or buf[0] != 1 + P:
        return -1
    rc, pos = _field(buf, 1, head_width, head)
    if rc == 0:
        rc, pos = _field(buf, pos, widths[0], t0)
    if rc == 0 and P > 1:
        rc, pos = _field(buf, pos, widths[1], t1)
    if rc == 0 and P > 2:
        rc, pos = _field(buf, pos, widths[2], t2)
    if rc != 0:
        return rc
    return 0 if pos == buf.shape[0] else -1
