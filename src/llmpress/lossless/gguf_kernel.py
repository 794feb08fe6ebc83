"""Compiled loops of gguf.py's merges (numba, ``nogil``): a chunk's codes, one a weight in
weight order, packed back into ggml's block bytes. Each is the exact inverse of gguf.py's numpy
split (tests/test_lossless_gguf.py). :func:`decode_chunk` decodes a whole chunk of GGUF blocks in
one call (streams, classes, blocks' bytes), the same bytes as chunk.py's numpy path.

numba's cache keys these functions on this file alone: a change to a kernel they call from
chunk_kernel.py, kernels.py, rans32.py or freq_model.py reaches a process whose cache predates it
only once this file changes too (or the cache is cleared); the AOT build (compiled.py) is keyed on
all of them. (Changed with kernels.unpack_bits' 3- and 5-bit branches.)"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import chunk_kernel as CK
from .chunk_kernel import SPLIT, _u32

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


# ---------------------------------------------------------------- a whole chunk in one call
#
# decode_chunk decodes a chunk of GGUF blocks (chunk.py's _encode_gguf: ``u8 mode | u8 nfields |
# fields``) and writes the blocks' bytes: the parameter and scale streams into a scratch, the
# codes' classes from them (mode 1) with the float64 arithmetic of gguf.py's numpy ``classes``,
# the class streams, then every block's bytes, each code unit read where its class's stream put
# it (no reordered copy of the codes). One call, no GIL, no array a field.

# block kinds (gguf.py's FUSED maps the types onto them)
LEGACY_SCALE, LEGACY_AFFINE, KQ2, KQ3, KQ45, KQ6 = 0, 1, 2, 3, 4, 5
SCALE_CLASSES = 8  # gguf.SCALE_CLASSES
_NUMPY = dict(_JIT, error_model="numpy")  # x / 0 is ±inf or NaN, as in numpy (Python's model raises)
# 2^(e − 25) for an F16 exponent field e (2^−24 for e = 0, the subnormals): value = significand · _POW[e]
_POW = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)])


@njit(inline="always", **_JIT)
def _f16_word(h, t):  # F16's float fields (fields.py, E=5 M=10 k=3: head = exponent ‖ 3 top mantissa bits,
    """tail = sign ‖ 7 low mantissa bits) -> the u16 word."""
    t = np.int64(t)
    return ((t >> 7) << 15) | (np.int64(h) << 7) | (t & 0x7F)


@njit(inline="always", **_JIT)
def _f16_value(w):  # u16 word -> its value, float64 (exact)
    e = (w >> 10) & 31
    m = w & 1023
    if e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = np.float64(m + (1024 if e else 0)) * _POW[e]
    return -v if w >> 15 else v


@njit(inline="always", **_JIT)
def _param(ps, a, nb, b):  # the F16 parameter whose head field starts at ps[a] (its tail at a + nb), block b
    return _f16_word(ps[a + b], ps[a + nb + b])


@njit(inline="always", **_JIT)
def _put16(out, o, w):
    out[o] = w & 0xFF
    out[o + 1] = (w >> 8) & 0xFF


@njit(inline="always", **_NUMPY)
def _affine(d, m, top):  # gguf._affine_class of one unit: rint(m / d) clipped to [0, top], 0 where not finite
    z = np.rint(m / d)
    if not np.isfinite(z):
        return 0
    return np.int64(min(max(z, 0.0), np.float64(top)))


@njit(inline="always", **_JIT)
def _octave(v):  # frexp's exponent of |v| (0 where v is 0 or not finite)
    if not np.isfinite(v) or v == 0:
        return 0
    return math.frexp(abs(v))[1]


@njit(**_JIT)
def _scale_classes(e, cls):  # e (n,) int64 octaves -> cls (n,) u1: gguf._scale_class
    n = e.shape[0]
    if n == 0:
        return
    lo, hi = e[0], e[0]
    for i in range(n):
        lo = min(lo, e[i])
        hi = max(hi, e[i])
    h = np.zeros(hi - lo + 1, np.int64)
    for i in range(n):
        h[e[i] - lo] += 1
    mode = lo + np.argmax(h)
    for i in range(n):
        cls[i] = min(max(e[i] - mode + SCALE_CLASSES // 2, 0), SCALE_CLASSES - 1)


@njit(**_NUMPY)
def _classes(kind, bits, nb, ps, cls, e):  # the class of each code unit from the parameter fields ps
    """gguf.py's ``classes``: ps holds the fields before the codes, one after another (each
    ``counts[i]·nb`` symbols), cls (units,) u1 gets the classes; e (units,) int64: scratch."""
    top = (1 << bits) - 1
    if kind == LEGACY_AFFINE:  # x = d·q − m (m stored negated): centred on rint(m / d)
        for b in range(nb):
            cls[b] = _affine(_f16_value(_param(ps, 0, nb, b)), -_f16_value(_param(ps, 2 * nb, nb, b)), top)
        return
    if kind == KQ2 or kind == KQ45:  # 16 (Q2_K) or 8 sub-blocks: d·sc, dmin·mn
        S = 16 if kind == KQ2 else 8
        for b in range(nb):
            d = _f16_value(_param(ps, 0, nb, b))
            dm = _f16_value(_param(ps, 2 * nb, nb, b))
            for j in range(S):
                cls[b * S + j] = _affine(d * np.float64(ps[4 * nb + b * S + j]),
                                         dm * np.float64(ps[4 * nb + S * nb + b * S + j]), top)
        return
    for b in range(nb):
        d = _f16_value(_param(ps, 0, nb, b))
        if kind == LEGACY_SCALE:
            e[b] = _octave(d)
        else:
            for j in range(16):
                s = np.int64(ps[2 * nb + b * 16 + j])
                s = s - 32 if kind == KQ3 else (s - 256 if s > 127 else s)  # Q3_K: scale + 32; Q6_K: int8
                e[b * 16 + j] = _octave(d * np.float64(s))
    _scale_classes(e[: cls.shape[0]], cls)


@njit(inline="always", **_JIT)
def _gather(g, src, b, unit, c):  # block b's 256 codes into c: unit j of the block at g[src[per·b + j]]
    per = 256 // unit
    for j in range(per):
        s = src[per * b + j]
        for i in range(unit):
            c[unit * j + i] = g[s + i]


_LOW = np.uint64(0x0F0F0F0F0F0F0F0F)
_BIT4 = np.uint64(0x0101010101010101)
_GATHER8 = np.uint64(0x0102040810204080)  # x (bytes 0 or 1) × this: byte i lands on bit 56 + i (no carries)


_U = np.uint64  # indices: numba checks a signed index for wraparound at every access, which keeps
# LLVM from merging the byte stores below into one; an unsigned one it does not


@njit(inline="always", **_JIT)
def _store64(out, o, x):  # x's eight bytes, little-endian, at out[o] (o: u64; LLVM makes it one store)
    for i in range(8):
        out[o + _U(i)] = (x >> _U(8 * i)) & _U(0xFF)


@njit(inline="always", **_JIT)
def _bits8(x):  # bit 0 of each of x's eight bytes (each 0 or 1), byte i -> bit i
    return (x * _GATHER8) >> _U(56)


@njit(**_JIT)
def _legacy(npar, bits, nb, bb, ps, g, src, out):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: ``npar`` F16 parameters, then (Q5) the fifth bits as a u32,
    then the codes: 32 bytes (Q8_0), or weight j < 16 in the low nibble of byte j and j + 16 in
    its high one. Eight codes at a time (g's units start at multiples of 32 bytes: u64 reads)."""
    g8 = g[: g.shape[0] // 8 * 8].view(np.uint64)
    qh = _U(4 if bits == 5 else 0)
    qs = _U(2 * npar) + qh
    unb = _U(nb)
    f = _U(4)
    for b in range(nb):
        ub = _U(b)
        o = ub * _U(bb)
        for i in range(npar):
            a = _U(2 * i) * unb + ub
            w = _f16_word(ps[a], ps[a + unb])
            out[o + _U(2 * i)] = w & 0xFF
            out[o + _U(2 * i + 1)] = (w >> 8) & 0xFF
        s = _U(src[b]) >> _U(3)
        a0, a1, a2, a3 = g8[s], g8[s + _U(1)], g8[s + _U(2)], g8[s + _U(3)]  # weights 0-7, 8-15, 16-23, 24-31
        if bits == 8:
            _store64(out, o + qs, a0)
            _store64(out, o + qs + _U(8), a1)
            _store64(out, o + qs + _U(16), a2)
            _store64(out, o + qs + _U(24), a3)
            continue
        _store64(out, o + qs, (a0 & _LOW) | ((a2 & _LOW) << f))
        _store64(out, o + qs + _U(8), (a1 & _LOW) | ((a3 & _LOW) << f))
        if qh:  # a code's fifth bit: bit j of the little-endian u32 before the codes
            q = o + _U(2 * npar)
            out[q] = _bits8((a0 >> f) & _BIT4)
            out[q + _U(1)] = _bits8((a1 >> f) & _BIT4)
            out[q + _U(2)] = _bits8((a2 >> f) & _BIT4)
            out[q + _U(3)] = _bits8((a3 >> f) & _BIT4)


@njit(**_JIT)
def _kq45(bits, nb, bb, ps, g, src, out):
    """Q4_K (144 B: d, dmin, scales[12], qs[128]) and Q5_K (176 B: qh[32] before qs): weight
    64j + l is the low nibble of qs[32j + l], 64j + 32 + l the high one; a Q5_K code's fifth bit
    is bit 2j (2j + 1) of qh[l]. Eight codes at a time (units of 32 codes: u64 reads)."""
    g8 = g[: g.shape[0] // 8 * 8].view(np.uint64)
    qh = _U(32 if bits == 5 else 0)
    f = _U(4)
    for b in range(nb):
        o = _U(b) * _U(bb)
        _put16(out, o, _param(ps, 0, nb, b))
        _put16(out, o + _U(2), _param(ps, 2 * nb, nb, b))
        sc = _U(4 * nb + 8 * b)
        mn = _U(12 * nb + 8 * b)
        for j in range(4):  # gguf._k_scales_pack
            uj = _U(j)
            s0, s4, m0, m4 = ps[sc + uj], ps[sc + uj + _U(4)], ps[mn + uj], ps[mn + uj + _U(4)]
            out[o + _U(4) + uj] = (s0 & 63) | ((s4 >> 4) << 6)
            out[o + _U(8) + uj] = (m0 & 63) | ((m4 >> 4) << 6)
            out[o + _U(12) + uj] = (s4 & 15) | ((m4 & 15) << 4)
        h0 = h1 = h2 = h3 = _U(0)
        for j in range(4):
            a = _U(src[8 * b + 2 * j]) >> _U(3)  # weights 64j .. 64j + 31
            c = _U(src[8 * b + 2 * j + 1]) >> _U(3)  # 64j + 32 .. 64j + 63
            q = o + _U(16) + qh + _U(32 * j)
            for w in range(4):
                uw = _U(w)
                _store64(out, q + _U(8 * w), (g8[a + uw] & _LOW) | ((g8[c + uw] & _LOW) << f))
            if qh:
                sj = _U(2 * j)
                h0 |= (((g8[a] >> f) & _BIT4) << sj) | (((g8[c] >> f) & _BIT4) << (sj + _U(1)))
                h1 |= (((g8[a + _U(1)] >> f) & _BIT4) << sj) | (((g8[c + _U(1)] >> f) & _BIT4) << (sj + _U(1)))
                h2 |= (((g8[a + _U(2)] >> f) & _BIT4) << sj) | (((g8[c + _U(2)] >> f) & _BIT4) << (sj + _U(1)))
                h3 |= (((g8[a + _U(3)] >> f) & _BIT4) << sj) | (((g8[c + _U(3)] >> f) & _BIT4) << (sj + _U(1)))
        if qh:
            _store64(out, o + _U(16), h0)
            _store64(out, o + _U(24), h1)
            _store64(out, o + _U(32), h2)
            _store64(out, o + _U(40), h3)


_TWO = np.uint64(0x0303030303030303)


@njit(**_JIT)
def _kq6(nb, bb, ps, g, src, out):
    """Q6_K (210 B: ql[128], qh[64], scales[16], d): weight 128n + 32k + l is nibble k >> 1 of
    ql[64n + 32(k & 1) + l] and bits 2k of qh[32n + l]. Eight codes at a time (units of 16)."""
    g8 = g[: g.shape[0] // 8 * 8].view(np.uint64)
    f = _U(4)
    for b in range(nb):
        o = _U(b) * _U(bb)
        _put16(out, o + _U(208), _param(ps, 0, nb, b))
        for j in range(16):
            out[o + _U(192 + j)] = ps[2 * nb + 16 * b + j]
        for n in range(2):
            for w in range(4):  # l = 8w .. 8w + 7: units 16b + 8n + 2k + (w >> 1), word w & 1
                u = 16 * b + 8 * n + (w >> 1)
                e = _U(w & 1)
                v0 = g8[(_U(src[u]) >> _U(3)) + e]
                v1 = g8[(_U(src[u + 2]) >> _U(3)) + e]
                v2 = g8[(_U(src[u + 4]) >> _U(3)) + e]
                v3 = g8[(_U(src[u + 6]) >> _U(3)) + e]
                q = o + _U(64 * n + 8 * w)
                _store64(out, q, (v0 & _LOW) | ((v2 & _LOW) << f))
                _store64(out, q + _U(32), (v1 & _LOW) | ((v3 & _LOW) << f))
                _store64(out, o + _U(128 + 32 * n + 8 * w), ((v0 >> f) & _TWO) | (((v1 >> f) & _TWO) << _U(2))
                         | (((v2 >> f) & _TWO) << f) | (((v3 >> f) & _TWO) << _U(6)))


@njit(**_JIT)
def _assemble(kind, bits, nb, ps, g, src, out):  # the blocks' bytes out (nb·block bytes,) from the fields
    """Block b's codes: unit k (``unit`` codes in weight order) of the chunk at g[src[k]]."""
    bb = out.shape[0] // nb if nb else 0
    if kind == LEGACY_SCALE or kind == LEGACY_AFFINE:
        _legacy(npar=1 if kind == LEGACY_SCALE else 2, bits=bits, nb=nb, bb=bb, ps=ps, g=g, src=src, out=out)
        return
    if kind == KQ45:
        _kq45(bits, nb, bb, ps, g, src, out)
        return
    if kind == KQ6:
        _kq6(nb, bb, ps, g, src, out)
        return
    c = np.empty(256, np.uint8)  # one block's codes in weight order
    unit = 16
    for b in range(nb):
        o = b * bb
        _gather(g, src, b, unit, c)
        if kind == KQ2:
            _put16(out, o + 80, _param(ps, 0, nb, b))
            _put16(out, o + 82, _param(ps, 2 * nb, nb, b))
            for j in range(16):
                out[o + j] = (ps[4 * nb + 16 * b + j] & 15) | ((ps[20 * nb + 16 * b + j] & 15) << 4)
            for n in range(2):  # weight 128n + 32j + l: bits 2j of qs[32n + l]
                for l in range(32):
                    v = 0
                    for j in range(4):
                        v |= (c[128 * n + 32 * j + l] & 3) << (2 * j)
                    out[o + 16 + 32 * n + l] = v
        elif kind == KQ3:
            _put16(out, o + 108, _param(ps, 0, nb, b))
            sc = 2 * nb + 16 * b
            for j in range(8):
                out[o + 96 + j] = (ps[sc + j] & 15) | ((ps[sc + 8 + j] & 15) << 4)
            for k in range(4):  # scale 4i + k's top two bits: bits 2i of byte 104 + k (gguf._q3k_split)
                v = 0
                for i in range(4):
                    v |= ((ps[sc + 4 * i + k] >> 4) & 3) << (2 * i)
                out[o + 104 + k] = v
            for l in range(32):  # weight 128n + 32j + l: bits 2j of qs[32n + l], bit 4n + j of hmask[l]
                hm = 0
                for n in range(2):
                    v = 0
                    for j in range(4):
                        x = c[128 * n + 32 * j + l]
                        v |= (x & 3) << (2 * j)
                        hm |= ((x >> 2) & 1) << (4 * n + j)
                    out[o + 32 + 32 * n + l] = v
                out[o + l] = hm


ZSTD = 2  # entropy.py's id: decoded by the caller (zstandard) into ``side``, copied here in field order


@njit(**_JIT)
def _stream(bid, p, width, dst, side, sp):  # chunk_kernel._stream, a zstd stream from ``side``
    if bid != ZSTD:
        return CK._stream(bid, p, width, dst)
    n = dst.shape[0]  # the caller decoded it: its next n bytes
    if sp[0] + n > side.shape[0]:
        return -1
    dst[:] = side[sp[0] : sp[0] + n]
    sp[0] += n
    return 0


@njit(**_JIT)
def _field(buf, pos, width, dst, side, sp):  # chunk_kernel._field, zstd from ``side`` -> (code, next pos)
    m = buf.shape[0]
    if pos + 5 > m:
        return -1, pos
    bid = buf[pos]
    ln = _u32(buf, pos + 1)
    pos += 5
    if pos + ln > m:
        return -1, pos
    p = buf[pos : pos + ln]  # a split's pieces are never zstd (the writer's split codes raw or rans)
    rc = CK._split(p, width, dst) if bid == SPLIT else _stream(bid, p, width, dst, side, sp)
    return rc, pos + ln


@njit(**_JIT)
def decode_chunk(buf, kind, bits, unit, ncls, widths, counts, nb, out, ps, g, cls, src, side):
    """A chunk's payload ``buf`` (u1) decoded into its ``nb`` blocks ``out`` (nb·block bytes,)
    u1; 0 on success, nonzero where the caller must take the generic path (a backend decoded
    elsewhere, zstd; or a stream that does not decode, which that path names). ``widths`` /
    ``counts`` (i8): the block type's fields' bits and symbols a block, the codes last.
    Scratch: ``ps`` (Σ counts[:-1]·nb,) u1, ``g`` (nb·weights,) u1, ``cls`` (units,) u1,
    ``src`` (units,) i8. ``side``: the chunk's zstd streams, decoded by the caller, one after
    another in field order (empty where it has none)."""
    sp = np.zeros(1, np.int64)  # the next byte of side
    m = buf.shape[0]
    F = counts.shape[0]
    if m < 2 or buf[0] > 1:
        return -1
    mode = buf[0]
    if buf[1] != (F if mode == 0 else F - 1 + ncls):
        return -1
    pos = 2
    at = 0
    for i in range(F - 1):
        n = counts[i] * nb
        rc, pos = _field(buf, pos, widths[i], ps[at : at + n], side, sp)
        if rc != 0:
            return rc
        at += n
    nc = counts[F - 1] * nb
    nu = nc // unit
    cb = widths[F - 1]
    if mode == 0:
        rc, pos = _field(buf, pos, cb, g[:nc], side, sp)
        if rc != 0:
            return rc
        for k in range(nu):
            src[k] = k * unit
    else:
        _classes(kind, bits, nb, ps, cls[:nu], src)
        start = np.zeros(ncls + 1, np.int64)  # first unit of each class in the grouped codes
        for k in range(nu):
            start[cls[k] + 1] += 1
        for c in range(ncls):
            start[c + 1] += start[c]
        for c in range(ncls):
            rc, pos = _field(buf, pos, cb, g[start[c] * unit : start[c + 1] * unit], side, sp)
            if rc != 0:
                return rc
        for k in range(nu):  # unit k of the chunk: the next unit of its class (a stable sort's order)
            c = cls[k]
            src[k] = start[c] * unit
            start[c] += 1
    if pos != m or sp[0] != side.shape[0]:
        return -1
    _assemble(kind, bits, nb, ps, g, src, out)
    return 0
