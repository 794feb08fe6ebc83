"""rans32's streams of ≤ 8-bit symbols decoded two at a time: one table load a symbol, two chains in flight.

The same streams as :mod:`rans32` (backend ``rans``, id 7, the same bytes), for the decoders that
hold two of them at once (a delta chunk's byte planes, delta.py). rans32's vector loop is bound by
its chain of latencies, not by its instructions: a step's states need the previous step's (table
load, multiply, renormalisation mask, the shared word position, the word shuffle), so a second,
independent stream decoded in the same loop runs in the gaps of the first. Two things make room
for it: one packed slot table, ``dpack[slot] = freq | (slot − start) << 12 | symbol << 24`` (u32;
with at most 2**12 slots a model of two or more symbols has every frequency below 2**12 — a
one-symbol model has no slots, read_model_or_fill fills it), so a lane costs one scalar load where
rans32 does two, and the eight symbols of a group leave in one store.

The joint loop runs while both streams have whole steps and words; each stream then finishes on
its own (the one-stream loop, its last words on a padded copy, then the checked scalar steps),
with rans32's error codes. Models of more slots (``pb`` > 12) or wider alphabets decode with
rans32's decoder, one stream after the other.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from . import rans32 as R
from .freq_model import read_model_or_fill

PB_MAX = 12  # the largest model precision the packed table holds
_JIT = dict(nogil=True, cache=True, boundscheck=False)
_i8, _i16, _i32, _i64 = R._i8, R._i16, R._i32, R._i64
_V, _G, LANES = R._V, R._G, R.LANES
_PER = 8  # intrinsic arguments a stream: xs, io, buf, wo, dpack, out, limit, pb


@njit(**_JIT)
def decode_table8(freq, pb):  # freq: (A ≤ 256,) int64, pb ≤ 12 -> (2**pb,) uint32 packed slot table
    d = np.empty(1 << pb, np.uint32)
    slot = 0
    for s in range(freq.shape[0]):
        f = freq[s]
        for r in range(f):
            d[slot] = f | (r << 12) | (s << 24)
            slot += 1
    return d


def _codegen(nstreams: int, permute: bool):
    """IR of a loop decoding whole steps of ``nstreams`` streams together (see the module)."""

    def codegen(context, builder, signature, args):
        plut = context.make_array(signature.args[0])(context, builder, args[0]).data
        n = R._as_i64(builder, args[1])
        ctpop = R._ctpop(builder)
        undef = ir.Constant(R._v32, ir.Undefined)
        ss = []  # per stream: pointers and constants
        for s in range(nstreams):
            a = 2 + _PER * s
            sig = signature.args[a : a + _PER]
            arr = [context.make_array(sig[k])(context, builder, args[a + k]).data for k in (0, 1, 2, 4, 5)]
            pxs, pio, pbuf, pd, pout = arr
            pwords = builder.bitcast(builder.gep(pbuf, [R._as_i64(builder, args[a + 3])]), _i16.as_pointer())
            pbs = R._vsplat(builder, R._as_i32(builder, args[a + 7]))
            ss.append(dict(pxs=pxs, pio=pio, pd=pd, pout=pout, pwords=pwords, pbs=pbs,
                           mask=builder.sub(builder.shl(R._splat(1), pbs), R._splat(1)),
                           limit=R._as_i64(builder, args[a + 6]),
                           ot=ir.VectorType(ir.IntType(sig[5].dtype.bitwidth), _V)))
        i0 = builder.load(builder.gep(ss[0]["pio"], [ir.Constant(_i32, 1)]))
        x0 = [[builder.load(R._vptr(builder, st["pxs"], ir.Constant(_i64, g * _V), R._v32), align=4) for g in range(_G)]
              for st in ss]
        p0 = [builder.load(st["pio"]) for st in ss]
        pre = builder.basic_block
        loop = builder.append_basic_block("dec8_loop")
        done = builder.append_basic_block("dec8_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        i = builder.phi(_i64)
        i.add_incoming(i0, pre)
        pphi = [builder.phi(_i64) for _ in ss]
        xphi = [[builder.phi(R._v32) for _ in range(_G)] for _ in ss]
        for s in range(nstreams):
            pphi[s].add_incoming(p0[s], pre)
            for g in range(_G):
                xphi[s][g].add_incoming(x0[s][g], pre)
        base = builder.mul(i, ir.Constant(_i64, LANES))
        xn = [[None] * _G for _ in ss]
        pn = list(pphi)
        for g in range(_G):  # the streams' groups alternate: each chain's work beside the other's
            for s, st in enumerate(ss):
                x, p = xphi[s][g], pn[s]
                slot = builder.and_(x, st["mask"])
                d = undef
                for k in range(_V):  # scalar table loads (as rans32)
                    sk = builder.extract_element(slot, ir.Constant(_i32, k))
                    d = builder.insert_element(d, builder.load(builder.gep(st["pd"], [sk])), ir.Constant(_i32, k))
                ot = st["ot"]
                if ot.element.width == 8:  # each lane's top byte, by one byte shuffle
                    b32 = builder.bitcast(d, ir.VectorType(_i8, 4 * _V))
                    sym = builder.shuffle_vector(b32, ir.Constant(b32.type, ir.Undefined),
                                                 ir.Constant(ir.VectorType(_i32, _V), [4 * k + 3 for k in range(_V)]))
                else:
                    sym = builder.trunc(builder.lshr(d, R._splat(24)), ot)
                builder.store(sym, R._vptr(builder, st["pout"], builder.add(base, ir.Constant(_i64, g * _V)), ot), align=1)
                f = builder.and_(d, R._splat(0xFFF))
                bias = builder.and_(builder.lshr(d, R._splat(12)), R._splat(0xFFF))
                x = builder.add(builder.mul(f, builder.lshr(x, st["pbs"])), bias)
                renorm = builder.icmp_unsigned("<", x, R._splat(R.RANS_L))
                m8 = builder.bitcast(renorm, _i8)
                perm = builder.load(R._vptr(builder, plut, builder.mul(builder.zext(m8, _i64), ir.Constant(_i64, _V)), R._v32),
                                    align=4)
                if permute:
                    wv = builder.load(R._vptr(builder, st["pwords"], p, R._v16), align=1)
                    w = builder.call(R._permd(builder), [builder.zext(wv, R._v32), perm])
                else:
                    w = undef
                    for k in range(_V):
                        r = builder.sext(builder.extract_element(perm, ir.Constant(_i32, k)), _i64)
                        e = builder.load(builder.gep(st["pwords"], [builder.add(p, r)]), align=1)
                        w = builder.insert_element(w, builder.zext(e, _i32), ir.Constant(_i32, k))
                need = builder.sext(renorm, R._v32)
                xn[s][g] = builder.or_(builder.shl(x, builder.and_(need, R._splat(16))), builder.and_(w, need))
                pn[s] = builder.add(p, builder.zext(builder.call(ctpop, [m8]), _i64))
        inext = builder.add(i, ir.Constant(_i64, 1))
        go = builder.icmp_signed("<", inext, n)
        for s, st in enumerate(ss):
            go = builder.and_(go, builder.icmp_signed("<=", pn[s], st["limit"]))
        end = builder.basic_block
        i.add_incoming(inext, end)
        for s in range(nstreams):
            pphi[s].add_incoming(pn[s], end)
            for g in range(_G):
                xphi[s][g].add_incoming(xn[s][g], end)
        builder.cbranch(go, loop, done)
        builder.position_at_end(done)
        for s, st in enumerate(ss):
            for g in range(_G):
                builder.store(xn[s][g], R._vptr(builder, st["pxs"], ir.Constant(_i64, g * _V), R._v32), align=4)
            builder.store(pn[s], st["pio"])
            builder.store(inext, builder.gep(st["pio"], [ir.Constant(_i32, 1)]))
        return context.get_dummy_value()

    return codegen


def _make_steps(permute: bool):
    @intrinsic
    def steps1(typingctx, expand, nsteps, xs, io, buf, wo, dpack, out, limit, pb):
        """Whole decoding steps ``io[1] ..`` of one stream while fewer than ``nsteps`` are done and its
        word position ``io[0]`` is at most ``limit`` (rans32's dec_steps on the packed table; the
        caller makes sure the first step may run)."""
        R._contiguous(expand, xs, io, buf, dpack, out)
        return types.void(expand, nsteps, xs, io, buf, wo, dpack, out, limit, pb), _codegen(1, permute)

    @intrinsic
    def steps2(typingctx, expand, nsteps, xa, ia, ba, wa, da, oa, la, pa, xb, ib, bb, wb, db, ob, lb, pbb):
        """:func:`steps1` for two streams in one loop (both from the same step ``ia[1]``), while both
        may take a whole step."""
        R._contiguous(expand, xa, ia, ba, da, oa, xb, ib, bb, db, ob)
        sig = types.void(expand, nsteps, xa, ia, ba, wa, da, oa, la, pa, xb, ib, bb, wb, db, ob, lb, pbb)
        return sig, _codegen(2, permute)

    return steps1, steps2


_steps1_permd, _steps2_permd = _make_steps(True)
_steps1_portable, _steps2_portable = _make_steps(False)


@njit(inline="always", **_JIT)
def _dec1(x, dpack, mask, pb, buf, wo, pos, total, out, i):
    """One checked decoding step of one lane (rans32._dec1 on the packed table)."""
    d = np.int64(dpack[x & mask])
    out[i] = d >> 24
    x = (d & 0xFFF) * (x >> pb) + ((d >> 12) & 0xFFF)
    if x < R.RANS_L:
        w = np.int64(0)
        if pos < total:
            q = wo + 2 * pos
            w = np.int64(buf[q]) | (np.int64(buf[q + 1]) << 8)
        x = (x << 16) | w
        pos += 1
    return x, pos


@njit(**_JIT)
def _states(buf, n, out, xs):  # -> 0, or rans32's code for a stream that cannot start
    m = buf.shape[0]
    if m < R.STATE_BYTES or (m - R.STATE_BYTES) % 2 or out.shape[0] < n:
        return -1
    for j in range(LANES):
        a = 4 * j
        x = np.int64(buf[a]) | (np.int64(buf[a + 1]) << 8) | (np.int64(buf[a + 2]) << 16) | (np.int64(buf[a + 3]) << 24)
        if x < R.RANS_L:
            return -2
        xs[j] = x
    return 0


def _make_finish(permute: bool):
    @njit(**_JIT)
    def finish(buf, n, dpack, pb, out, xs, io):
        """Decode the rest of a stream from the states ``xs`` and ``io`` (position, steps done): whole
        steps as vectors (the last words on a padded copy, as rans32), the rest lane by lane; the
        final checks. 0 or rans32's error code."""
        wo = R.STATE_BYTES
        total = (buf.shape[0] - R.STATE_BYTES) // 2
        st = n // LANES
        if io[1] < st and io[0] <= total - LANES:
            if permute:
                _steps1_permd(R.EXPAND, st, xs, io, buf, wo, dpack, out, total - LANES, pb)
            else:
                _steps1_portable(R.EXPAND, st, xs, io, buf, wo, dpack, out, total - LANES, pb)
        if io[1] < st:
            p0 = io[0]
            left = total - p0
            pad = np.zeros(2 * (left + 2 * LANES), np.uint8)
            pad[: 2 * left] = buf[wo + 2 * p0 : wo + 2 * total]
            io[0] = 0
            if permute:
                _steps1_permd(R.EXPAND, st, xs, io, pad, 0, dpack, out, left + LANES, pb)
            else:
                _steps1_portable(R.EXPAND, st, xs, io, pad, 0, dpack, out, left + LANES, pb)
            io[0] += p0
        pos = io[0]
        mask = (1 << pb) - 1
        for i in range(io[1] * LANES, n):
            j = i % LANES
            x, pos = _dec1(np.int64(xs[j]), dpack, mask, pb, buf, wo, pos, total, out, i)
            xs[j] = x
        if pos != total:
            return -4
        for j in range(LANES):
            if xs[j] != R.RANS_L:
                return -4
        return 0

    return finish


_finish_permd = _make_finish(True)
_finish_portable = _make_finish(False)


def _make_decode(permute: bool):  # the flag alone in the closures (see rans32._make_decode)
    @njit(**_JIT)
    def fin(buf, n, dpack, pb, out, xs, io):
        if permute:
            return _finish_permd(buf, n, dpack, pb, out, xs, io)
        return _finish_portable(buf, n, dpack, pb, out, xs, io)

    @njit(**_JIT)
    def decode2(ba, na, da, pa, oa, bb, nb, db, pbb, ob):
        """Two streams (states ‖ words, as rans32.decode takes them) with their packed tables:
        (code a, code b), each 0 or rans32.decode's code."""
        xa = np.empty(LANES, np.uint32)
        xb = np.empty(LANES, np.uint32)
        ia = np.zeros(2, np.int64)
        ib = np.zeros(2, np.int64)
        ra = _states(ba, na, oa, xa)
        rb = _states(bb, nb, ob, xb)
        if ra == 0 and rb == 0:
            ta = (ba.shape[0] - R.STATE_BYTES) // 2
            tb = (bb.shape[0] - R.STATE_BYTES) // 2
            st = min(na, nb) // LANES
            if st > 0 and ta >= LANES and tb >= LANES:
                if permute:
                    _steps2_permd(R.EXPAND, st, xa, ia, ba, R.STATE_BYTES, da, oa, ta - LANES, pa,
                                  xb, ib, bb, R.STATE_BYTES, db, ob, tb - LANES, pbb)
                else:
                    _steps2_portable(R.EXPAND, st, xa, ia, ba, R.STATE_BYTES, da, oa, ta - LANES, pa,
                                     xb, ib, bb, R.STATE_BYTES, db, ob, tb - LANES, pbb)
        if ra == 0:
            ra = fin(ba, na, da, pa, oa, xa, ia)
        if rb == 0:
            rb = fin(bb, nb, db, pbb, ob, xb, ib)
        return ra, rb

    @njit(**_JIT)
    def decode(buf, n, dpack, pb, out):
        """One stream with its packed table (what decode2 does for each): 0 or rans32.decode's code."""
        xs = np.empty(LANES, np.uint32)
        io = np.zeros(2, np.int64)
        rc = _states(buf, n, out, xs)
        if rc != 0:
            return rc
        return fin(buf, n, dpack, pb, out, xs, io)

    return decode2, decode


decode2, decode = _make_decode(R.PERMUTE)
decode2_portable, decode_portable = _make_decode(False)


@njit(**_JIT)
def decode_streams2(pa, pb_, A, oa, ob):  # pa, pb_: (m,) uint8 = model ‖ states ‖ words; A = 2**width
    """Two ``rans`` streams (rans32.decode_stream's layout) into oa and ob: 0, or the first nonzero
    code of rans32.decode_stream. Both on the packed tables together where their models allow it
    (A ≤ 256, pb ≤ 12), else one after the other with rans32's decoder."""
    fa = np.zeros(A, np.int64)
    fb = np.zeros(A, np.int64)
    qa, ua = read_model_or_fill(pa, A, fa, oa)
    qb, ub = read_model_or_fill(pb_, A, fb, ob)
    if qa < 0 or qb < 0:
        return qa if qa < 0 else qb
    if qa > 0 and qb > 0 and A <= 256 and qa <= PB_MAX and qb <= PB_MAX:
        ra, rb = decode2(pa[ua:], oa.shape[0], decode_table8(fa, qa), qa, oa,
                         pb_[ub:], ob.shape[0], decode_table8(fb, qb), qb, ob)
        return ra if ra != 0 else rb
    rc = 0
    if qa > 0:
        dsym, dinfo = R.decode_table(fa, qa)
        rc = R.decode(pa[ua:], oa.shape[0], dsym, dinfo, qa, oa)
    if rc == 0 and qb > 0:
        dsym, dinfo = R.decode_table(fb, qb)
        rc = R.decode(pb_[ub:], ob.shape[0], dsym, dinfo, qb, ob)
    return rc
