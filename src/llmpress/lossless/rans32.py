"""Wide interleaved rANS: 32 lanes, coded and decoded eight lanes a vector.

The coder is that of kernels.py (32-bit states in ``[2**16, 2**32)``, 16-bit renormalisation,
a static model of ``2**pb`` slots, every lane with its own word stream), with ``LANES = 32``
lanes instead of four: symbol ``i`` goes to lane ``i % 32``. The scalar decoder is bound by its
~20 instructions a symbol (~2.1 ns); with 32 lanes one decoding step is four independent
vectors of eight states: the arithmetic (``f·(x >> pb) + bias``, the renormalisation test,
shift and merge) runs on vectors, and the table and word loads are eight scalar loads into a
vector (on Zen 3 these beat ``vpgatherdd`` by ~1.6x, measured: 1.2 vs 2.0 ns/symbol). The
loops are written in LLVM IR through numba intrinsics (numba's own vectoriser leaves the lane
loop scalar); the IR is target-independent (``<8 x i32>`` vectors; LLVM splits them for
narrower units), so every machine numba runs on runs it. Encoding is vectorised the same way,
the quotient ``x // f`` from a double reciprocal and one correction (2.2–2.9 vs 3.4–4.4
ns/symbol for the scalar 32-lane encoder; the same bytes). Measured decode on MiniLM BF16
heads, one thread on a quiet 16-core machine: 1.2 ns/symbol vs 2.3–3.4 for the four-lane
coder (bench/lossless.py --kernel; scalar paths kept as references and tested against).

Stream layout: the total word count ``m`` and the first ``LANES - 1`` lane lengths as zigzag
deviations from ``m // LANES`` (LEB128 varints: mostly one byte each), padded to an even byte
count, then each lane's u16 words: its final state (two words), then its renormalisation
words in decoding order. Every state ends at ``2**16`` and every lane is read to its end,
which the decoder checks; word reads clamp at each lane's last word, so a hostile stream
cannot read outside its buffer.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from .model import read_model_or_fill
from .kernels import _varint, decode_table  # shared with the 4-lane coder (varints of 36 bits here)

LANES = 32
RANS_L = 1 << 16
_V = 8  # lanes per vector (one AVX2 register of u32)
DIRECT_SYM = True  # each symbol loaded and stored as a scalar (vs. a vector of them: ~8 % slower)

_JIT = dict(nogil=True, cache=True, boundscheck=False)


# ------------------------------------------------------------------------------ encoder


@njit(inline="always", **_JIT)
def _enc(x, f, c, rf, pb, sh, buf, j, pos):
    """One encoding step: renormalise (the word is always written, the stack grows only when
    needed), then ``x -> (x // f) << pb | (x % f + c)``. The quotient comes from a double
    reciprocal ``rf = 1/f`` and one correction (x < 2**32, so ``x·rf`` is below the true
    quotient by less than one): no integer division (~2x faster than ``div``, measured)."""
    e = np.int64(x >= (f << sh))
    buf[j, pos - 1] = x & 0xFFFF
    pos -= e
    x >>= e << 4
    q = np.int64(np.uint32(x) // np.uint32(f))
    return (q << pb) + (x - q * f) + c, pos


@njit(inline="always", **_JIT)
def _put_varint(buf, o, x):  # LEB128 at buf[o]; -> next offset
    while x >= 0x80:
        buf[o] = (x & 0x7F) | 0x80
        x >>= 7
        o += 1
    buf[o] = x
    return o + 1


@njit(**_JIT)
def _assemble(buf, xs, ps, cap):  # lanes' stacks buf (L, cap), final states, stack tops -> stream bytes
    L = LANES
    total = 0
    for j in range(L):
        total += cap - ps[j] + 2
    hdr = np.empty(5 * L + 6, np.uint8)
    o = _put_varint(hdr, 0, total)
    mean = total // L
    for j in range(L - 1):  # the last lane's length is what the others leave
        d = cap - ps[j] + 2 - mean
        o = _put_varint(hdr, o, 2 * d if d >= 0 else -2 * d - 1)
    if o & 1:
        hdr[o] = 0
        o += 1
    out = np.empty(o + 2 * total, np.uint8)
    out[:o] = hdr[:o]
    words = out[o:].view(np.uint16)  # little-endian hosts (as numpy's "<u2" elsewhere)
    k = 0
    for j in range(L):
        words[k] = xs[j] & 0xFFFF
        words[k + 1] = xs[j] >> 16
        k += 2
        ln = cap - ps[j]
        words[k : k + ln] = buf[j, ps[j] :]
        k += ln
    return out


@njit(**_JIT)
def encode_scalar(sym, freq, pb):  # sym: (n,) uint; freq: (A,) int64 summing to 2**pb -> (m,) uint8
    """The reference encoder (the bytes of :func:`encode`): lanes are independent, so they are
    coded eight at a time (eight division chains in flight), backwards."""
    n = sym.shape[0]
    start, _, rcp = encoder_tables(freq)
    L = LANES
    steps = n // L
    rem = n - steps * L
    cap = steps + 3
    buf = np.empty((L, cap), np.uint16)
    ps = np.empty(L, np.int64)
    xs = np.empty(L, np.int64)
    sh = 32 - pb
    G = 8  # lanes coded together: eight independent division chains in flight
    xg = np.empty(G, np.int64)
    for g in range(0, L, G):
        x0 = x1 = x2 = x3 = x4 = x5 = x6 = x7 = np.int64(RANS_L)
        p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = cap
        for j in range(G - 1, -1, -1):  # the partial last step: lanes < rem, one at a time
            if g + j < rem:
                ln = g + j
                s = sym[steps * L + ln]
                xg[j], ps[ln] = _enc(np.int64(RANS_L), freq[s], start[s], rcp[s], pb, sh, buf, ln, cap)
            else:
                xg[j], ps[g + j] = RANS_L, cap
        x0, x1, x2, x3, x4, x5, x6, x7 = xg[0], xg[1], xg[2], xg[3], xg[4], xg[5], xg[6], xg[7]
        p0, p1, p2, p3 = ps[g], ps[g + 1], ps[g + 2], ps[g + 3]
        p4, p5, p6, p7 = ps[g + 4], ps[g + 5], ps[g + 6], ps[g + 7]
        for i in range(steps - 1, -1, -1):
            b = i * L + g
            s = sym[b + 7]
            x7, p7 = _enc(x7, freq[s], start[s], rcp[s], pb, sh, buf, g + 7, p7)
            s = sym[b + 6]
            x6, p6 = _enc(x6, freq[s], start[s], rcp[s], pb, sh, buf, g + 6, p6)
            s = sym[b + 5]
            x5, p5 = _enc(x5, freq[s], start[s], rcp[s], pb, sh, buf, g + 5, p5)
            s = sym[b + 4]
            x4, p4 = _enc(x4, freq[s], start[s], rcp[s], pb, sh, buf, g + 4, p4)
            s = sym[b + 3]
            x3, p3 = _enc(x3, freq[s], start[s], rcp[s], pb, sh, buf, g + 3, p3)
            s = sym[b + 2]
            x2, p2 = _enc(x2, freq[s], start[s], rcp[s], pb, sh, buf, g + 2, p2)
            s = sym[b + 1]
            x1, p1 = _enc(x1, freq[s], start[s], rcp[s], pb, sh, buf, g + 1, p1)
            s = sym[b]
            x0, p0 = _enc(x0, freq[s], start[s], rcp[s], pb, sh, buf, g, p0)
        xs[g], xs[g + 1], xs[g + 2], xs[g + 3] = x0, x1, x2, x3
        xs[g + 4], xs[g + 5], xs[g + 6], xs[g + 7] = x4, x5, x6, x7
        ps[g], ps[g + 1], ps[g + 2], ps[g + 3] = p0, p1, p2, p3
        ps[g + 4], ps[g + 5], ps[g + 6], ps[g + 7] = p4, p5, p6, p7
    return _assemble(buf, xs, ps, cap)


@intrinsic
def _enc_steps_simd(typingctx, xs, ps, sym, fc, rcp, buf, nsteps, pb):
    """Encode steps ``nsteps-1 .. 0`` of all LANES lanes, eight lanes a vector: states xs
    (LANES,) uint32 and stack positions ps (LANES,) int32 (flat indices into buf (L*cap,)
    uint16; both updated in place), sym (nsteps*LANES,) uint8/uint16, per symbol
    fc (A,) uint32 = freq | start << 16 and rcp (A,) float64 = 1/freq. The quotient ``x // f`` is ``floor(x·rcp)``
    corrected by one (doubles hold x < 2**32 exactly; the product is low by less than one)."""
    sig = types.void(xs, ps, sym, fc, rcp, buf, nsteps, pb)

    def codegen(context, builder, signature, args):
        pxs, pps, psym, pf, prc, pbuf = [context.make_array(t)(context, builder, a).data
                                         for t, a in zip(signature.args[:6], args[:6])]
        n = builder.sext(args[6], _i64) if args[6].type.width < 64 else args[6]
        pbv = builder.trunc(args[7], _i32) if args[7].type.width > 32 else args[7]
        undef = ir.Constant(_v32, ir.Undefined)

        def splat(v):
            return builder.shuffle_vector(builder.insert_element(undef, v, ir.Constant(_i32, 0)), undef,
                                          ir.Constant(_v32, [0] * _V))

        pbs = splat(pbv)
        shv = builder.sub(_splat(32), pbs)
        G = LANES // _V
        st = ir.VectorType(ir.IntType(signature.args[2].dtype.bitwidth), _V)
        vd = ir.VectorType(ir.DoubleType(), _V)

        def vptr(p, off, vt):
            return builder.bitcast(builder.gep(p, [off]), vt.as_pointer())

        def gat(bp, idx, ty, vt):
            v = ir.Constant(vt, ir.Undefined)
            for k in range(_V):
                ik = builder.extract_element(idx, ir.Constant(_i32, k))
                v = builder.insert_element(v, builder.load(builder.gep(bp, [ik])), ir.Constant(_i32, k))
            return v

        x0 = [builder.load(vptr(pxs, ir.Constant(_i64, g * _V), _v32), align=4) for g in range(G)]
        p0 = [builder.load(vptr(pps, ir.Constant(_i64, g * _V), _v32), align=4) for g in range(G)]
        nm1 = builder.sub(n, ir.Constant(_i64, 1))
        pre = builder.basic_block
        loop = builder.append_basic_block("enc_loop")
        done = builder.append_basic_block("enc_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        i = builder.phi(_i64)
        i.add_incoming(nm1, pre)
        xphi = [builder.phi(_v32) for _ in range(G)]
        pphi = [builder.phi(_v32) for _ in range(G)]
        for g in range(G):
            xphi[g].add_incoming(x0[g], pre)
            pphi[g].add_incoming(p0[g], pre)
        base = builder.mul(i, ir.Constant(_i64, LANES))
        xn, pn = [], []
        for g in range(G):
            x, p = xphi[g], pphi[g]
            sv = builder.load(vptr(psym, builder.add(base, ir.Constant(_i64, g * _V)), st), align=1)
            s = builder.zext(sv, _v32) if st.element.width < 32 else sv
            fc = gat(pf, s, _i32, _v32)  # freq | start << 16: one load a symbol for both
            f = builder.and_(fc, _splat(0xFFFF))
            c = builder.lshr(fc, _splat(16))
            rf = gat(prc, s, None, vd)
            e = builder.sext(builder.icmp_unsigned(">=", x, builder.shl(f, shv)), _v32)  # -1: push a word
            for k in range(_V):  # the word is always written; the stack grows only where e
                pk = builder.extract_element(p, ir.Constant(_i32, k))
                xk = builder.extract_element(x, ir.Constant(_i32, k))
                builder.store(builder.trunc(xk, _i16), builder.gep(pbuf, [builder.sub(pk, ir.Constant(_i32, 1))]))
            p = builder.add(p, e)
            x = builder.lshr(x, builder.and_(e, _splat(16)))
            # after renormalisation x < f << (32 - pb), so x // f < 2**20: a signed conversion
            # suffices (AVX2 has none from double to unsigned)
            q = builder.fptosi(builder.fmul(builder.uitofp(x, vd), rf), _v32)
            r = builder.sub(x, builder.mul(q, f))
            ge = builder.sext(builder.icmp_unsigned(">=", r, f), _v32)
            q = builder.sub(q, ge)
            r = builder.sub(r, builder.and_(f, ge))
            x = builder.add(builder.add(builder.shl(q, pbs), r), c)
            xn.append(x)
            pn.append(p)
        inext = builder.sub(i, ir.Constant(_i64, 1))
        body_end = builder.basic_block
        i.add_incoming(inext, body_end)
        for g in range(G):
            xphi[g].add_incoming(xn[g], body_end)
            pphi[g].add_incoming(pn[g], body_end)
        builder.cbranch(builder.icmp_signed(">=", inext, ir.Constant(_i64, 0)), loop, done)
        builder.position_at_end(done)
        for g in range(G):
            builder.store(xn[g], vptr(pxs, ir.Constant(_i64, g * _V), _v32), align=4)
            builder.store(pn[g], vptr(pps, ir.Constant(_i64, g * _V), _v32), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(**_JIT)
def encoder_tables(freq):  # freq: (A,) int64 -> (start (A,) int64, freq | start << 16 (A,) uint32, 1/freq (A,) float64)
    """Per symbol: its first slot, frequency and first slot in one u32 (one load for both in the
    vector encoders), and the reciprocal the quotient ``x // f`` is computed from."""
    A = freq.shape[0]
    start = np.empty(A, np.int64)
    fc = np.empty(A, np.uint32)
    rcp = np.zeros(A, np.float64)
    acc = 0
    for s in range(A):
        start[s] = acc
        fc[s] = freq[s] | (acc << 16)
        acc += freq[s]
        if freq[s] > 0:
            rcp[s] = 1.0 / freq[s]
    return start, fc, rcp


@njit(**_JIT)
def encode(sym, freq, pb):  # sym: (n,) uint; freq: (A,) int64 summing to 2**pb -> (m,) uint8
    """Encode ``sym`` on ``LANES`` lanes (every symbol needs ``freq > 0``): the partial last
    step lane by lane, then the full steps backwards, eight lanes a vector (_enc_steps_simd;
    2.2 vs 3.4 ns/symbol for :func:`encode_scalar`, the same bytes)."""
    n = sym.shape[0]
    start, f32, rcp = encoder_tables(freq)
    L = LANES
    steps = n // L
    rem = n - steps * L
    cap = steps + 3
    flat = np.empty(L * cap, np.uint16)
    buf = flat.reshape((L, cap))
    ps = np.empty(L, np.int64)
    xs = np.empty(L, np.int64)
    sh = 32 - pb
    for j in range(L):
        xs[j], ps[j] = RANS_L, cap
        if j < rem:
            s = sym[steps * L + j]
            xs[j], ps[j] = _enc(np.int64(RANS_L), freq[s], start[s], rcp[s], pb, sh, buf, j, cap)
    if steps > 0:
        x32 = np.empty(L, np.uint32)
        p32 = np.empty(L, np.int32)
        for j in range(L):
            x32[j] = xs[j]
            p32[j] = j * cap + ps[j]
        _enc_steps_simd(x32, p32, sym, f32, rcp, flat, steps, pb)
        for j in range(L):
            xs[j] = x32[j]
            ps[j] = p32[j] - j * cap
    return _assemble(buf, xs, ps, cap)


# ------------------------------------------------------------------------------ decoder


_i1, _i8, _i16, _i32, _i64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_v32 = ir.VectorType(_i32, _V)
_v16 = ir.VectorType(_i16, _V)


def _splat(v: int) -> ir.Constant:
    return ir.Constant(_v32, [v] * _V)


@intrinsic
def _steps_simd(typingctx, xs, ps, last, dsym, dinfo, buf, wo, out, nsteps, pb):
    """``nsteps`` decoding steps of all LANES lanes: states xs (LANES,) uint32, word positions
    ps (LANES,) int32 (updated in place), last (LANES,) int32 = each lane's last word (reads
    clamp there), dsym / dinfo (2**pb,) uint32, the u16 words at byte ``wo`` of buf (uint8),
    out (nsteps*LANES,) uint8/uint16."""
    sig = types.void(xs, ps, last, dsym, dinfo, buf, wo, out, nsteps, pb)

    def codegen(context, builder, signature, args):
        ptr = [context.make_array(t)(context, builder, a).data for t, a in zip(signature.args[:6], args[:6])]
        pxs, pps, plast, pdsym, pdinfo, pbuf = ptr
        pout = context.make_array(signature.args[7])(context, builder, args[7]).data
        wo = builder.sext(args[6], _i64) if args[6].type.width < 64 else args[6]
        pwords = builder.bitcast(builder.gep(pbuf, [wo]), _i16.as_pointer())
        n = builder.sext(args[8], _i64) if args[8].type.width < 64 else args[8]
        pbv = builder.trunc(args[9], _i32) if args[9].type.width > 32 else args[9]
        undef = ir.Constant(_v32, ir.Undefined)
        pbs = builder.shuffle_vector(builder.insert_element(undef, pbv, ir.Constant(_i32, 0)), undef,
                                     ir.Constant(_v32, [0] * _V))
        mask = builder.sub(builder.shl(_splat(1), pbs), _splat(1))
        G = LANES // _V
        ot = ir.VectorType(ir.IntType(signature.args[7].dtype.bitwidth), _V)

        def vptr(p, g, vt):
            return builder.bitcast(builder.gep(p, [ir.Constant(_i64, g * _V)]), vt.as_pointer())

        x0 = [builder.load(vptr(pxs, g, _v32), align=4) for g in range(G)]
        p0 = [builder.load(vptr(pps, g, _v32), align=4) for g in range(G)]
        lastv = [builder.load(vptr(plast, g, _v32), align=4) for g in range(G)]
        pre = builder.basic_block
        loop = builder.append_basic_block("rans_loop")
        done = builder.append_basic_block("rans_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        i = builder.phi(_i64)
        i.add_incoming(ir.Constant(_i64, 0), pre)
        xphi = [builder.phi(_v32) for _ in range(G)]
        pphi = [builder.phi(_v32) for _ in range(G)]
        for g in range(G):
            xphi[g].add_incoming(x0[g], pre)
            pphi[g].add_incoming(p0[g], pre)
        xn, pn = [], []

        def gat(bp, idx, msk):  # 8 scalar loads bp[idx[k]], widened to i32 (masked: 0 where msk is 0)
            v = undef
            for k in range(_V):
                ik = builder.extract_element(idx, ir.Constant(_i32, k))
                e = builder.load(builder.gep(bp, [ik]), align=1 if bp is pwords else None)
                v = builder.insert_element(v, builder.zext(e, _i32) if e.type != _i32 else e, ir.Constant(_i32, k))
            return v if msk is None else builder.and_(v, msk)

        base = builder.mul(i, ir.Constant(_i64, LANES))
        for g in range(G):
            x, p = xphi[g], pphi[g]
            slot = builder.and_(x, mask)
            d = gat(pdinfo, slot, None)
            if DIRECT_SYM:  # each symbol loaded and stored as a scalar
                for k in range(_V):
                    ik = builder.extract_element(slot, ir.Constant(_i32, k))
                    sk = builder.load(builder.gep(pdsym, [ik]))
                    if sk.type.width > ot.element.width:
                        sk = builder.trunc(sk, ot.element)
                    builder.store(sk, builder.gep(pout, [builder.add(base, ir.Constant(_i64, g * _V + k))]))
            else:
                s = gat(pdsym, slot, None)
                o = builder.gep(pout, [builder.add(base, ir.Constant(_i64, g * _V))])
                builder.store(builder.trunc(s, ot), builder.bitcast(o, ot.as_pointer()), align=1)
            f = builder.and_(d, _splat(0xFFFF))
            bias = builder.lshr(d, _splat(16))
            x = builder.add(builder.mul(f, builder.lshr(x, pbs)), bias)
            need = builder.sext(builder.icmp_unsigned("<", x, _splat(RANS_L)), _v32)  # -1 where renorm
            idx = builder.select(builder.icmp_signed("<", p, lastv[g]), p, lastv[g])
            w = gat(pwords, idx, need)
            x = builder.or_(builder.shl(x, builder.and_(need, _splat(16))), w)
            p = builder.sub(p, need)
            xn.append(x)
            pn.append(p)
        inext = builder.add(i, ir.Constant(_i64, 1))
        body_end = builder.basic_block
        i.add_incoming(inext, body_end)
        for g in range(G):
            xphi[g].add_incoming(xn[g], body_end)
            pphi[g].add_incoming(pn[g], body_end)
        builder.cbranch(builder.icmp_signed("<", inext, n), loop, done)
        builder.position_at_end(done)
        for g in range(G):
            builder.store(xn[g], vptr(pxs, g, _v32), align=4)
            builder.store(pn[g], vptr(pps, g, _v32), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", **_JIT)
def _dec1(x, dsym, dinfo, mask, pb, buf, wo, pos, last, out, i):
    """One scalar decoding step of a lane (words: u16 at byte ``wo`` of buf; reads clamp at ``last``)."""
    sl = x & mask
    out[i] = dsym[sl]
    d = np.int64(dinfo[sl])
    x = (d & 0xFFFF) * (x >> pb) + (d >> 16)
    e = np.int64(x < RANS_L)
    q = wo + 2 * min(pos, last)
    w = np.int64(buf[q]) | (np.int64(buf[q + 1]) << 8)
    x = (x << (e << 4)) | (w & -e)
    return x, pos + e


@njit(**_JIT)
def _steps_scalar(xs, ps, last, dsym, dinfo, buf, wo, out, nsteps, pb):  # the contract of _steps_simd
    mask = (1 << pb) - 1
    for i in range(nsteps):
        b = i * LANES
        for j in range(LANES):
            x, p = _dec1(np.int64(xs[j]), dsym, dinfo, mask, pb, buf, wo, np.int64(ps[j]), np.int64(last[j]), out, b + j)
            xs[j] = x
            ps[j] = p


def _make_decode(simd: bool):
    # only the flag in the closure: numba keys its cache on the closure's values, and a captured
    # intrinsic or dispatcher pickles differently in every process (a new compile each time)
    @njit(**_JIT)
    def decode(buf, n, dsym, dinfo, pb, out):  # buf: (m,) uint8 (see encode); out: (n,) uint8/uint16
        """Decode ``n`` symbols into ``out``; 0 on success, a negative code on a bad stream."""
        m = buf.shape[0]
        L = LANES
        lens = np.empty(L, np.int64)
        total, o = _varint(buf, 0, 35)
        if o < 0:
            return -1
        mean = total // L
        rest = total
        for j in range(L - 1):
            z, o = _varint(buf, o, 35)
            if o < 0:
                return -1
            lens[j] = mean + (z >> 1 if z % 2 == 0 else -((z + 1) >> 1))
            rest -= lens[j]
        lens[L - 1] = rest
        for j in range(L):
            if lens[j] < 2:
                return -1
        o += o & 1
        if o > m or m - o != 2 * total:
            return -1
        xs = np.empty(L, np.uint32)
        ps = np.empty(L, np.int32)
        last = np.empty(L, np.int32)
        ends = np.empty(L, np.int64)
        q = 0
        for j in range(L):
            a = o + 2 * q
            x = np.int64(buf[a]) | (np.int64(buf[a + 1]) << 8) | (np.int64(buf[a + 2]) << 16) | (np.int64(buf[a + 3]) << 24)
            if x < RANS_L:
                return -2
            xs[j] = x
            ps[j] = q + 2
            ends[j] = q + lens[j]
            last[j] = q + lens[j] - 1
            q += lens[j]
        st = n // L
        if st > 0:
            if simd:
                _steps_simd(xs, ps, last, dsym, dinfo, buf, o, out, st, pb)
            else:
                _steps_scalar(xs, ps, last, dsym, dinfo, buf, o, out, st, pb)
        mask = (1 << pb) - 1
        for j in range(n - st * L):
            x, p = _dec1(np.int64(xs[j]), dsym, dinfo, mask, pb, buf, o, np.int64(ps[j]), np.int64(last[j]), out, st * L + j)
            xs[j] = x
            ps[j] = p
        for j in range(L):
            if ps[j] != ends[j] or xs[j] != RANS_L:
                return -4
        return 0

    return decode


decode = _make_decode(True)
decode_scalar = _make_decode(False)


@njit(**_JIT)
def decode_stream(buf, A, out):  # buf: (m,) uint8 = model bytes ‖ lanes; A = 2**width; out: (n,) uint8/uint16
    """Model (model.read_model2), decode table and lanes in one call (no per-step Python);
    0 on success, -8 a malformed model, -9 bytes after a single-symbol model, else decode's code."""
    f = np.zeros(A, np.int64)
    pb, used = read_model_or_fill(buf, A, f, out)
    if pb <= 0:
        return pb
    dsym, dinfo = decode_table(f, pb)
    return decode(buf[used:], out.shape[0], dsym, dinfo, pb, out)

