"""32-lane rANS with one shared word stream (backend ``rans``, id 7).

32 lanes (symbol ``i`` on lane ``i % 32``), 32-bit states in ``[2**16, 2**32)``, 16-bit
renormalisation, a static model of ``2**pb`` slots (the coder of kernels.py, with 32 lanes
instead of four). All lanes share one word stream, in decoding order: within a step, the lanes
that renormalise take the next words in lane order. For a group of eight lanes the
renormalisation mask (8 bits) says which lanes take a word, and lane ``k`` takes word ``rank of
k among the set bits``; so one 8-word load and one ``vpermd`` with a shuffle looked up by the
mask give every lane its word, and the position advances by ``popcount(mask)``. The encoder
(backwards, as rANS must) does the inverse: the words of the lanes that renormalise are packed
to the top of an 8-word vector by a looked-up shuffle and stored below the stack's top in one
store. The step loops are LLVM IR through numba intrinsics (numba's own vectoriser leaves the
lane loop scalar); the IR is target-independent (``<8 x i32>`` vectors).

Where the host has no AVX2 (or numba compiles for a generic CPU), the shuffle becomes eight
scalar loads (decoder) or eight scalar stores (encoder): same bytes, slower.

Stream layout (docs/FORMAT.md): the 32 final states (u32 little-endian), then the u16 words in
decoding order. The decoder checks that every state ends at ``2**16`` and that every word was
read. The vector loop runs only while a whole step's reads (at most 32 words) lie inside the
stream; the last steps (and a hostile stream) decode one lane at a time with checked reads.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from .kernels import decode_table
from .freq_model import read_model_or_fill

LANES = 32
RANS_L = 1 << 16  # lower bound of a state; states live in [RANS_L, RANS_L << 16)
_V = 8  # lanes per vector (one AVX2 register of u32)
_G = LANES // _V  # vectors of eight lanes
STATE_BYTES = 4 * LANES

_JIT = dict(nogil=True, cache=True, boundscheck=False)

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_v32 = ir.VectorType(_i32, _V)
_v16 = ir.VectorType(_i16, _V)
_vd = ir.VectorType(ir.DoubleType(), _V)


def _splat(v: int) -> ir.Constant:
    return ir.Constant(_v32, [v] * _V)


@njit(**_JIT)
def encoder_tables(freq):  # freq: (A,) int64 -> (start (A,) int64, freq | start << 16 (A,) uint32, 1/freq (A,) float64)
    """Per symbol: its first slot, frequency and first slot in one u32 (one load for both in the
    vector encoder), and the reciprocal the quotient ``x // f`` is computed from."""
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


def _host_permutes() -> bool:
    """Whether the code numba emits here may use AVX2's ``vpermd`` (host CPU, with AVX2)."""
    try:
        import llvmlite.binding as llvm
        from numba.core import config

        if config.CPU_NAME not in (None, "host") or config.CPU_FEATURES is not None:
            return False  # a build for another (generic) CPU: target-independent code only
        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except Exception:  # noqa: BLE001 - no feature query on this platform: the portable path
        return False


PERMUTE = _host_permutes()


def _shuffles() -> tuple[np.ndarray, np.ndarray]:
    """(256, 8) int32 tables indexed by an 8-lane mask. ``expand[m, k]``: the word (of the eight
    loaded at the stream position) that lane ``k`` takes = the rank of bit ``k`` among the set
    bits. ``compress[m, 8 - c + r]`` (c = popcount m): the lane whose word is the ``r``-th
    pushed, so the pushed words end up at the top of the vector, in lane order."""
    expand = np.zeros((256, _V), np.int32)
    compress = np.zeros((256, _V), np.int32)
    for m in range(256):
        lanes = [k for k in range(_V) if m >> k & 1]
        for r, k in enumerate(lanes):
            expand[m, k] = r
            compress[m, _V - len(lanes) + r] = k
    return expand, compress


EXPAND, COMPRESS = _shuffles()


def _ptrs(context, builder, sig, args, which):
    return [context.make_array(sig.args[k])(context, builder, args[k]).data for k in which]


def _as_i64(builder, v):
    return builder.sext(v, _i64) if v.type.width < 64 else v


def _as_i32(builder, v):
    return builder.trunc(v, _i32) if v.type.width > 32 else v


def _vsplat(builder, v):
    undef = ir.Constant(_v32, ir.Undefined)
    return builder.shuffle_vector(builder.insert_element(undef, v, ir.Constant(_i32, 0)), undef,
                                  ir.Constant(_v32, [0] * _V))


def _ctpop(builder):
    mod = builder.module
    return mod.globals.get("llvm.ctpop.i8") or ir.Function(mod, ir.FunctionType(_i8, [_i8]), "llvm.ctpop.i8")


def _permd(builder):  # declared only by the builds that call it (AVX2 hosts)
    mod = builder.module
    return mod.globals.get("llvm.x86.avx2.permd") or ir.Function(
        mod, ir.FunctionType(_v32, [_v32, _v32]), "llvm.x86.avx2.permd")


def _contiguous(*arrays) -> None:
    """The IR loops address arrays by their data pointer alone: refuse, at compile time, any
    array that is not C-contiguous (a strided ``out`` would be written wrongly, or before it)."""
    from numba.core.errors import TypingError

    for a in arrays:
        if getattr(a, "layout", "C") != "C":
            raise TypingError(f"rans32: arrays must be C-contiguous, got {a}")


def _vptr(builder, p, off, vt):
    return builder.bitcast(builder.gep(p, [off]), vt.as_pointer())


def _open_loop(builder, name, pxs, i0, c0):
    """Load the states from pxs and open a loop block with phis for the step ``i`` (from i0), a
    word counter ``c`` (from c0) and the ``_G`` state vectors. -> (loop, done, i, c, states)."""
    x0 = [builder.load(_vptr(builder, pxs, ir.Constant(_i64, g * _V), _v32), align=4) for g in range(_G)]
    pre = builder.basic_block
    loop = builder.append_basic_block(name + "_loop")
    done = builder.append_basic_block(name + "_done")
    builder.branch(loop)
    builder.position_at_end(loop)
    i = builder.phi(_i64)
    i.add_incoming(i0, pre)
    c = builder.phi(_i64)
    c.add_incoming(c0, pre)
    xs = [builder.phi(_v32) for _ in range(_G)]
    for g in range(_G):
        xs[g].add_incoming(x0[g], pre)
    return loop, done, i, c, xs


def _close_loop(builder, blocks, phis, nexts, go, pxs):
    """Feed the loop's phis their next values, branch back while ``go``, and after the loop
    store the states to pxs."""
    loop, done = blocks
    end = builder.basic_block
    for phi, v in zip(phis, nexts):
        phi.add_incoming(v, end)
    builder.cbranch(go, loop, done)
    builder.position_at_end(done)
    for g in range(_G):
        builder.store(nexts[2 + g], _vptr(builder, pxs, ir.Constant(_i64, g * _V), _v32), align=4)


# ------------------------------------------------------------------------------ decoder


def _make_dec_steps(permute: bool):
    @intrinsic
    def dec_steps(typingctx, xs, io, buf, wo, expand, dsym, dinfo, out, nsteps, limit, pb):
        """Decoding steps ``io[1] ..`` of all lanes while fewer than ``nsteps`` are done and the
        word position ``io[0]`` is at most ``limit`` (= words - 32, so a step's reads stay inside):
        states xs (LANES,) uint32 and io (2,) int64 updated in place; words: u16 at byte ``wo``
        of buf (uint8); expand (256, 8) int32; dsym / dinfo (2**pb,); out (nsteps*LANES,)
        uint8/uint16. The caller makes sure the first step may run (steps left, position ≤ limit)."""
        _contiguous(xs, io, buf, expand, dsym, dinfo, out)
        sig = types.void(xs, io, buf, wo, expand, dsym, dinfo, out, nsteps, limit, pb)

        def codegen(context, builder, signature, args):
            pxs, pio, pbuf, plut, pdsym, pdinfo, pout = _ptrs(context, builder, signature, args, (0, 1, 2, 4, 5, 6, 7))
            pwords = builder.bitcast(builder.gep(pbuf, [_as_i64(builder, args[3])]), _i16.as_pointer())
            n, limit = _as_i64(builder, args[8]), _as_i64(builder, args[9])
            pbs = _vsplat(builder, _as_i32(builder, args[10]))
            mask = builder.sub(builder.shl(_splat(1), pbs), _splat(1))
            ctpop = _ctpop(builder)
            ot = ir.IntType(signature.args[7].dtype.bitwidth)
            undef = ir.Constant(_v32, ir.Undefined)

            def vptr(p, off, vt):
                return _vptr(builder, p, off, vt)

            pos0 = builder.load(pio)
            i0 = builder.load(builder.gep(pio, [ir.Constant(_i32, 1)]))
            loop, done, i, pos, xphi = _open_loop(builder, "dec", pxs, i0, pos0)
            base = builder.mul(i, ir.Constant(_i64, LANES))
            xn, p = [], pos
            for g in range(_G):
                x = xphi[g]
                slot = builder.and_(x, mask)
                d = undef
                for k in range(_V):  # table loads as scalars (beat vpgatherdd on Zen 3), symbols stored as such
                    sk = builder.extract_element(slot, ir.Constant(_i32, k))
                    d = builder.insert_element(d, builder.load(builder.gep(pdinfo, [sk])), ir.Constant(_i32, k))
                    s = builder.load(builder.gep(pdsym, [sk]))
                    s = builder.trunc(s, ot) if s.type.width > ot.width else s
                    builder.store(s, builder.gep(pout, [builder.add(base, ir.Constant(_i64, g * _V + k))]))
                f = builder.and_(d, _splat(0xFFFF))
                x = builder.add(builder.mul(f, builder.lshr(x, pbs)), builder.lshr(d, _splat(16)))
                renorm = builder.icmp_unsigned("<", x, _splat(RANS_L))  # <8 x i1>
                m8 = builder.bitcast(renorm, _i8)
                perm = builder.load(vptr(plut, builder.mul(builder.zext(m8, _i64), ir.Constant(_i64, _V)), _v32), align=4)
                if permute:  # one 8-word load, each lane's word by vpermd
                    w = builder.call(_permd(builder), [builder.zext(builder.load(vptr(pwords, p, _v16), align=1), _v32), perm])
                else:  # eight scalar loads at p + rank
                    w = undef
                    for k in range(_V):
                        r = builder.sext(builder.extract_element(perm, ir.Constant(_i32, k)), _i64)
                        e = builder.load(builder.gep(pwords, [builder.add(p, r)]), align=1)
                        w = builder.insert_element(w, builder.zext(e, _i32), ir.Constant(_i32, k))
                need = builder.sext(renorm, _v32)
                x = builder.or_(builder.shl(x, builder.and_(need, _splat(16))), builder.and_(w, need))
                p = builder.add(p, builder.zext(builder.call(ctpop, [m8]), _i64))
                xn.append(x)
            inext = builder.add(i, ir.Constant(_i64, 1))
            go = builder.and_(builder.icmp_signed("<", inext, n), builder.icmp_signed("<=", p, limit))
            _close_loop(builder, (loop, done), [i, pos, *xphi], [inext, p, *xn], go, pxs)
            builder.store(p, pio)
            builder.store(inext, builder.gep(pio, [ir.Constant(_i32, 1)]))
            return context.get_dummy_value()

        return sig, codegen

    return dec_steps


@njit(inline="always", **_JIT)
def _dec1(x, dsym, dinfo, mask, pb, buf, wo, pos, total, out, i):
    """One decoding step of one lane; a word read past the stream's end reads 0 (and the
    final position check fails)."""
    sl = x & mask
    out[i] = dsym[sl]
    d = np.int64(dinfo[sl])
    x = (d & 0xFFFF) * (x >> pb) + (d >> 16)
    if x < RANS_L:
        w = np.int64(0)
        if pos < total:
            q = wo + 2 * pos
            w = np.int64(buf[q]) | (np.int64(buf[q + 1]) << 8)
        x = (x << 16) | w
        pos += 1
    return x, pos


_dec_steps_permd = _make_dec_steps(True)
_dec_steps_portable = _make_dec_steps(False)


def _make_decode(vector: bool, permute: bool):
    # the closure holds only these flags: numba keys its cache on the closure's values, and a
    # captured intrinsic or dispatcher pickles differently in every process (a new compile each
    # time); the branch on a constant flag is pruned, so vpermd is never compiled where absent
    @njit(**_JIT)
    def decode(buf, n, dsym, dinfo, pb, out):  # buf: (m,) uint8 (see encode); out: (n,) uint8/uint16
        """Decode ``n`` symbols into ``out``; 0 on success, a negative code on a bad stream."""
        m = buf.shape[0]
        if m < STATE_BYTES or (m - STATE_BYTES) % 2 or out.shape[0] < n:
            return -1
        xs = np.empty(LANES, np.uint32)
        for j in range(LANES):
            a = 4 * j
            x = np.int64(buf[a]) | (np.int64(buf[a + 1]) << 8) | (np.int64(buf[a + 2]) << 16) | (np.int64(buf[a + 3]) << 24)
            if x < RANS_L:
                return -2
            xs[j] = x
        wo = STATE_BYTES
        total = (m - STATE_BYTES) // 2
        st = n // LANES
        io = np.zeros(2, np.int64)  # word position, steps done
        if vector and st > 0 and total >= LANES:
            if permute:
                _dec_steps_permd(xs, io, buf, wo, EXPAND, dsym, dinfo, out, st, total - LANES, pb)
            else:
                _dec_steps_portable(xs, io, buf, wo, EXPAND, dsym, dinfo, out, st, total - LANES, pb)
        pos = io[0]
        mask = (1 << pb) - 1
        for i in range(io[1] * LANES, n):
            j = i % LANES
            x, pos = _dec1(np.int64(xs[j]), dsym, dinfo, mask, pb, buf, wo, pos, total, out, i)
            xs[j] = x
        if pos != total:
            return -4
        for j in range(LANES):
            if xs[j] != RANS_L:
                return -4
        return 0

    return decode


decode = _make_decode(True, PERMUTE)
decode_portable = _make_decode(True, False)  # the vector loop without vpermd (tested against)
decode_scalar = _make_decode(False, False)  # one lane at a time: the reference


@njit(**_JIT)
def decode_stream(buf, A, out):  # buf: (m,) uint8 = model bytes ‖ states ‖ words; A = 2**width
    """Model (freq_model.read_model), decode table and stream in one call; 0 on success, -8 a
    malformed model, -9 bytes after a single-symbol model, else decode's code."""
    f = np.zeros(A, np.int64)
    pb, used = read_model_or_fill(buf, A, f, out)
    if pb <= 0:
        return pb
    dsym, dinfo = decode_table(f, pb)
    return decode(buf[used:], out.shape[0], dsym, dinfo, pb, out)


# ------------------------------------------------------------------------------ encoder


def _make_enc_steps(permute: bool):
    @intrinsic
    def enc_steps(typingctx, xs, io, sym, fc, rcp, compress, words, nsteps, pb):
        """Encode steps ``nsteps-1 .. 0`` of all lanes (groups of eight lanes from the last):
        states xs (LANES,) uint32 and io (1,) int64 = the stack's top in words (updated in
        place; words (·,) uint16 grow downwards from it, in decoding order, and the 8 words
        below the top are scratch); sym (nsteps*LANES,) uint8/uint16; per symbol fc (A,)
        uint32 = freq | start << 16 and rcp (A,) float64 = 1/freq. The quotient ``x // f`` is
        ``floor(x·rcp)`` corrected by one (doubles hold x < 2**32 exactly)."""
        _contiguous(xs, io, sym, fc, rcp, compress, words)
        sig = types.void(xs, io, sym, fc, rcp, compress, words, nsteps, pb)

        def codegen(context, builder, signature, args):
            pxs, pio, psym, pf, prc, plut, pw = _ptrs(context, builder, signature, args, range(7))
            n = _as_i64(builder, args[7])
            pbs = _vsplat(builder, _as_i32(builder, args[8]))
            shv = builder.sub(_splat(32), pbs)
            ctpop = _ctpop(builder)
            st = ir.VectorType(ir.IntType(signature.args[2].dtype.bitwidth), _V)

            def vptr(p, off, vt):
                return _vptr(builder, p, off, vt)

            def gather(bp, idx, vt):
                v = ir.Constant(vt, ir.Undefined)
                for k in range(_V):
                    ik = builder.extract_element(idx, ir.Constant(_i32, k))
                    v = builder.insert_element(v, builder.load(builder.gep(bp, [ik])), ir.Constant(_i32, k))
                return v

            top0 = builder.load(pio)
            last = builder.sub(n, ir.Constant(_i64, 1))
            loop, done, i, top, xphi = _open_loop(builder, "enc", pxs, last, top0)
            base = builder.mul(i, ir.Constant(_i64, LANES))
            xn, t = [None] * _G, top
            for g in reversed(range(_G)):  # the decoder reads group 0's words first: push them last
                x = xphi[g]
                sv = builder.load(vptr(psym, builder.add(base, ir.Constant(_i64, g * _V)), st), align=1)
                s = builder.zext(sv, _v32) if st.element.width < 32 else sv
                fc = gather(pf, s, _v32)
                f = builder.and_(fc, _splat(0xFFFF))
                push = builder.icmp_unsigned(">=", x, builder.shl(f, shv))  # <8 x i1>
                m8 = builder.bitcast(push, _i8)
                if permute:  # the pushed lanes' words packed to the vector's top, one store below t
                    perm = builder.load(vptr(plut, builder.mul(builder.zext(m8, _i64), ir.Constant(_i64, _V)), _v32), align=4)
                    wv = builder.trunc(builder.call(_permd(builder), [x, perm]), _v16)
                    builder.store(wv, vptr(pw, builder.sub(t, ir.Constant(_i64, _V)), _v16), align=2)
                    t = builder.sub(t, builder.zext(builder.call(ctpop, [m8]), _i64))
                else:  # from the last lane down: every word written below t, t moves where pushed
                    for k in reversed(range(_V)):
                        xk = builder.extract_element(x, ir.Constant(_i32, k))
                        builder.store(builder.trunc(xk, _i16), builder.gep(pw, [builder.sub(t, ir.Constant(_i64, 1))]))
                        t = builder.sub(t, builder.zext(builder.extract_element(push, ir.Constant(_i32, k)), _i64))
                e = builder.sext(push, _v32)
                x = builder.lshr(x, builder.and_(e, _splat(16)))
                # after renormalisation x < f << (32 - pb), so x // f < 2**20: a signed conversion
                # suffices (AVX2 has none from double to unsigned)
                q = builder.fptosi(builder.fmul(builder.uitofp(x, _vd), gather(prc, s, _vd)), _v32)
                r = builder.sub(x, builder.mul(q, f))
                ge = builder.sext(builder.icmp_unsigned(">=", r, f), _v32)
                q = builder.sub(q, ge)
                r = builder.sub(r, builder.and_(f, ge))
                xn[g] = builder.add(builder.add(builder.shl(q, pbs), r), builder.lshr(fc, _splat(16)))
            inext = builder.sub(i, ir.Constant(_i64, 1))
            go = builder.icmp_signed(">=", inext, ir.Constant(_i64, 0))
            _close_loop(builder, (loop, done), [i, top, *xphi], [inext, t, *xn], go, pxs)
            builder.store(t, pio)
            return context.get_dummy_value()

        return sig, codegen

    return enc_steps


@njit(inline="always", **_JIT)
def _enc1(x, f, c, pb, words, top):
    """One encoding step of one lane (exact division): push a word if needed, then code."""
    if x >= (f << (32 - pb)):
        top -= 1
        words[top] = x & 0xFFFF
        x >>= 16
    return ((x // f) << pb) + (x % f) + c, top


_enc_steps_permd = _make_enc_steps(True)
_enc_steps_portable = _make_enc_steps(False)


def _make_encode(vector: bool, permute: bool):  # flags only in the closure (see _make_decode)
    @njit(**_JIT)
    def encode(sym, freq, pb):  # sym: (n,) uint; freq: (A,) int64 summing to 2**pb -> (m,) uint8
        """Encode ``sym`` (every symbol needs ``freq > 0``): backwards, the partial last step
        lane by lane, then the full steps (eight lanes a vector, or one lane at a time)."""
        n = sym.shape[0]
        start, fc, rcp = encoder_tables(freq)
        head = STATE_BYTES // 2 + _V  # room for the states, and the vector store's scratch
        words = np.empty(head + n, np.uint16)
        top = head + n
        xs = np.full(LANES, RANS_L, np.uint32)
        st = n // LANES
        for i in range(n - 1, st * LANES - 1, -1):
            j = i - st * LANES
            s = sym[i]
            x, top = _enc1(np.int64(xs[j]), freq[s], start[s], pb, words, top)
            xs[j] = x
        if vector and st > 0:
            io = np.array([top], np.int64)
            if permute:
                _enc_steps_permd(xs, io, sym, fc, rcp, COMPRESS, words, st, pb)
            else:
                _enc_steps_portable(xs, io, sym, fc, rcp, COMPRESS, words, st, pb)
            top = io[0]
        else:
            for i in range(st * LANES - 1, -1, -1):
                j = i % LANES
                s = sym[i]
                x, top = _enc1(np.int64(xs[j]), freq[s], start[s], pb, words, top)
                xs[j] = x
        top -= STATE_BYTES // 2
        for j in range(LANES):
            words[top + 2 * j] = xs[j] & 0xFFFF
            words[top + 2 * j + 1] = xs[j] >> 16
        return words[top:].view(np.uint8)

    return encode


encode = _make_encode(True, PERMUTE)
encode_portable = _make_encode(True, False)
encode_scalar = _make_encode(False, False)
