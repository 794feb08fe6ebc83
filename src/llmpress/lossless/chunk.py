"""One chunk (≈512 KiB of one tensor's bytes): split into fields, code each field's stream.

Chunk payload layout (little-endian)::

    u8 nfields | nfields × (u8 backend id | u32 length | payload)

The chunk knows nothing of its tensor; its dtype and raw length come from the index. Every
chunk decodes on its own, so tensors decode independently and chunks in parallel.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

import numpy as np
import zstandard

from ..errors import InputError
from .compiled import Kernels
from .entropy import BACKENDS, BY_ID, RANS_PB, decode_stream, encode_stream, entropy_bits
from . import grid as G
from . import gguf as GG
from .fields import CODES, RAW, Field, FloatLayout, exponent, layout
from .grid import Grid
from .zeros import ChunkZeros

# policy name -> entropy backends tried on (head, tail, bytes, codes) streams, besides raw
# (codes: a quantized tensor's codes, one symbol each; zstd too, for codes that repeat)
POLICIES: dict[str, dict[str, tuple[str, ...]]] = {
    "rans": {"head": ("rans",), "tail": ("rans", "split"), "bytes": ("zstd",), "codes": ("rans", "split", "zstd")},
    "ans": {"head": ("ans",), "tail": ("ans",), "bytes": ("zstd",), "codes": ("ans", "zstd")},
    "zstd": {"head": ("zstd",), "tail": ("zstd",), "bytes": ("zstd",), "codes": ("zstd",)},
}
POLICIES["smallest"] = POLICIES["rans"]  # and every GGUF stream coded that saves a byte (GGUF_MIN_SAVING)
# bits a code a GGUF chunk's code streams (codes, K-quant scales and mins) must save over raw to
# be coded (entropy.encode_stream's min_saving), and its codes cut by class (mode 1) must save over
# one model. A coded symbol costs about a nanosecond to decode whatever it saves, a raw one next to
# nothing; the 4- and 5-bit codes of Q4_*/Q5_* blocks save 0.1-0.3 bits each, which halved the
# decode speed for 2-3 % of the file. Measured: bench/lossless.py's GGUF rows.
GGUF_MIN_SAVING = 0.3
MIN_SAVING = {"smallest": 0.0}  # policy -> its own (for a link slower than the decoder: ~3 % smaller files)


@dataclass
class ChunkStats:
    """What the bounds need from one chunk (computed from the fields the coder already has)."""

    exp_hist: np.ndarray | None = None  # (2**E,) exponent counts, floats only
    bound_bits: float = 0.0  # Σ_fields min(n·H0(field), n·width): the chunk-adaptive bound
    streams: dict[str, int] = field(default_factory=dict)  # backend name -> bytes, for reports
    # a GGUF chunk's fields (params' float fields summed, codes' classes summed): bound bits and bytes
    field_bits: dict[str, float] | None = None
    field_bytes: dict[str, int] | None = None
    delta: int | None = None  # a delta chunk's mode (delta.py); None: not coded against a base


# a GGUF block's integer fields (K-quant scales and mins, Q8_K's bsums) are coded as codes are
_CODES_LIKE = ("codes", "scales", "mins", "bsums")


def _kind(name: str) -> str:
    """A field's policy entry; a grid parameter's fields (``d.head``, ``m.tail0``) as a float's;
    a GGUF block's codes (``codes``, grouped ``codes.3``), scales, mins as codes."""
    if name.partition(".")[0] in _CODES_LIKE:
        return "codes"
    name = name.rpartition(".")[2]
    return name if name in ("bytes", "head", "codes") else "tail"


def encode_chunk(raw: np.ndarray, dtype: str, policy: str = "rans", codes: int = 0,
                 grid: Grid | None = None, zeros: np.ndarray | None = None, gguf: str = "") -> tuple[bytes, ChunkStats]:
    """raw: (nbytes,) uint8, a whole number of ``dtype`` words (never modified); ``codes``: the
    bits of the codes an integer tensor holds bit-packed (0: none); ``grid``: the segment's grid;
    ``zeros``: (symbols,) uint8, each code's zero point, for a codes segment with ``zero`` (zeros.py);
    ``gguf``: the ggml block type of a GGUF tensor's whole blocks."""
    parts, st = encode_chunk_parts(raw, dtype, policy, codes, grid, zeros, gguf)
    return b"".join(parts), st


def encode_chunk_parts(raw: np.ndarray, dtype: str, policy: str = "rans", codes: int = 0,
                       grid: Grid | None = None, zeros: np.ndarray | None = None,
                       gguf: str = "") -> tuple[list, ChunkStats]:
    """:func:`encode_chunk` as a list of buffers to write in order (a raw stream is a view of
    its field, not a copy: on FP32 the raw tails are most of the output). With ``grid`` (the
    segment's, format 3) the payload starts with a mode byte: 1 and the grid's fields where every
    block of the chunk reproduces bit for bit on the grid, else 0 and the float fields. With
    ``zeros`` (format 6) too: 1 and the codes less their zero points, (q − z) mod 2^b, where that
    field's order-0 entropy is below the codes' own, else 0 and the codes. With ``gguf`` (format 5)
    a mode byte too: 0 and the block type's fields, or 1 and its fields with the codes as one field
    per class (:func:`_encode_gguf`)."""
    if gguf:
        return _encode_gguf(raw, GG.BLOCKS[gguf], policy)
    if zeros is not None:
        return _encode_codes_vs_zeros(raw, codes, zeros, policy)
    if grid is not None:
        gparts = G.split(grid, raw)
        if gparts is None:
            out, st = encode_chunk_parts(raw, dtype, policy, codes)
            return [b"\x00", *out], st
        hists = [np.bincount(p, minlength=1 << f.width).astype(np.int64) for f, p in zip(grid.fields, gparts)]
        precision = {f.name: grid.player.head_precision if f.name.endswith(".head") else RANS_PB for f in grid.fields}
        st = ChunkStats(exp_hist=np.bincount(exponent(raw, dtype), minlength=1 << layout(dtype).E))
        return [b"\x01", *_code_fields(grid.fields, gparts, hists, policy, precision, st)], st
    lay = layout(dtype, codes)
    parts, hists = lay.split_hist(raw, *_scratch_split(lay, len(raw) // lay.itemsize)) \
        if isinstance(lay, FloatLayout) else lay.split_hist(raw)
    st = ChunkStats()
    precision = {"head": lay.head_precision} if isinstance(lay, FloatLayout) else {}
    out = _code_fields(lay.fields, parts, hists, policy, precision, st)
    if isinstance(lay, FloatLayout):
        st.exp_hist = hists[0].reshape(1 << lay.E, 1 << lay.k).sum(1)
    return out, st


# a format-6 codes chunk's mode byte (zeros.py): its bits
LESS_ZEROS = 1  # the codes less their zero points, (q − z) mod 2^b
AS_BYTES = 2  # one field of the chunk's bytes (8-bit symbols: 8/b codes each), else one b-bit symbol a code
CODE_BYTES = (Field("codes", 8),)  # that field: coded by the policy's codes backends (rANS), not as bytes (zstd)


def codes_field(raw: np.ndarray, bits: int, zeros: np.ndarray | None) -> tuple[int, tuple[Field, ...], np.ndarray, np.ndarray]:
    """How pack codes a chunk of ``bits``-bit codes: (mode byte, fields, symbols, their counts).
    Without zero points (format 2): mode 0 and one ``bits``-bit symbol a code. With them (format 6):
    the codes less their zero points where that field's order-0 entropy (per code) is below the
    codes' own (LESS_ZEROS); as bytes where whole codes fill a byte (AS_BYTES; b = 1, 2, 4: the same
    or less entropy than the codes one by one, each symbol two to eight codes, so a quarter to half
    the rANS steps a decoded byte)."""
    lay = CODES[bits]
    mask = (1 << bits) - 1
    q = lay.codes(raw)  # (m,)
    hq = np.bincount(q, minlength=1 << bits).astype(np.int64)
    if zeros is None:
        return 0, lay.fields, q, hq
    if len(zeros) != len(q):
        raise ValueError(f"{len(zeros)} zero points for {len(q)} codes")
    d = (q - zeros) & mask
    hd = np.bincount(d, minlength=1 << bits).astype(np.int64)
    less = entropy_bits(None, bits, hd) < entropy_bits(None, bits, hq)
    if 8 % bits:
        return (LESS_ZEROS if less else 0), lay.fields, *((d, hd) if less else (q, hq))
    x = raw.copy()
    if less:
        K.add_codes(x, bits, (-zeros.astype(np.int64) & mask).astype(np.uint8))  # (q − z) mod 2^b, in place
    return AS_BYTES | (LESS_ZEROS if less else 0), CODE_BYTES, x, np.bincount(x, minlength=256).astype(np.int64)


def _encode_codes_vs_zeros(raw: np.ndarray, bits: int, zeros: np.ndarray, policy: str) -> tuple[list, ChunkStats]:
    """A codes chunk of a segment with zero points: mode byte, then one field (:func:`codes_field`)."""
    mode, fields, x, h = codes_field(raw, bits, zeros)
    st = ChunkStats()
    return [bytes([mode]), *_code_fields(fields, [x], [h], policy, {}, st)], st


def _code_fields(fields: tuple[Field, ...], parts: list[np.ndarray], hists: list[np.ndarray], policy: str,
                 precision: dict[str, int], st: ChunkStats, min_saving: float = 0.0) -> list:
    """``u8 nfields`` and each field's ``u8 backend | u32 length | stream``, as buffers; a codes
    field coded only where that saves ``min_saving`` bits a symbol."""
    pol = POLICIES[policy]
    out = [struct.pack("<B", len(parts))]
    for f, sym, hist in zip(fields, parts, hists):
        h = entropy_bits(None, f.width, hist)
        kind = _kind(f.name)
        bid, payload = encode_stream(sym, f.width, pol[kind], h, hist, view=True, precision=precision.get(f.name, RANS_PB),
                                     min_saving=min_saving if kind == "codes" else 0.0)
        out.append(struct.pack("<BI", bid, len(payload)))
        out.append(payload)
        b = min(h, float(len(sym) * f.width))
        st.bound_bits += b
        st.streams[BY_ID[bid].name] = st.streams.get(BY_ID[bid].name, 0) + len(payload)
        if st.field_bits is not None and st.field_bytes is not None:  # by field: a parameter's, the codes' classes summed
            key = f.name.partition(".")[0]
            st.field_bits[key] = st.field_bits.get(key, 0.0) + b
            st.field_bytes[key] = st.field_bytes.get(key, 0) + 5 + len(payload)
    return out


def _group(bt: GG.BlockType, params: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(order, per-class counts of code units) of a GGUF chunk's code units by their class (from
    the fields before the codes, ``params``): the units of class 0 first, each class in block
    order (a stable sort)."""
    cls = GG.classes(bt, params).astype(np.uint8)  # < 256 classes: numpy's stable sort is then a radix sort
    return np.argsort(cls, kind="stable"), np.bincount(cls, minlength=bt.nclasses)


def _grouped_fields(bt: GG.BlockType) -> tuple[Field, ...]:
    return bt.fields[:-1] + tuple(Field(f"codes.{c}", bt.code_bits) for c in range(bt.nclasses))


def _encode_gguf(raw: np.ndarray, bt: GG.BlockType, policy: str, modes: tuple[int, ...] = (0, 1)) -> tuple[list, ChunkStats]:
    """A chunk of whole GGUF blocks: ``u8 mode`` then the fields. Mode 0: the block type's fields
    (:data:`gguf.BLOCKS`); mode 1: the same with the codes cut by the class of their unit (block
    or sub-block, :func:`_group`), one field per class with its own model, kept where it saves
    :data:`GGUF_MIN_SAVING` bits a code over mode 0, or the policy's own :data:`MIN_SAVING`
    (``modes``: the modes tried; one forces it)."""
    parts = GG.split(bt, raw)
    hists = [np.bincount(p, minlength=1 << f.width).astype(np.int64) for f, p in zip(bt.fields, parts)]
    st = ChunkStats(field_bits={}, field_bytes={})
    saving = MIN_SAVING.get(policy, GGUF_MIN_SAVING)
    plain = _code_fields(bt.fields, parts, hists, policy, {}, st, saving)
    best, mode = plain, 0
    grouped_bits = None
    if bt.nclasses > 1 and len(parts[-1]):
        order, counts = _group(bt, parts[:-1])
        codes = parts[-1].reshape(-1, bt.unit)[order].reshape(-1)
        cuts = np.cumsum(counts * bt.unit)[:-1]
        cparts = np.split(codes, cuts)
        chists = [np.bincount(p, minlength=1 << bt.code_bits).astype(np.int64) for p in cparts]
        gst = ChunkStats(field_bits={}, field_bytes={})
        grouped = _code_fields(_grouped_fields(bt), parts[:-1] + cparts, hists[:-1] + chists, policy, {}, gst, saving)
        grouped_bits = gst.field_bits.get("codes", 0.0)
        gain = sum(len(b) for b in plain) - sum(len(b) for b in grouped)  # bytes grouping saves
        if modes == (1,) or 0 in modes and 1 in modes and gain > saving * len(parts[-1]) / 8:
            best, mode, st = grouped, 1, gst
    if grouped_bits is not None:  # the codes' bound: the smaller of one model and a model per class
        st.field_bits["codes"] = min(st.field_bits["codes"], grouped_bits)
        other = sum(v for k, v in st.field_bits.items() if k != "codes")
        st.bound_bits = other + st.field_bits["codes"]
    return [bytes((mode,)), *best], st


_scratch = threading.local()


def _scratch_split(lay: FloatLayout, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """This thread's head (n,) and tails (p, n) arrays to split a chunk into, reused chunk after
    chunk (fresh ones cost ~190 page faults a BF16 chunk), for the fields whose payload is never
    a view of the field: those not 8 bits wide (``encode_stream(view=True)`` returns a raw 8-bit
    stream as a view, written out after the next chunks are split); None: a fresh array."""
    bufs = _scratch.__dict__.setdefault("split", {})  # layout -> (head, tails) flat, by capacity
    p = len(lay.tail_widths)
    have = bufs.get(lay)
    if have is None or have[0].shape[0] < n:
        have = bufs[lay] = (np.empty(n, lay.head_dtype), np.empty(p * n, np.uint8))
    head = have[0][:n] if lay.fields[0].width != 8 else None
    tails = have[1][: p * n].reshape(p, n) if 8 not in lay.tail_widths else None
    return head, tails


def _scratch_fields(lay: FloatLayout, n: int) -> list[np.ndarray]:
    """This thread's arrays for one chunk's decoded fields (head, tail pieces), reused chunk
    after chunk: fresh arrays cost a page fault every 4 KiB on first write (thousands a decode,
    a visible share of its time), and reused ones stay in cache."""
    arrays = _scratch.__dict__.setdefault("arrays", {})  # layout -> this thread's field arrays
    have = arrays.get(lay)
    if have is None or have[0].shape[0] < n:
        have = arrays[lay] = [np.empty(n, np.uint16 if f.width > 8 else np.uint8) for f in lay.fields]
    return [a[:n] for a in have]


CK = Kernels("chunk_kernel")
CDK = Kernels("codes_kernel")  # decode_codes: a codes chunk in one call
K = Kernels("kernels")  # add_codes: format 6's codes given back their zero points  # decode_fields: the AOT build's where there is one (compiled.py)


def decode_chunk(buf: memoryview, dtype: str, nbytes: int, out: np.ndarray | None = None,
                 compiled: bool = True, codes: int = 0, grid: Grid | None = None,
                 zeros: ChunkZeros | None = None, gguf: str = "") -> np.ndarray:
    """Inverse of :func:`encode_chunk`: the chunk's ``nbytes`` bytes, written into ``out``
    ((nbytes,) uint8) if given; raises ValueError on any inconsistency.

    A float chunk's fields first decode in one compiled call (chunk_kernel.py, no GIL); what
    that does not handle or cannot decode takes the generic path below (``compiled=False``:
    only that one), which names the problem."""
    if gguf:
        return _decode_gguf(buf, GG.BLOCKS[gguf], nbytes, np.empty(nbytes, np.uint8) if out is None else out)
    lay = layout(dtype, codes)
    if nbytes % lay.itemsize:
        raise InputError(f"{nbytes} bytes is not a whole number of {dtype} words")
    n = lay.symbols(nbytes)  # in each field's stream
    if out is not None and out.shape != (nbytes,):
        raise InputError(f"output holds {out.shape} bytes, the chunk {nbytes}")
    if codes and grid is None and compiled:  # formats 2 and 6: one compiled call (codes_kernel.py)
        if out is None:
            out = np.empty(nbytes, np.uint8)
        if _decode_codes(buf, codes, n, out, zeros) == 0:
            return out
    if zeros is not None:  # format 6: a mode byte (LESS_ZEROS, AS_BYTES), then one field
        if not codes or len(buf) < 1 or buf[0] > 3:
            raise InputError("codes chunk with zero points: bad mode byte")
        if out is None:
            out = np.empty(nbytes, np.uint8)
        mode = buf[0]
        if mode & AS_BYTES:
            _decode_fields(buf[1:], CODE_BYTES, [nbytes], [out])
            if mode & LESS_ZEROS:
                zeros.add_to(out, codes)
            return out
        (sym,) = _decode_fields(buf[1:], CODES[codes].fields, [n])
        if mode & LESS_ZEROS:
            sym = (sym.astype(np.uint8) + zeros.array(n)) & ((1 << codes) - 1)
        return CODES[codes].merge([sym], nbytes, out)
    if grid is not None:
        if len(buf) < 1 or buf[0] > 1:
            raise InputError("grid chunk: bad mode byte")
        if buf[0] == 0:
            return decode_chunk(buf[1:], dtype, nbytes, out, compiled, codes)
        if n % grid.block:
            raise InputError(f"grid chunk of {n} values: not whole blocks of {grid.block}")
        parts = _decode_fields(buf[1:], grid.fields, grid.symbols(n))
        return G.merge(grid, parts, np.empty(nbytes, np.uint8) if out is None else out)
    if len(buf) < 1 or buf[0] != len(lay.fields):
        raise InputError("chunk header: wrong number of fields")
    if out is None:
        out = np.empty(nbytes, np.uint8)
    if compiled and lay is RAW and CDK.decode_bytes(np.frombuffer(buf, np.uint8), out) == 0:  # bytes: one call
        return out
    # raw bytes decode in place; codes (n symbols ≠ nbytes) into a fresh array, then merge
    fields = _scratch_fields(lay, n) if isinstance(lay, FloatLayout) else [out if n == nbytes else None]
    if compiled and isinstance(lay, FloatLayout):
        t = fields[1:] + [fields[1]] * (4 - len(fields))
        if CK.decode_fields(np.frombuffer(buf, np.uint8), lay.fields[0].width, lay.tail_w, fields[0], *t) == 0:
            lay.merge_kernel(fields[0], *t, out.view(lay.word))
            return out
    parts = _decode_fields(buf, lay.fields, [n] * len(lay.fields), fields)
    return lay.merge(parts, nbytes // lay.itemsize, out)


_NO_ZEROS = np.zeros((1, 1), np.uint8)  # the zero-point table of codes without zero points (unread)


def _decode_codes(buf: memoryview, bits: int, n: int, out: np.ndarray, zeros: ChunkZeros | None) -> int:
    """A codes chunk of ``n`` symbols into ``out`` in one compiled call (codes_kernel.decode_codes);
    nonzero where the generic path must run. The zero points are asked for only where the mode
    byte says the codes are less them."""
    b = np.frombuffer(buf, np.uint8)
    table, row, group, first = _NO_ZEROS, 1, 1, 0
    if zeros is not None and len(b) and b[0] & LESS_ZEROS and b[0] <= LESS_ZEROS | AS_BYTES:
        table, row, group, first = np.ascontiguousarray(zeros.table(), np.uint8), zeros.ref.row, zeros.ref.group, zeros.first
    sym = _NO_SYMBOLS
    if zeros is None or len(b) and not b[0] & AS_BYTES:  # one symbol a code: decoded into this thread's array
        sym = getattr(_scratch, "codes", _NO_SYMBOLS)
        if len(sym) < n:
            sym = _scratch.codes = np.empty(n, np.uint8)
    return CDK.decode_codes(b, bits, int(zeros is not None), table, row, group, first, out, sym)


_NO_SYMBOLS = np.zeros(0, np.uint8)


GK = Kernels("gguf_kernel")  # decode_chunk: a GGUF chunk in one call (the AOT build's where there is one)


def _fused_args(bt: GG.BlockType, nb: int) -> tuple:
    """gguf_kernel.decode_chunk's arguments after ``buf`` for ``nb`` blocks of ``bt`` but ``out``:
    the type's description and this thread's scratch arrays (reused chunk after chunk, as
    :func:`_scratch_fields`)."""
    kind, bits = GG.FUSED[bt.name]
    desc = _scratch.__dict__.setdefault("gguf_desc", {})
    d = desc.get(bt.name)
    if d is None:
        d = desc[bt.name] = (np.array([f.width for f in bt.fields], np.int64), np.array(bt.counts, np.int64))
    widths, counts = d
    # parameter and scale fields (u1), codes (u1), a class a unit (u1), where each unit's codes are (i8)
    nu = bt.weights * nb // bt.unit
    sizes = (int(counts[:-1].sum()) * nb, bt.weights * nb, nu, nu)
    have = getattr(_scratch, "gguf", None)
    if have is None or any(len(a) < n for a, n in zip(have, sizes)):
        have = _scratch.gguf = tuple(np.empty(max(n, 0 if have is None else len(a)), dt)
                                     for a, n, dt in zip(have or sizes, sizes, (np.uint8,) * 3 + (np.int64,)))
    return (kind, bits, bt.unit, bt.nclasses, widths, counts), tuple(a[:n] for a, n in zip(have, sizes))


_NO_BYTES = np.zeros(0, np.uint8)
_ZSTD = BACKENDS["zstd"].id


def _zstd_fields(buf: memoryview, most: int) -> np.ndarray | None:
    """The zstd streams of a GGUF chunk's fields (``u8 mode | u8 nfields | fields``), decoded one
    after another (gguf_kernel.decode_chunk copies them where they go; each at most ``most``
    symbols); None where the header does not parse (the numpy path names the problem)."""
    pos, out = 2, []
    for _ in range(buf[1]):
        if pos + 5 > len(buf):
            return None
        bid, ln = struct.unpack_from("<BI", buf, pos)
        pos += 5
        if bid == _ZSTD:
            z = getattr(_scratch, "zstd", None)
            if z is None:  # one a thread (a decompressor is not thread-safe; making one costs ~0.1 ms)
                z = _scratch.zstd = zstandard.ZstdDecompressor()
            try:
                out.append(z.decompress(bytes(buf[pos : pos + ln]), max_output_size=most))
            except zstandard.ZstdError:
                return None
        pos += ln
    return np.frombuffer(b"".join(out), np.uint8) if out else _NO_BYTES


def _decode_gguf(buf: memoryview, bt: GG.BlockType, nbytes: int, out: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_encode_gguf` into ``out`` ((nbytes,) uint8): in one compiled call
    (gguf_kernel.decode_chunk) for the types of :data:`gguf.FUSED`; a chunk it leaves (a zstd
    stream, a type it does not cover, a stream that does not decode) takes the numpy path below,
    which names any problem."""
    if nbytes % bt.block_bytes:
        raise InputError(f"{nbytes} bytes is not whole {bt.name} blocks of {bt.block_bytes}")
    if out.shape != (nbytes,):
        raise InputError(f"output holds {out.shape} bytes, the chunk {nbytes}")
    if len(buf) < 2 or buf[0] > 1:
        raise InputError("GGUF chunk: bad mode byte")
    if bt.name in GG.FUSED:
        nb = nbytes // bt.block_bytes
        desc, scratch = _fused_args(bt, nb)
        side = _zstd_fields(buf, bt.weights * nb)
        if side is not None and GK.decode_chunk(np.frombuffer(buf, np.uint8), *desc, nb, out, *scratch, side) == 0:
            return out
    counts = bt.symbols(nbytes // bt.block_bytes)
    if buf[0] == 0:
        parts = _decode_fields(buf[1:], bt.fields, counts)
    else:
        fields, inner = _grouped_fields(bt), buf[1:]
        if inner[0] != len(fields):
            raise InputError("chunk header: wrong number of fields")
        parts, pos = [], 1
        for f, n in zip(fields, counts[:-1]):
            sym, pos = _read_field(inner, pos, f, n, None)
            parts.append(sym)
        order, ncls = _group(bt, parts)
        grouped = np.empty(len(order) * bt.unit, np.uint8 if bt.code_bits <= 8 else np.uint16)
        at = 0
        for f, n in zip(fields[len(parts):], ncls * bt.unit):
            _, pos = _read_field(inner, pos, f, int(n), grouped[at : at + n])
            at += n
        if pos != len(inner):
            raise InputError("chunk has trailing bytes")
        back = np.empty_like(order)  # unit k of the chunk is unit back[k] of the grouped codes
        back[order] = np.arange(len(order))
        codes = np.take(grouped.reshape(-1, bt.unit), back, axis=0)  # whole rows: a copy each
        parts.append(codes.reshape(-1))
    return GG.merge(bt, parts, out)


def _read_field(buf: memoryview, pos: int, f: Field, n: int, dst: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The ``n`` symbols of the field at ``pos`` (``u8 backend | u32 length | stream``) and the
    position after it."""
    if pos + 5 > len(buf):
        raise InputError("chunk truncated")
    bid, ln = struct.unpack_from("<BI", buf, pos)
    pos += 5
    if pos + ln > len(buf):
        raise InputError("chunk truncated")
    sym = decode_stream(bid, buf[pos : pos + ln], n, f.width, dst)
    if len(sym) != n:
        raise InputError("stream decoded to the wrong length")
    return sym, pos + ln


def _decode_fields(buf: memoryview, fields: tuple[Field, ...], counts: list[int],
                   dsts: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
    """The symbols of each field of a ``u8 nfields | fields`` payload (``counts[i]`` in field i)."""
    if len(buf) < 1 or buf[0] != len(fields):
        raise InputError("chunk header: wrong number of fields")
    pos, parts = 1, []
    for f, n, dst in zip(fields, counts, dsts or [None] * len(fields)):
        sym, pos = _read_field(buf, pos, f, n, dst)
        parts.append(sym)
    if pos != len(buf):
        raise InputError("chunk has trailing bytes")
    return parts
