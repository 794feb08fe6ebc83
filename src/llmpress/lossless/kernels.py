"""Compiled inner loops of the lossless codec (numba, ``nogil`` so chunks run in parallel threads).

- **rANS** (Duda 2013; the word-oriented variant of Giesen's ``ryg_rans``): a static model
  of ``2**pb`` slots, 32-bit states kept in ``[2**16, 2**32)``, renormalised 16 bits at a time.
  ``NSTATES`` independent lanes take symbols round-robin (symbol ``i`` uses lane
  ``i % NSTATES``), each with its own word stream, so the decoder's dependency chains
  interleave without meeting (a shared stream couples them through its read position, which
  measured slower for four scalar lanes; rans32.py's vector lanes share one by design). Encoding runs backwards and fills each lane's stack from its end; the
  decoder reads it forward, first the lane's final state (two words), then its renormalisation
  words. Every state ends at ``2**16`` exactly and every lane is read to its end, which the
  decoder checks: a corrupted stream that decodes to the right length is still caught.
- **frequency normalisation**: counts → integer frequencies summing to ``2**pb``, each present
  symbol ≥ 1, with the rounding error placed where it costs the fewest bits.
- **bit packing** (LSB-first bit stream) and the **float field split/merge** of fields.py, one
  pass each, with the fields' histograms taken during the split.

Every function here checks its input bounds itself: a hostile stream raises (through the
Python wrappers in entropy.py) rather than reading outside its buffers.
"""
from __future__ import annotations

import numpy as np
from numba import njit

NSTATES = 4
RANS_L = 1 << 16  # lower bound of a state; states live in [RANS_L, RANS_L << 16)

_JIT = dict(nogil=True, cache=True, boundscheck=False)


# ------------------------------------------------------------------------------ rANS


@njit(**_JIT)
def normalize_freqs(hist, pb):  # hist: (A,) int64 counts -> (A,) int64 freqs summing to 2**pb
    """Quantise counts to frequencies summing to ``2**pb`` (needs #present ≤ 2**pb).

    Start from ``max(1, round(c·T/n))``, then hand the missing slots out one by one to the
    symbol whose code length drops the most per slot (``c·log2((f+1)/f)``), or take surplus slots
    from the one that loses the least; a max-scan per slot over the present symbols (few hundred).
    """
    A = hist.shape[0]
    T = 1 << pb
    n = 0
    for s in range(A):
        n += hist[s]
    f = np.zeros(A, np.int64)
    present = np.empty(A, np.int64)
    k = 0
    used = 0
    for s in range(A):
        c = hist[s]
        if c > 0:
            q = (2 * c * T + n) // (2 * n)  # rounded: the fix-up below moves few slots
            if q < 1:
                q = 1
            f[s] = q
            used += q
            present[k] = s
            k += 1
    if k > 1024:  # huge alphabets (16-bit fields): cheap fix-up, largest counts first
        order = present[:k][np.argsort(-hist[present[:k]])]
        j = 0
        while used < T:
            f[order[j % k]] += 1
            used += 1
            j += 1
        j = 0
        while used > T:
            s = order[j % k]
            if f[s] > 1:
                f[s] -= 1
                used -= 1
            j += 1
        return f
    while used < T:
        best, bs = -1.0, -1
        for j in range(k):
            s = present[j]
            gain = hist[s] * np.log2((f[s] + 1.0) / f[s])
            if gain > best:
                best, bs = gain, s
        f[bs] += 1
        used += 1
    while used > T:
        best, bs = np.inf, -1
        for j in range(k):
            s = present[j]
            if f[s] > 1:
                loss = hist[s] * np.log2(f[s] / (f[s] - 1.0))
                if loss < best:
                    best, bs = loss, s
        f[bs] -= 1
        used -= 1
    return f


@njit(inline="always", **_JIT)
def _enc(x, f, c, pb, sh, buf, pos):
    """One rANS encode step of a symbol (freq f, start c) on state x; may push a word.
    Branch-free renormalisation: the word is always written, the stack only grows when needed.
    The quotient is a 32-bit unsigned divide (x < 2**32): faster here than a float reciprocal,
    and than an exact integer reciprocal (two 64-bit multiplies; ``bench/lossless.py --kernel``)."""
    e = np.int64(x >= (f << sh))
    buf[pos - 1] = x & 0xFFFF
    pos -= e
    x >>= e << 4
    q = np.int64(np.uint32(x) // np.uint32(f))
    return (q << pb) + (x - q * f) + c, pos


@njit(**_JIT)
def rans_encode(sym, freq, pb):  # sym: (n,) uint; freq: (A,) int64 summing to 2**pb -> (m,) uint16
    """Encode ``sym`` (every symbol must have ``freq > 0``) into four lanes of 16-bit words.

    Output: ``NSTATES`` lane lengths (u32 each, as two u16, low first), then each lane's words:
    its final state (two words), then its renormalisation words in decoding order."""
    n = sym.shape[0]
    A = freq.shape[0]
    start = np.empty(A, np.int64)
    acc = 0
    for s in range(A):
        start[s] = acc
        acc += freq[s]
    cap = n // NSTATES + 3  # a lane codes at most n/4 + 1 symbols, one word each, + its state
    buf = np.empty((NSTATES, cap), np.uint16)
    b0, b1, b2, b3 = buf[0], buf[1], buf[2], buf[3]
    p0 = p1 = p2 = p3 = cap
    x0 = x1 = x2 = x3 = np.int64(RANS_L)
    sh = 32 - pb
    n4 = n & ~3
    i = n - 1
    while i >= n4:  # the last n % 4 symbols, lanes 2, 1, 0
        s = sym[i]
        j = i & 3
        if j == 0:
            x0, p0 = _enc(x0, freq[s], start[s], pb, sh, b0, p0)
        elif j == 1:
            x1, p1 = _enc(x1, freq[s], start[s], pb, sh, b1, p1)
        else:
            x2, p2 = _enc(x2, freq[s], start[s], pb, sh, b2, p2)
        i -= 1
    while i >= 3:  # groups of four, each symbol on its own lane
        s = sym[i]
        x3, p3 = _enc(x3, freq[s], start[s], pb, sh, b3, p3)
        s = sym[i - 1]
        x2, p2 = _enc(x2, freq[s], start[s], pb, sh, b2, p2)
        s = sym[i - 2]
        x1, p1 = _enc(x1, freq[s], start[s], pb, sh, b1, p1)
        s = sym[i - 3]
        x0, p0 = _enc(x0, freq[s], start[s], pb, sh, b0, p0)
        i -= 4
    xs = (x0, x1, x2, x3)
    ps = (p0, p1, p2, p3)
    total = 0
    for j in range(NSTATES):
        total += cap - ps[j] + 2
    out = np.empty(2 * NSTATES + total, np.uint16)
    o = 2 * NSTATES
    for j in range(NSTATES):
        ln = cap - ps[j] + 2
        out[2 * j] = ln & 0xFFFF
        out[2 * j + 1] = ln >> 16
        out[o] = xs[j] & 0xFFFF
        out[o + 1] = xs[j] >> 16
        out[o + 2 : o + ln] = buf[j, ps[j] :]
        o += ln
    return out


@njit(**_JIT)
def decode_table(freq, pb):  # freq: (A,) int64 -> (slot symbol (2**pb,) uint16, slot info (2**pb,) uint32)
    """Slot → symbol and slot → ``freq | (slot - start) << 16`` (one lookup per decoded symbol)."""
    T = 1 << pb
    dsym = np.empty(T, np.uint16)
    dinfo = np.empty(T, np.uint32)
    slot = 0
    for s in range(freq.shape[0]):
        f = freq[s]
        ys = dsym[slot : slot + f]  # views indexed by r: the fill vectorises (a third to half the time)
        yi = dinfo[slot : slot + f]
        for r in range(f):
            ys[r] = s
            yi[r] = f | (r << 16)
        slot += f
    return dsym, dinfo


@njit(inline="always", **_JIT)
def _dec(x, dsym, dinfo, mask, pb, words, pos, last, out, i):
    """One rANS decode step on a lane: emit out[i], update x, renormalise branch-free from the
    lane's own words (reads clamp to the lane's ``last`` word; overruns fail the final check)."""
    sl = x & mask
    out[i] = dsym[sl]
    d = np.int64(dinfo[sl])
    x = (d & 0xFFFF) * (x >> pb) + (d >> 16)
    e = np.int64(x < RANS_L)
    w = np.int64(words[min(pos, last)])
    x = (x << (e << 4)) | (w & -e)
    return x, pos + e


@njit(**_JIT)
def rans_decode(words, n, dsym, dinfo, pb, out):  # words: (m,) uint16 (see rans_encode); out: (n,) uint8/uint16
    """Decode ``n`` symbols into ``out``; returns 0 on success, a negative code on a bad stream.
    The four lanes have their own word streams, so their dependency chains do not meet.
    Tried and not faster (bench/lossless.py --kernel, same stream): one packed 64-bit slot
    table, eight lanes (two 4-lane streams
    interleaved), unclamped reads in blocks checked up front: the loop is bound by its
    ~20 instructions a symbol, not by the table loads or the lanes' latency."""
    m = words.shape[0]
    if m < 2 * NSTATES:
        return -1
    lo = np.empty(NSTATES, np.int64)
    o = 2 * NSTATES
    for j in range(NSTATES):
        ln = np.int64(words[2 * j]) | (np.int64(words[2 * j + 1]) << 16)
        if ln < 2 or o + ln > m:
            return -1
        lo[j] = o
        o += ln
    if o != m:
        return -1
    q0, q1, q2, q3 = lo[1], lo[2], lo[3], m  # lane ends (exclusive): the next lane's start
    x0 = np.int64(words[lo[0]]) | (np.int64(words[lo[0] + 1]) << 16)
    x1 = np.int64(words[lo[1]]) | (np.int64(words[lo[1] + 1]) << 16)
    x2 = np.int64(words[lo[2]]) | (np.int64(words[lo[2] + 1]) << 16)
    x3 = np.int64(words[lo[3]]) | (np.int64(words[lo[3] + 1]) << 16)
    p0, p1, p2, p3 = lo[0] + 2, lo[1] + 2, lo[2] + 2, lo[3] + 2
    mask = (1 << pb) - 1
    for x in (x0, x1, x2, x3):
        if x < RANS_L:
            return -2
    i = 0
    n4 = n & ~3
    while i < n4:
        x0, p0 = _dec(x0, dsym, dinfo, mask, pb, words, p0, q0 - 1, out, i)
        x1, p1 = _dec(x1, dsym, dinfo, mask, pb, words, p1, q1 - 1, out, i + 1)
        x2, p2 = _dec(x2, dsym, dinfo, mask, pb, words, p2, q2 - 1, out, i + 2)
        x3, p3 = _dec(x3, dsym, dinfo, mask, pb, words, p3, q3 - 1, out, i + 3)
        i += 4
    if i < n:
        x0, p0 = _dec(x0, dsym, dinfo, mask, pb, words, p0, q0 - 1, out, i)
    if i + 1 < n:
        x1, p1 = _dec(x1, dsym, dinfo, mask, pb, words, p1, q1 - 1, out, i + 1)
    if i + 2 < n:
        x2, p2 = _dec(x2, dsym, dinfo, mask, pb, words, p2, q2 - 1, out, i + 2)
    if p0 != q0 or p1 != q1 or p2 != q2 or p3 != q3:
        return -4
    if x0 != RANS_L or x1 != RANS_L or x2 != RANS_L or x3 != RANS_L:
        return -4
    return 0


# ------------------------------------------------------------------------------ bit packing


@njit(**_JIT)
def pack_bits(sym, width):  # sym: (n,) uint, width <= 8 -> (ceil(n*width/8),) uint8, LSB-first bit stream
    out = np.empty((sym.shape[0] * width + 7) // 8, np.uint8)
    pack_into(sym, width, out)
    return out


@njit(**_JIT)
def pack_into(sym, width, out):  # sym: (n,) uint, width <= 8; out: (k,) uint8 <- the stream's first k bytes
    """:func:`pack_bits` into ``out`` (bytes past the symbols' bits are 0). Whole groups of
    g = 8/gcd(8, width) symbols fill nb = g·width/8 bytes exactly, so the groups pack
    independently; the last partial group goes bit by bit."""
    n = sym.shape[0]
    k = out.shape[0]
    mask = (1 << width) - 1
    g = 8
    while g % 2 == 0 and (g // 2) * width % 8 == 0:
        g //= 2
    nb = g * width // 8
    ng = min(n // g, k // nb)
    if width == 6:  # the tail of BF16 and the top tail piece of F32: 4 symbols in 3 bytes
        for q in range(ng):
            a = np.int64(sym[4 * q]) & 63
            b = np.int64(sym[4 * q + 1]) & 63
            c = np.int64(sym[4 * q + 2]) & 63
            d = np.int64(sym[4 * q + 3]) & 63
            out[3 * q] = a | (b << 6) & 0xFF
            out[3 * q + 1] = (b >> 2) | (c << 4) & 0xFF
            out[3 * q + 2] = (c >> 4) | (d << 2)
    elif width == 4:  # quantized codes: two a byte
        for q in range(ng):
            out[q] = (sym[2 * q] & 15) | ((sym[2 * q + 1] & 15) << 4)
    elif width == 1:  # FP8's sign field: 8 symbols a byte, unrolled (the generic loop does not vectorise)
        for q in range(ng):
            o8 = 8 * q
            out[q] = ((sym[o8] & 1) | (sym[o8 + 1] & 1) << 1 | (sym[o8 + 2] & 1) << 2 | (sym[o8 + 3] & 1) << 3
                      | (sym[o8 + 4] & 1) << 4 | (sym[o8 + 5] & 1) << 5 | (sym[o8 + 6] & 1) << 6
                      | (sym[o8 + 7] & 1) << 7)
    else:
        for q in range(ng):
            acc = np.int64(0)
            for j in range(g):
                acc |= (np.int64(sym[q * g + j]) & mask) << (j * width)
            for b in range(nb):
                out[q * nb + b] = (acc >> (8 * b)) & 0xFF
    acc = np.int64(0)
    nbits = 0
    o = ng * nb
    for i in range(ng * g, n):
        acc |= (np.int64(sym[i]) & mask) << nbits
        nbits += width
        while nbits >= 8 and o < k:
            out[o] = acc & 0xFF
            acc >>= 8
            nbits -= 8
            o += 1
    while o < k:
        out[o] = acc & 0xFF
        acc >>= 8
        o += 1


@njit(**_JIT)
def unpack_bits(buf, width, out):  # buf: (ceil(n*width/8),) uint8 -> out: (n,) uint8/uint16; width <= 8
    """Inverse of :func:`pack_bits`: whole groups first, then symbol i at bit i·width."""
    n = out.shape[0]
    m = buf.shape[0]
    mask = (1 << width) - 1
    g = 8
    while g % 2 == 0 and (g // 2) * width % 8 == 0:
        g //= 2
    nb = g * width // 8
    ng = min(n // g, m // nb)
    if width == 6:
        for q in range(ng):
            a = np.int64(buf[3 * q])
            b = np.int64(buf[3 * q + 1])
            c = np.int64(buf[3 * q + 2])
            out[4 * q] = a & 63
            out[4 * q + 1] = (a >> 6) | ((b & 15) << 2)
            out[4 * q + 2] = (b >> 4) | ((c & 3) << 4)
            out[4 * q + 3] = c >> 2
    elif width == 4:  # nibbles (codes stored raw), unrolled so that it vectorises
        for q in range(ng):
            v = buf[q]
            out[2 * q] = v & 15
            out[2 * q + 1] = v >> 4
    elif width == 5:  # Q5_0/Q5_1/Q5_K codes stored raw: eight in five bytes, unrolled so that it vectorises
        for q in range(ng):
            a = np.int64(buf[5 * q])
            b = np.int64(buf[5 * q + 1])
            c = np.int64(buf[5 * q + 2])
            d = np.int64(buf[5 * q + 3])
            e = np.int64(buf[5 * q + 4])
            o8 = 8 * q
            out[o8] = a & 31
            out[o8 + 1] = (a >> 5) | ((b & 3) << 3)
            out[o8 + 2] = (b >> 2) & 31
            out[o8 + 3] = (b >> 7) | ((c & 15) << 1)
            out[o8 + 4] = (c >> 4) | ((d & 1) << 4)
            out[o8 + 5] = (d >> 1) & 31
            out[o8 + 6] = (d >> 6) | ((e & 7) << 2)
            out[o8 + 7] = e >> 3
    elif width == 3:  # Q3_K codes stored raw: eight in three bytes
        for q in range(ng):
            a = np.int64(buf[3 * q])
            b = np.int64(buf[3 * q + 1])
            c = np.int64(buf[3 * q + 2])
            o8 = 8 * q
            out[o8] = a & 7
            out[o8 + 1] = (a >> 3) & 7
            out[o8 + 2] = (a >> 6) | ((b & 1) << 2)
            out[o8 + 3] = (b >> 1) & 7
            out[o8 + 4] = (b >> 4) & 7
            out[o8 + 5] = (b >> 7) | ((c & 3) << 1)
            out[o8 + 6] = (c >> 2) & 7
            out[o8 + 7] = c >> 5
    elif width == 1:  # FP8's sign field, unrolled (the generic loop does not vectorise for one bit)
        for q in range(ng):
            v = np.int64(buf[q])
            o8 = 8 * q
            out[o8] = v & 1
            out[o8 + 1] = (v >> 1) & 1
            out[o8 + 2] = (v >> 2) & 1
            out[o8 + 3] = (v >> 3) & 1
            out[o8 + 4] = (v >> 4) & 1
            out[o8 + 5] = (v >> 5) & 1
            out[o8 + 6] = (v >> 6) & 1
            out[o8 + 7] = v >> 7
    else:
        for q in range(ng):
            acc = np.int64(0)
            for b in range(nb):
                acc |= np.int64(buf[q * nb + b]) << (8 * b)
            for j in range(g):
                out[q * g + j] = (acc >> (j * width)) & mask
    for i in range(ng * g, n):
        b = i * width
        j = b >> 3
        v = np.int64(buf[j]) if j < m else 0
        if j + 1 < m:
            v |= np.int64(buf[j + 1]) << 8
        out[i] = (v >> (b & 7)) & mask


# ------------------------------------------------------------------------------ float fields


@njit(**_JIT)
def _hist(sym, h):  # h[v] += count of v in sym
    for i in range(sym.shape[0]):
        h[sym[i]] += 1


@njit(**_JIT)
def hist_entropy_bits(h):  # h: (A,) int64 counts -> n·H0 in bits
    """``Σ_s c_s·log2(n / c_s)``: the order-0 cost of a stream with counts ``h`` (compiled: a
    call from Python costs a fraction of numpy's dispatch on a small alphabet; two calls a chunk)."""
    n = 0.0
    for s in range(h.shape[0]):
        n += h[s]
    bits = 0.0
    for s in range(h.shape[0]):
        if h[s] > 0:
            bits += h[s] * np.log2(n / h[s])
    return bits


@njit(**_JIT)
def _hist4(sym, h):  # h[v] += count of v in sym, for skewed streams (the head)
    """Four partial histograms, one per residue of i mod 4: runs of one symbol no longer chain
    every increment through one counter (store-to-load forwarding): faster on a weight head,
    slower on near-uniform streams (the tails), which keep :func:`_hist`."""
    n = sym.shape[0]
    A = h.shape[0]
    t = np.zeros((4, A), np.int64)
    n4 = n & ~3
    for i in range(0, n4, 4):
        t[0, sym[i]] += 1
        t[1, sym[i + 1]] += 1
        t[2, sym[i + 2]] += 1
        t[3, sym[i + 3]] += 1
    for i in range(n4, n):
        t[0, sym[i]] += 1
    for s in range(A):
        h[s] += t[0, s] + t[1, s] + t[2, s] + t[3, s]


def float_kernels(E: int, M: int, k: int, widths: tuple[int, ...]):
    """``(split, merge)`` compiled for one float layout (``E`` exponent bits, ``M`` mantissa
    bits, ``k`` of them in the head, tail pieces of ``widths`` bits, LSB first, at most 3).

    - ``split(x, head, tails, hhist, thist)``: x (n,) uint16/uint32 words → head (n,) = exponent ‖
      top k mantissa bits, tails (p, n) uint8 = sign ‖ low mantissa bits cut into ``widths``;
      adds the fields' counts to hhist (2**(E+k),) and thist (p, 256).
    - ``merge(head, t0, t1, t2, x)``: the inverse, into x (unused pieces may be any array).

    Since ``M = low + k`` the head sits at ``head << low``: one shift and mask each way. The shifts
    and masks are constants of the closure, so numba compiles them in and LLVM vectorises the
    branch-free 32-bit loops; with the same amounts passed as arguments neither loop vectorised
    (several times slower). Each layout compiles (and caches) its own pair."""
    P = len(widths)
    assert 1 <= P <= 3, "at most 3 tail pieces"
    LOW = np.uint32(M - k)
    HMASK = np.uint32((1 << (E + k)) - 1)
    LMASK = np.uint32((1 << (M - k)) - 1)
    SSHIFT = np.uint32(E + M)
    W1 = widths[1] if P > 1 else 0
    S1, S2 = np.uint32(widths[0]), np.uint32(widths[0] + W1)
    M0, M1 = np.uint32((1 << widths[0]) - 1), np.uint32((1 << W1) - 1)

    @njit(**_JIT)
    def split(x, head, tails, hhist, thist):
        for i in range(x.shape[0]):
            w = np.uint32(x[i])
            head[i] = (w >> LOW) & HMASK
            t = (w >> SSHIFT) << LOW | (w & LMASK)
            tails[0, i] = t & M0
            if P > 1:
                tails[1, i] = (t >> S1) & M1
            if P > 2:
                tails[2, i] = t >> S2
        _hist4(head, hhist)  # the counts in separate passes: the split loop stays vectorised
        for j in range(P):
            _hist(tails[j], thist[j])

    @njit(**_JIT)
    def merge(head, t0, t1, t2, x):
        for i in range(x.shape[0]):
            t = np.uint32(t0[i])
            if P > 1:
                t |= np.uint32(t1[i]) << S1
            if P > 2:
                t |= np.uint32(t2[i]) << S2
            x[i] = (t >> LOW) << SSHIFT | np.uint32(head[i]) << LOW | (t & LMASK)

    return split, merge


@njit(inline="always", **_JIT)
def _add_at(x, n, b, mask, z):  # x: (n,) uint8 bit-packed codes, in place
    """The code at bit ``b`` of the LSB-first stream in ``x`` (``mask`` = 2^width − 1; it spans at
    most two bytes) becomes (code + z) mod 2^width; the other bits stay as they are."""
    j = b >> 3
    v = np.int64(x[j])
    if j + 1 < n:
        v |= np.int64(x[j + 1]) << 8
    s = b & 7
    v = (v & ~(mask << s)) | ((((v >> s) + z) & mask) << s)
    x[j] = v & 0xFF
    if j + 1 < n:
        x[j + 1] = (v >> 8) & 0xFF


@njit(**_JIT)
def add_codes(x, width, z):  # x: (L,) uint8 bit-packed codes, in place; z: (m,) uint8, m ≥ codes in x
    """Code i of the LSB-first stream of ``width``-bit codes in ``x`` becomes (code + z[i]) mod
    2^width (the codes of a format-6 chunk given back their zero points); bits past the last whole
    code are left as they are. Widths that divide 8 go a byte at a time."""
    n = x.shape[0]
    mask = (1 << width) - 1
    if width == 4:  # two codes a byte, written out (the generic loop does not vectorise)
        for i in range(n):
            v = np.int64(x[i])
            x[i] = ((v + np.int64(z[2 * i])) & 15) | ((((v >> 4) + np.int64(z[2 * i + 1])) & 15) << 4)
        return
    if 8 % width == 0:
        per = 8 // width
        for i in range(n):
            v = np.int64(x[i])
            r = np.int64(0)
            for j in range(per):
                s = j * width
                r |= (((v >> s) + np.int64(z[i * per + j])) & mask) << s
            x[i] = r
        return
    for i in range(8 * n // width):
        _add_at(x, n, i * width, mask, np.int64(z[i]))


@njit(**_JIT)
def fill_zeros(table, row, group, first, out):  # table: (R, G) uint8; out: (m,) uint8
    """Code ``first + j``'s zero point into ``out[j]``: table[r, g] with r = i // row, g = (i % row)
    // group, 0 past the table (zeros.chunk_zeros). Runs of one group are filled at once."""
    m = out.shape[0]
    nr, ng = table.shape[0], table.shape[1]
    j = 0
    i = first
    while j < m:
        r = i // row
        c = i - r * row
        g = c // group
        run = min(group - c % group, row - c, m - j)
        v = table[r, g] if r < nr and g < ng else np.uint8(0)
        y = out[j : j + run]  # a view: the fill then vectorises
        for k in range(run):
            y[k] = v
        j += run
        i += run


@njit(**_JIT)
def add_zero_runs(x, width, table, row, group, first):  # x: (L,) uint8 bit-packed codes, in place
    """:func:`add_codes` with each code's zero point taken from ``table`` (R, G) uint8 as
    :func:`fill_zeros` does (code j of ``x`` is code ``first + j`` of its segment), a run of one
    group at a time (row, column and group counted along, one division for the chunk): 4-bit codes
    a byte (two codes) at a time, no per-code array."""
    n = x.shape[0]
    m = 8 * n // width
    mask = (1 << width) - 1
    nr, ng = table.shape[0], table.shape[1]
    r = first // row
    c = first - r * row
    g = c // group
    left = group - c % group  # codes left in this group
    j = 0
    while j < m:
        run = min(left, row - c, m - j)
        z = np.int64(table[r, g]) if r < nr and g < ng else np.int64(0)
        end = j + run
        if z != 0 and width == 4:
            k = j
            if k & 1:  # a high nibble first
                v = np.int64(x[k >> 1])
                x[k >> 1] = (v & 15) | ((((v >> 4) + z) & 15) << 4)
                k += 1
            zl = np.uint8(z)
            zh = np.uint8(z << 4)
            y = x[k >> 1 : end >> 1]  # a view: the loop below then vectorises (indexing x directly does not)
            for q in range(y.shape[0]):
                v8 = y[q]
                y[q] = np.uint8((v8 + zl) & 15) | np.uint8(((v8 & 0xF0) + zh) & 0xF0)
            if end & 1 and end > k:  # a low nibble last
                q = end >> 1
                v = np.int64(x[q])
                x[q] = (v & 0xF0) | ((v + z) & 15)
        elif z != 0:
            for t in range(j, end):
                _add_at(x, n, t * width, mask, z)
        j = end
        c += run
        left -= run
        if c == row:  # the next row
            r += 1
            c = 0
            g = 0
            left = group
        elif left == 0:  # the next group of this row
            g += 1
            left = group
