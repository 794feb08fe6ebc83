"""Delta chunks: a fine-tune's float tensor coded against the base tensor of the same name.

A tensor segment with a ``base`` (the sha256 of the base tensor's bytes, format 4) has chunks
that start with a mode byte::

    u8 mode | payload
    mode 0 (ALONE): the chunk's own float fields (chunk.py), as without a base
    mode 1 (XOR):   u8 P | P byte planes of  x ^ b                    (delta_kernel.py)
    mode 2 (DIFF):  u8 P | P byte planes of  zigzag(o(x) − o(b) mod 2^B)

with ``x`` the chunk's words, ``b`` the base's words at the same positions, ``P`` the word's
bytes and each plane one field of 8-bit symbols (``u8 backend | u32 length | stream``, the
backends of chunk.py). The encoder measures the three per chunk (each field's order-0 entropy,
capped at its raw size, from histograms it counts in one pass) and codes the smallest: training
that moved a BF16 weight by a few representable values leaves a DIFF plane 0 of a few bits
and a plane 1 of almost none, where the tensor alone costs ~10.5 bits a weight. XOR wins where
weights moved by bits rather than values (a sign flip at a tiny magnitude, a weight reset);
ALONE where the tensor changed entirely.
"""
from __future__ import annotations

import struct
import threading

import numpy as np

from ..errors import InputError
from .chunk import ChunkStats, _code_fields, _decode_fields, _scratch_split, decode_chunk, encode_chunk_parts
from .compiled import Kernels
from .entropy import BY_ID, encode_stream, entropy_bits
from .fields import Field, FloatLayout, LAYOUTS

ALONE, XOR, DIFF = 0, 1, 2
MODES = ("alone", "xor", "diff")  # by mode byte, for reports
DK = Kernels("delta_kernel")
COMPILED = frozenset((0, 4, 6, 7))  # the backends chunk_kernel decodes (its RAW, RANS4, SPLIT, RANS; a test checks)
PLANES = {n: tuple(Field(f"plane{p}", 8) for p in range(n)) for n in (1, 2, 4)}


def can_delta(dtype: str) -> bool:
    """Whether a tensor of ``dtype`` is coded against its base (the float layouts)."""
    return isinstance(LAYOUTS.get(dtype), FloatLayout)


def _bits(hists: np.ndarray, n: int) -> float:
    """Σ over planes of min(order-0 entropy, raw): what a plane costs, about."""
    return sum(min(entropy_bits(None, 8, np.ascontiguousarray(h)), 8.0 * n) for h in hists)


def encode_delta_parts(raw: np.ndarray, base: np.ndarray, dtype: str, policy: str = "rans") -> tuple[list, ChunkStats]:
    """The payload parts of one chunk ``raw`` ((nbytes,) uint8) against ``base`` (the base
    tensor's bytes at the same offsets, the same length): the mode byte first. ``stats.delta``
    holds the mode chosen."""
    lay = LAYOUTS[dtype]
    assert isinstance(lay, FloatLayout) and len(base) == len(raw)
    x, b = raw.view(lay.word), base.view(lay.word)
    n, P = len(x), lay.itemsize
    hx, hd = np.zeros((P, 256), np.int64), np.zeros((P, 256), np.int64)
    DK.delta_hists(x, b, hx, hd)
    _, hists = lay.split_hist(raw, *_scratch_split(lay, n))  # the chunk alone: only its counts
    alone = sum(min(entropy_bits(None, f.width, h), float(n * f.width)) for f, h in zip(lay.fields, hists))
    est = {ALONE: alone, XOR: _bits(hx, n), DIFF: _bits(hd, n)}
    mode = min(est, key=lambda m: (est[m], m))
    if mode == ALONE:  # coded as without a base (split again: rare)
        alone_parts, alone_st = encode_chunk_parts(raw, dtype, policy)
        alone_st.delta = ALONE
        return [b"\x00", *alone_parts], alone_st
    planes = np.empty((P, n), np.uint8)
    DK.delta_planes(x, b, mode, planes)
    st = ChunkStats(exp_hist=hists[0].reshape(1 << lay.E, 1 << lay.k).sum(1), delta=mode)
    hists = [hx[p] if mode == XOR else hd[p] for p in range(P)]
    return [bytes([mode]), *_code_planes(list(planes), hists, policy, st)], st


def _code_planes(planes: list[np.ndarray], hists: list[np.ndarray], policy: str, st: ChunkStats) -> list:
    """``u8 P`` and each plane's ``u8 backend | u32 length | stream``, as buffers: under the
    ``rans`` policy the smaller of raw and our rANS (no ``split``: a plane's statistics do not
    drift along a chunk as a tail's do, and it would code each plane several times). A skewed plane
    (a high byte almost always 0) stays rANS too: since rans32 decodes a stream's last words as
    vectors, such a stream decodes as fast a symbol as any other, faster than zstd, for about the
    same bytes (zstd's runs win a little on the most skewed planes: ``bench/delta.py``). Other
    policies: as chunk.py codes a tail piece."""
    if policy != "rans":
        return _code_fields(PLANES[len(planes)], planes, hists, policy, {}, st)
    out = [struct.pack("<B", len(planes))]
    for sym, hist in zip(planes, hists):
        n = len(sym)
        h = entropy_bits(None, 8, hist)
        bid, payload = encode_stream(sym, 8, ("rans",), h, hist, view=True)
        out += [struct.pack("<BI", bid, len(payload)), payload]
        st.bound_bits += min(h, 8.0 * n)
        st.streams[BY_ID[bid].name] = st.streams.get(BY_ID[bid].name, 0) + len(payload)
    return out


_scratch = threading.local()


def _planes(n: int) -> list[np.ndarray]:
    """This thread's four (n,) uint8 plane arrays, reused chunk after chunk."""
    have = getattr(_scratch, "planes", None)
    if have is None or have[0].shape[0] < n:
        have = _scratch.planes = [np.empty(n, np.uint8) for _ in range(4)]
    return [a[:n] for a in have]


def decode_delta_chunk(buf: memoryview, dtype: str, nbytes: int, base: np.ndarray, out: np.ndarray | None = None,
                       compiled: bool = True) -> np.ndarray:
    """Inverse of :func:`encode_delta_parts`: the chunk's bytes (into ``out`` if given) from its
    payload and the base's bytes at the same offsets; raises ValueError on any inconsistency."""
    lay = LAYOUTS.get(dtype)
    if not isinstance(lay, FloatLayout):
        raise InputError(f"a delta chunk of {dtype}: only float tensors are coded against a base")
    if len(base) != nbytes or nbytes % lay.itemsize:
        raise InputError(f"delta chunk of {nbytes} bytes against {len(base)} base bytes")
    if len(buf) < 1 or buf[0] > DIFF:
        raise InputError("delta chunk: bad mode byte")
    mode = buf[0]
    if mode == ALONE:
        return decode_chunk(buf[1:], dtype, nbytes, out, compiled)
    out = np.empty(nbytes, np.uint8) if out is None else out
    n, P = nbytes // lay.itemsize, lay.itemsize
    b, x = base.view(lay.word), out.view(lay.word)
    pl = _planes(n)
    if compiled and _compiled_backends(buf[1:], P) and DK.decode_delta(np.frombuffer(buf[1:], np.uint8), mode, b, x, *pl) == 0:
        return out
    parts = _decode_fields(buf[1:], PLANES[P], [n] * P, pl[:P])  # a zstd plane, or what the kernel refused
    parts = [np.ascontiguousarray(q) for q in parts]
    DK.merge4(*parts, *[parts[0]] * (4 - P), b, mode, x)
    return out


def _compiled_backends(buf: memoryview, P: int) -> bool:
    """Whether every plane's backend is one the compiled decoder handles (chunk_kernel.py): a
    look at the ``P`` field headers, so that a plane in zstd does not waste a compiled pass."""
    pos = 1
    for _ in range(P):
        if pos + 5 > len(buf) or buf[pos] not in COMPILED:
            return False
        pos += 5 + int.from_bytes(buf[pos + 1 : pos + 5], "little")
    return True



