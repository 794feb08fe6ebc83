"""Cut an input file into segments that cover it byte for byte.

A safetensors file is ``u64 N | N bytes of JSON header | data``; it becomes a ``bytes``
segment for the length + header (kept verbatim, padding and ``__metadata__`` included), one
typed segment per tensor in file order, and ``bytes`` segments for any gap or trailing bytes.
A GGUF file is cut by gguf.py (header verbatim, a tensor segment per tensor, padding). Any
other file (config, tokenizer...) is one ``bytes`` segment. The header is read and checked
here, with our own bounded reader (no full load, no pickle): a header that lies about sizes is
refused before anything large is allocated.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFileError
from . import gguf
from .fields import CODES_DTYPES, ITEMSIZE, FloatLayout, layout
from .grid import Grid
from .zeros import ZeroRef

MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
MAX_NDIM = 16
GGUF_CHUNKS = 4  # a GGUF tensor's chunks: this many times chunk_bytes (chunks_of)


class HeaderError(CorruptFileError):
    pass


@dataclass
class Segment:
    kind: str  # "bytes" | "tensor"
    offset: int  # in the input file
    length: int
    name: str = ""
    dtype: str = "bytes"
    shape: tuple[int, ...] = ()
    codes: int = 0  # an integer tensor holding codes of this many bits, bit-packed (fields.CodesLayout); 0: none
    grid: Grid | None = None  # a float tensor whose values lie on this grid (grid.py; found while packing)
    zero: ZeroRef | None = None  # a codes tensor's zero points (zeros.py; format 6)
    gguf: str = ""  # a GGUF tensor of whole blocks of this ggml type (gguf.BLOCKS); "": none
    base: str = ""  # sha256 of the base model's tensor this one is coded against (delta.py); "": none


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(header byte length N, parsed JSON) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"{path}: too short for a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise HeaderError(f"{path}: header length {n} exceeds the file ({size} bytes) or the limit")
        raw = f.read(n)
    try:
        hdr = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(hdr, dict):
        raise HeaderError(f"{path}: header is not a JSON object")
    return n, hdr


def check_tensor(where: str, name: str, info: object, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one header entry: (dtype, shape, begin, end) or HeaderError."""
    if not isinstance(info, dict):
        raise HeaderError(f"{where}: tensor {name!r}: entry is not an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise HeaderError(f"{where}: tensor {name!r}: unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape)
    ):
        raise HeaderError(f"{where}: tensor {name!r}: absurd shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise HeaderError(f"{where}: tensor {name!r}: bad data_offsets {offs!r}")
    b, e = offs
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if not 0 <= b <= e <= data_len or e - b != nbytes:
        raise HeaderError(
            f"{where}: tensor {name!r}: data_offsets {offs} do not hold {shape} {dtype} "
            f"({nbytes} bytes) inside the {data_len}-byte data section"
        )
    return dtype, tuple(shape), b, e


def plan_safetensors(path: Path, codes: dict[str, int] | None = None) -> list[Segment]:
    size = path.stat().st_size
    n, hdr = read_safetensors_header(path)
    base, data_len = 8 + n, size - 8 - n
    tensors = []
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        dtype, shape, b, e = check_tensor(str(path), name, info, data_len)
        bits = (codes or {}).get(name, 0) if dtype in CODES_DTYPES else 0
        tensors.append(Segment("tensor", base + b, e - b, name, dtype, shape, bits))
    tensors.sort(key=lambda s: (s.offset, s.length))
    segs, pos = [Segment("bytes", 0, base)], base
    for t in tensors:
        if t.offset < pos:
            raise HeaderError(f"{path}: tensor {t.name!r} overlaps the previous one")
        if t.offset > pos:
            segs.append(Segment("bytes", pos, t.offset - pos))
        segs.append(t)
        pos = t.offset + t.length
    if pos < size:
        segs.append(Segment("bytes", pos, size - pos))
    return segs


def plan_file(path: Path, codes: dict[str, int] | None = None) -> list[Segment]:
    """Segments of any file: typed tensors for a valid safetensors file, bytes otherwise;
    ``codes``: {tensor name: bits} of the U8 tensors that hold bit-packed codes."""
    if path.suffix == ".safetensors":
        return plan_safetensors(path, codes)
    if gguf.is_gguf(path):
        return gguf.plan_gguf(path)
    return [Segment("bytes", 0, path.stat().st_size)]


def chunks_of(seg: Segment, chunk_bytes: int, max_bytes: int = 64 << 20) -> list[tuple[int, int]]:
    """(offset, length) of the chunks of a segment. A float tensor's chunk holds
    ``chunk_bytes // 2`` words (its head stream's length, where each chunk pays for its models
    and lanes), so an FP32 chunk is twice ``chunk_bytes``; other segments are cut every
    ``chunk_bytes``: 1 MiB chunks with 16-piece tail streams come out slightly smaller than 512 KiB
    ones (fewer models and lane states; the pieces keep the tails adaptive). A GGUF tensor's
    chunks hold whole blocks, ``GGUF_CHUNKS`` times as many bytes: a chunk of blocks has a dozen
    to forty streams, whose fixed costs (models, lane states, each stream's call) 2 MiB chunks
    spread four times thinner than 512 KiB ones (smaller and faster to decode: bench/lossless.py).
    A segment of ``b``-bit codes is cut every whole number of ``b`` bytes (8 codes), so each
    chunk starts on a code."""
    lay = layout(seg.dtype)
    size = lay.itemsize if isinstance(lay, FloatLayout) else (seg.codes or ITEMSIZE.get(seg.dtype, 1))
    if seg.gguf:  # whole blocks, GGUF_CHUNKS × chunk_bytes of them
        size = gguf.BLOCKS[seg.gguf].block_bytes
        chunk_bytes *= GGUF_CHUNKS
    words = chunk_bytes // 2 if isinstance(lay, FloatLayout) else chunk_bytes // size
    step = max(size, min(words * size, max_bytes // size * size))
    return [(o, min(step, seg.length - o)) for o in range(0, seg.length, step)]
