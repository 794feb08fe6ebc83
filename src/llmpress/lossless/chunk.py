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

from ..errors import InputError
from .compiled import Kernels
from .entropy import BY_ID, RANS_PB, decode_stream, encode_stream, entropy_bits
from . import grid as G
from .fields import Field, FloatLayout, exponent, layout
from .grid import Grid

# policy name -> entropy backends tried on (head, tail, bytes, codes) streams, besides raw
# (codes: a quantized tensor's codes, one symbol each; zstd too, for codes that repeat)
POLICIES: dict[str, dict[str, tuple[str, ...]]] = {
    "rans": {"head": ("rans",), "tail": ("rans", "split"), "bytes": ("zstd",), "codes": ("rans", "split", "zstd")},
    "ans": {"head": ("ans",), "tail": ("ans",), "bytes": ("zstd",), "codes": ("ans", "zstd")},
    "zstd": {"head": ("zstd",), "tail": ("zstd",), "bytes": ("zstd",), "codes": ("zstd",)},
}


@dataclass
class ChunkStats:
    """What the bounds need from one chunk (computed from the fields the coder already has)."""

    exp_hist: np.ndarray | None = None  # (2**E,) exponent counts, floats only
    bound_bits: float = 0.0  # Σ_fields min(n·H0(field), n·width): the chunk-adaptive bound
    streams: dict[str, int] = field(default_factory=dict)  # backend name -> bytes, for reports
    delta: int | None = None  # a delta chunk's mode (delta.py); None: not coded against a base


def _kind(name: str) -> str:
    """A field's policy entry; a grid parameter's fields (``d.head``, ``m.tail0``) as a float's."""
    name = name.rpartition(".")[2]
    return name if name in ("bytes", "head", "codes") else "tail"


def encode_chunk(raw: np.ndarray, dtype: str, policy: str = "rans", codes: int = 0,
                 grid: Grid | None = None) -> tuple[bytes, ChunkStats]:
    """raw: (nbytes,) uint8, a whole number of ``dtype`` words (never modified); ``codes``: the
    bits of the codes a U8 tensor holds bit-packed (0: none); ``grid``: the segment's grid."""
    parts, st = encode_chunk_parts(raw, dtype, policy, codes, grid)
    return b"".join(parts), st


def encode_chunk_parts(raw: np.ndarray, dtype: str, policy: str = "rans", codes: int = 0,
                       grid: Grid | None = None) -> tuple[list, ChunkStats]:
    """:func:`encode_chunk` as a list of buffers to write in order (a raw stream is a view of
    its field, not a copy: on FP32 the raw tails are most of the output). With ``grid`` (the
    segment's, format 3) the payload starts with a mode byte: 1 and the grid's fields where every
    block of the chunk reproduces bit for bit on the grid, else 0 and the float fields."""
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


def _code_fields(fields: tuple[Field, ...], parts: list[np.ndarray], hists: list[np.ndarray], policy: str,
                 precision: dict[str, int], st: ChunkStats) -> list:
    """``u8 nfields`` and each field's ``u8 backend | u32 length | stream``, as buffers."""
    pol = POLICIES[policy]
    out = [struct.pack("<B", len(parts))]
    for f, sym, hist in zip(fields, parts, hists):
        h = entropy_bits(None, f.width, hist)
        bid, payload = encode_stream(sym, f.width, pol[_kind(f.name)], h, hist, view=True,
                                     precision=precision.get(f.name, RANS_PB))
        out.append(struct.pack("<BI", bid, len(payload)))
        out.append(payload)
        st.bound_bits += min(h, float(len(sym) * f.width))
        st.streams[BY_ID[bid].name] = st.streams.get(BY_ID[bid].name, 0) + len(payload)
    return out


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


CK = Kernels("chunk_kernel")  # decode_fields: the AOT build's where there is one (compiled.py)


def decode_chunk(buf: memoryview, dtype: str, nbytes: int, out: np.ndarray | None = None,
                 compiled: bool = True, codes: int = 0, grid: Grid | None = None) -> np.ndarray:
    """Inverse of :func:`encode_chunk`: the chunk's ``nbytes`` bytes, written into ``out``
    ((nbytes,) uint8) if given; raises ValueError on any inconsistency.

    A float chunk's fields first decode in one compiled call (chunk_kernel.py, no GIL); what
    that does not handle or cannot decode takes the generic path below (``compiled=False``:
    only that one), which names the problem."""
    lay = layout(dtype, codes)
    if nbytes % lay.itemsize:
        raise InputError(f"{nbytes} bytes is not a whole number of {dtype} words")
    n = lay.symbols(nbytes)  # in each field's stream
    if out is not None and out.shape != (nbytes,):
        raise InputError(f"output holds {out.shape} bytes, the chunk {nbytes}")
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
    # raw bytes decode in place; codes (n symbols ≠ nbytes) into a fresh array, then merge
    fields = _scratch_fields(lay, n) if isinstance(lay, FloatLayout) else [out if n == nbytes else None]
    if compiled and isinstance(lay, FloatLayout):
        t = fields[1:] + [fields[1]] * (4 - len(fields))
        if CK.decode_fields(np.frombuffer(buf, np.uint8), lay.fields[0].width, lay.tail_w, fields[0], *t) == 0:
            lay.merge_kernel(fields[0], *t, out.view(lay.word))
            return out
    parts = _decode_fields(buf, lay.fields, [n] * len(lay.fields), fields)
    return lay.merge(parts, nbytes // lay.itemsize, out)


def _decode_fields(buf: memoryview, fields: tuple[Field, ...], counts: list[int],
                   dsts: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
    """The symbols of each field of a ``u8 nfields | fields`` payload (``counts[i]`` in field i)."""
    if len(buf) < 1 or buf[0] != len(fields):
        raise InputError("chunk header: wrong number of fields")
    pos, parts = 1, []
    for f, n, dst in zip(fields, counts, dsts or [None] * len(fields)):
        if pos + 5 > len(buf):
            raise InputError("chunk truncated")
        bid, ln = struct.unpack_from("<BI", buf, pos)
        pos += 5
        if pos + ln > len(buf):
            raise InputError("chunk truncated")
        sym = decode_stream(bid, buf[pos : pos + ln], n, f.width, dst)
        if len(sym) != n:
            raise InputError("stream decoded to the wrong length")
        parts.append(sym)
        pos += ln
    if pos != len(buf):
        raise InputError("chunk has trailing bytes")
    return parts
