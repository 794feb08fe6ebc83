"""The ``.llmp`` container: a whole checkpoint, losslessly, in one indexed, checksummed file.

docs/FORMAT.md specifies the bytes (format 1, stored as version 5 in the preamble) and
docs/llmp-index.schema.json the index. Layout (little-endian)::

    b"LLMPRESS" u32 version (5)                      12-byte preamble
    chunk payloads ...                               (see chunk.py), in file order
    index: zstd-compressed JSON
    u64 index offset | u64 index length | u32 crc32(index) | b"LLMPIDX1"   28-byte footer

The index lists every input file (relative path, size, sha256) as segments that cover it byte
for byte (segments.py): the safetensors header verbatim, one typed segment per tensor (name,
dtype, shape), gaps. Each segment is a list of chunks ``[offset, length, raw bytes, checksum]``
(a float tensor's chunk holds 256 Ki words: 512 KiB of BF16, 1 MiB of FP32; segments.chunks_of).
The checksum is the low 32 bits of xxh3-64 of the chunk's *decoded* bytes, so each chunk is
checked as soon as it is decoded, by the consuming thread while the workers decode the next
ones (the chunks of a segment cover it, so every restored byte is checked without a serial
pass of its own). Payloads are read as slices of a read-only memory map (no copy). Config,
tokenizer and other files are ``bytes`` segments, zstd-coded or stored. So one tensor is read
by seeking to its chunks; chunks decode in parallel; a whole file is checked against its sha256
on ``unpack``/``verify`` (which can skip it: the chunk checksums already cover every byte).

``pack`` and ``unpack`` stream: at most a few chunks per thread are in memory at once.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import xxhash
import zstandard

from ..errors import BaseModelError, CorruptFileError, InputError, NotFoundError, UnsupportedFormatError
from .chunk import decode_chunk
from .delta import can_delta, decode_delta_chunk
from .fields import CODES, CODES_DTYPES, ITEMSIZE
from .gguf import BLOCKS
from .grid import TENSOR_DTYPES, Grid
from .segments import MAX_NDIM
from .zeros import MAX_GROUPS, PACKED_DTYPES, VALUE_DTYPES, ChunkZeros, ZeroRef, zero_table

if TYPE_CHECKING:  # torch only where a tensor is returned: pack/unpack/verify/info never import it
    import torch

    from .base import BaseModel

MAGIC, VERSION = b"LLMPRESS", 5
CODES_VERSION = 6  # format 2: format 1 plus segments of bit-packed codes (``codes``: fields.CodesLayout)
GRID_VERSION = 7  # format 3: format 2 plus float tensors coded on a block grid (``grid``: grid.py)
DELTA_VERSION = 8  # format 4: format 3 plus tensors coded against a base model (``base``: delta.py)
GGUF_VERSION = 9  # format 5: format 4 plus GGUF tensors of ggml blocks coded by field (``gguf``: gguf.py)
ZEROS_VERSION = 10  # format 6: format 5 plus codes in any integer dtype and codes coded against their zero points
READABLE = (VERSION, CODES_VERSION, GRID_VERSION, DELTA_VERSION, GGUF_VERSION, ZEROS_VERSION)
# the version field holds 5 for format 1 and 6 for format 2 (docs/FORMAT.md); versions 1-4 came
# before the format was frozen, were written only while llmpress was developed, and are no longer read
RETIRED = (1, 2, 3, 4)
FOOTER = struct.Struct("<QQI8s")
END = b"LLMPIDX1"
CHUNK_BYTES = 512 << 10  # smaller files than 1 MiB chunks (more adaptive models) and no slower (bench/lossless.py)
INLINE_BYTES = 64 << 10  # chunks this small decode in the calling thread
CHUNK_COST = 64 << 10  # a chunk's fixed cost (Python, checks, hand-off) in bytes of decoding, for sharing work
MAX_CHUNK_BYTES = 64 << 20
MAX_INDEX = 1 << 30
RELEASE_BYTES = 64 << 20  # a streamed read gives back the map's pages behind it every this many bytes


class CorruptError(CorruptFileError):
    """A packed file is truncated, corrupted or not an llmpress container."""


def crc32(b: bytes | memoryview | np.ndarray) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def chunk_sum(b: bytes | memoryview | np.ndarray) -> int:
    """The checksum stored for a chunk's decoded bytes: the low 32 bits of xxh3-64 (far faster
    than zlib's crc32; 32 bits keep the index small)."""
    return xxhash.xxh3_64_intdigest(b) & 0xFFFFFFFF


class Packed:
    """A ``.llmp`` file opened for reading; the index is checked before anything is decoded."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            pre = f.read(12)
            if len(pre) < 12 or pre[:8] != MAGIC:
                raise CorruptError(f"{self.path}: not an llmpress container (bad magic)")
            (ver,) = struct.unpack("<I", pre[8:])
            self.version = ver
            if ver in RETIRED:
                raise UnsupportedFormatError(
                    f"{self.path}: container version {ver} is no longer read: it predates .llmp format 1 (version "
                    f"{VERSION}); unpack it with the llmpress that wrote it and pack it again")
            if ver not in READABLE:
                raise UnsupportedFormatError(f"{self.path}: container version {ver}; this llmpress reads versions "
                                             f"{VERSION} to {ZEROS_VERSION} (.llmp formats 1 to 6) only "
                                             "(a newer llmpress wrote it?)")
            if self.size < 12 + FOOTER.size:
                raise CorruptError(f"{self.path}: truncated (no footer)")
            f.seek(self.size - FOOTER.size)
            off, ln, crc, end = FOOTER.unpack(f.read(FOOTER.size))
            if end != END:
                raise CorruptError(f"{self.path}: truncated or corrupted (footer missing)")
            self.data_end = self.size - FOOTER.size - ln
            if ln > MAX_INDEX or off != self.data_end or off < 12:
                raise CorruptError(f"{self.path}: footer points outside the file")
            f.seek(off)
            blob = f.read(ln)
        if crc32(blob) != crc:
            raise CorruptError(f"{self.path}: index checksum mismatch")
        try:
            self.index = json.loads(zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_INDEX))
        except (zstandard.ZstdError, ValueError) as e:
            raise CorruptError(f"{self.path}: unreadable index ({e})") from None
        self._grids: dict[int, Grid] = {}  # id(segment record) -> its grid, parsed once
        self._zeros: dict[int, tuple[ZeroRef, dict, list[int]]] = {}  # id(codes segment) -> (ref, zero segment, chunk starts)
        self._tables: dict[int, np.ndarray] = {}  # id(codes segment) -> its zero points (rows, groups), decoded once
        self._lock = threading.Lock()
        self._starts: dict[int, list[int]] = {}  # id(segment coded against the base) -> its chunks' offsets in it
        self.base: BaseModel | None = None  # what the segments with a ``base`` decode against (attach_base)
        self._check_index()
        self._fh = open(self.path, "rb")
        # payloads are read as slices of a read-only map: no copy; the index check above keeps
        # every slice inside the file
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._map)
        self._released = 0  # the map's pages below this offset were given back (_release_before)

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a decoded array still views it: the map closes when that goes
            pass
        self._fh.close()

    def __enter__(self) -> "Packed":
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()

    def _check_index(self) -> None:
        """Refuse a lying index: unsafe or repeated file paths, chunks outside the payload area,
        sizes that do not add up."""
        try:
            if self.index["format"] != "llmpress.lossless" or self.index["version"] != self.version:
                raise CorruptError(f"{self.path}: the index is not a version {self.version} llmpress index")
            paths: set[str] = set()
            for f in self.index["files"]:
                pos = 0
                if not isinstance(f["path"], str) or f["path"].startswith("/") or ".." in f["path"].split("/"):
                    raise CorruptError(f"{self.path}: unsafe file path {f['path']!r}")
                # two entries for one file: unpack would write it twice (the last wins) while
                # file_bytes and load read the first, so what the file holds would depend on the reader
                norm = str(PurePosixPath(f["path"]))
                if norm in paths or norm in ("", "."):
                    raise CorruptError(f"{self.path}: file path {f['path']!r} " + ("is empty" if norm in ("", ".") else "appears twice"))
                paths.add(norm)
                if type(f["size"]) is not int or not isinstance(f["sha256"], str):
                    raise CorruptError(f"{self.path}: file {f['path']}: size and sha256 must be an integer and a digest")
                if "base" in f:  # the base model's file of the same path: no segments of its own
                    if f["base"] is not True or f["segments"] or self.version < DELTA_VERSION or "base" not in self.index:
                        raise CorruptError(f"{self.path}: file {f['path']}: a base reference with segments, or in a "
                                           f"version {self.version} file")
                    continue
                for s in f["segments"]:
                    where = _Where(self.path, f, s)  # the message's place, formatted only for an error
                    if type(s["offset"]) is not int or type(s["length"]) is not int or not isinstance(s["dtype"], str):
                        raise CorruptError(f"{where}: offset, length and dtype must be integers and a name")
                    if s["offset"] != pos or s["dtype"] not in ITEMSIZE and s["dtype"] != "bytes":
                        raise CorruptError(f"{where}: segment does not follow the previous one")
                    if "codes" in s and not (self.version >= CODES_VERSION and type(s["codes"]) is int
                                             and s["codes"] in CODES and s["kind"] == "tensor" and
                                             (s["dtype"] == "U8" or self.version >= ZEROS_VERSION and s["dtype"] in CODES_DTYPES)):
                        raise CorruptError(f"{where}: codes of {s['codes']!r} bits in a {s['dtype']} segment")
                    if s["kind"] == "tensor":
                        shape = s["shape"]
                        if len(shape) > MAX_NDIM or any(not isinstance(d, int) or d < 0 for d in shape) or \
                                math.prod(shape) * ITEMSIZE[s["dtype"]] != s["length"]:
                            raise CorruptError(f"{where}: shape {shape} does not match {s['length']} bytes")
                    if "grid" in s:
                        self._grids[id(s)] = self._check_grid(where, s)
                    if "gguf" in s:
                        self._check_gguf(where, s)
                    if "base" in s:
                        self._check_base(where, s)
                    total = 0
                    end = self.data_end
                    for i, (o, ln, raw, crc) in enumerate(s["chunks"]):
                        if not (type(o) is int and type(ln) is int and type(raw) is int and type(crc) is int):
                            raise CorruptError(f"{where}, chunk {i}: offsets, sizes and checksum must be integers")
                        if not (12 <= o and 0 <= ln and o + ln <= end and 0 < raw <= MAX_CHUNK_BYTES):
                            raise CorruptError(f"{where}, chunk {i}: lies outside the file or is too large")
                        total += raw
                    if total != s["length"]:
                        raise CorruptError(f"{where}: chunks hold {total} bytes, segment says {s['length']}")
                    pos += s["length"]
                if pos != f["size"]:
                    raise CorruptError(f"{self.path}: file {f['path']}: segments cover {pos} of {f['size']} bytes")
                self._check_zeros(f)
            if "base" in self.index and not (self.version >= DELTA_VERSION and isinstance(self.index["base"], dict)):
                raise CorruptError(f"{self.path}: a base model record in a version {self.version} file")
            if self._starts and "base" not in self.index:
                raise CorruptError(f"{self.path}: tensors coded against a base, and no base model record")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CorruptError):
                raise
            raise CorruptError(f"{self.path}: malformed index ({type(e).__name__}: {e})") from None

    def _check_zeros(self, f: dict) -> None:
        """Each codes segment's ``zero`` (format 6): a tensor of the same file, 2-D, not itself
        coded against zero points, of a dtype its packing reads; the segment's chunks start on
        whole codes."""
        names = {s["name"]: s for s in f["segments"] if s["kind"] == "tensor"}
        for s in f["segments"]:
            if "zero" not in s:
                continue
            where = _Where(self.path, f, s)
            try:
                ref = ZeroRef.from_index(s["zero"])
            except ValueError as e:
                raise CorruptError(f"{where}: {e}") from None
            zs = names.get(ref.tensor)
            dtypes = VALUE_DTYPES if ref.packing == "value" else PACKED_DTYPES
            if self.version < ZEROS_VERSION or "codes" not in s or zs is None or "zero" in zs or \
                    len(zs["shape"]) != 2 or zs["dtype"] not in dtypes or zs["shape"][1] > MAX_GROUPS:
                raise CorruptError(f"{where}: zero points in {ref.tensor!r}, which is not a 2-D {'/'.join(dtypes)} "
                                   f"tensor of this file (or the file is version {self.version})")
            b, starts, pos = s["codes"], [], 0
            for c in s["chunks"]:
                if pos % b:
                    raise CorruptError(f"{where}: a chunk does not start on a whole {b}-bit code")
                starts.append(8 * pos // b)
                pos += c[2]
            self._zeros[id(s)] = (ref, zs, starts)

    def _zero_points(self, f: dict, s: dict, i: int) -> ChunkZeros:
        """The zero points of chunk ``i`` of codes segment ``s``: the zero tensor is decoded once
        (its own chunks checked), when the first chunk that needs it asks."""
        ref, zs, starts = self._zeros[id(s)]

        def table() -> np.ndarray:
            with self._lock:
                t = self._tables.get(id(s))
                if t is None:
                    raw = np.empty(zs["length"], np.uint8)  # a small tensor: its chunks decoded here, in turn
                    pos = 0
                    for k, c in enumerate(zs["chunks"]):
                        self._decode(f, zs, k, self._read(c[0], c[1]), raw[pos : pos + c[2]])
                        pos += c[2]
                    try:
                        t = zero_table(raw, zs["dtype"], zs["shape"], ref.packing, s["codes"])
                    except ValueError as e:
                        raise InputError(f"zero points in {ref.tensor!r}: {e}") from None
                    self._tables[id(s)] = t
            return t

        return ChunkZeros(table, ref, starts[i], _zero_scratch(CODES[s["codes"]].symbols(s["chunks"][i][2])))

    def _check_grid(self, where: str | _Where, s: dict) -> Grid:
        """A segment's grid, checked against the version, its dtype, shape and chunks."""
        try:
            g = Grid.from_index(s["grid"])
        except ValueError as e:
            raise CorruptError(f"{where}: {e}") from None
        if self.version < GRID_VERSION or s["kind"] != "tensor" or s["dtype"] not in TENSOR_DTYPES:
            raise CorruptError(f"{where}: a grid in a {s['dtype']} {s['kind']} segment of a version {self.version} file")
        if not s["shape"] or s["shape"][-1] % g.block:
            raise CorruptError(f"{where}: rows of {s['shape'][-1:]} values are not whole blocks of {g.block}")
        if any(c[2] % (ITEMSIZE[s["dtype"]] * g.block) for c in s["chunks"]):
            raise CorruptError(f"{where}: a chunk does not hold whole blocks of {g.block}")
        return g

    def _check_gguf(self, where: str | _Where, s: dict) -> None:
        """A GGUF block segment: a known block type, a U8 tensor of [blocks, block bytes] whose
        chunks hold whole blocks, in a version 9 file."""
        bt = BLOCKS.get(s["gguf"]) if isinstance(s["gguf"], str) else None
        if bt is None or self.version < GGUF_VERSION or s["kind"] != "tensor" or s["dtype"] != "U8":
            raise CorruptError(f"{where}: GGUF blocks {s['gguf']!r} in a {s['dtype']} {s['kind']} segment of a "
                               f"version {self.version} file")
        if len(s["shape"]) != 2 or s["shape"][1] != bt.block_bytes:
            raise CorruptError(f"{where}: shape {s['shape']} is not [blocks, {bt.block_bytes}] of {bt.name}")
        if any(c[2] % bt.block_bytes for c in s["chunks"]):
            raise CorruptError(f"{where}: a chunk does not hold whole {bt.name} blocks")
    def _check_base(self, where: str | _Where, s: dict) -> None:
        """A segment coded against the base: a float tensor, the base tensor's sha256, no grid."""
        h = s["base"]
        if self.version < DELTA_VERSION or s["kind"] != "tensor" or not can_delta(s["dtype"]) or "grid" in s:
            raise CorruptError(f"{where}: coded against a base in a {s['dtype']} {s['kind']} segment of a version "
                               f"{self.version} file")
        if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)):
            raise CorruptError(f"{where}: the base tensor's sha256 {h!r} is not a digest")
        starts, pos = [], 0
        for c in s["chunks"]:
            starts.append(pos)
            pos += c[2]
        self._starts[id(s)] = starts

    # -- the base model

    @property
    def needs_base(self) -> bool:
        """Whether decoding needs a base model (a fine-tune coded against it, format 4)."""
        return "base" in self.index

    def base_summary(self) -> dict[str, Any] | None:
        """What the file was packed against: the base's name as given, and how many of its
        tensors and files it needs (None: no base)."""
        if not self.needs_base:
            return None
        tensors = sum(1 for _, s in self.tensors() if "base" in s)
        files = sum(1 for f in self.index["files"] if f.get("base"))
        return {**self.index["base"], "tensors": tensors, "files": files}

    def require_base(self) -> None:
        if self.needs_base and self.base is None:
            b = self.index["base"].get("name", "?")
            raise BaseModelError(f"{self.path}: packed as a delta against a base model ({b}); decoding it needs "
                                 "that base model (a folder, .safetensors or .llmp file)")

    def attach_base(self, base: BaseModel | None) -> None:
        """Decode against ``base`` from now on, once every tensor and file the index records was
        found in it with the recorded sha256 (else BaseModelError, naming the first that differs);
        a file that needs no base ignores one."""
        if base is None or not self.needs_base:
            return
        base.check(self.index, str(self.path))
        self.base = base

    # -- decoding

    def _what(self, f: dict, s: dict, i: int) -> str:
        return f"{self.path}: file {f['path']}, " + (f"tensor {s['name']!r}" if s["kind"] == "tensor" else f"bytes at {s['offset']}") + f", chunk {i}"

    def _decode(self, f: dict, s: dict, i: int, payload: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """One chunk's decoded bytes (into ``out``, (raw,) uint8, if given), checked against its
        checksum."""
        o, ln, raw, crc = s["chunks"][i]
        if len(payload) != ln:
            raise CorruptError(f"{self._what(f, s, i)}: truncated")
        if "base" in s:
            self.require_base()
            base = self.base.read(s["name"], self._starts[id(s)][i], raw)  # type: ignore[union-attr]
        try:
            if "base" in s:
                out = decode_delta_chunk(memoryview(payload), s["dtype"], raw, base, out)
            else:
                out = decode_chunk(memoryview(payload), s["dtype"], raw, out, codes=s.get("codes", 0),
                                   grid=self._grids.get(id(s)),
                                   zeros=self._zero_points(f, s, i) if id(s) in self._zeros else None,
                                   gguf=s.get("gguf", ""))
        except (ValueError, zstandard.ZstdError) as e:
            raise CorruptError(f"{self._what(f, s, i)}: checksum mismatch or undecodable (corrupted: {e})") from None
        if chunk_sum(out) != crc:
            raise CorruptError(f"{self._what(f, s, i)}: checksum mismatch (corrupted)")
        return out

    def _read(self, o: int, ln: int) -> memoryview:
        return self._view[o : o + ln]

    def _release_before(self, offset: int) -> None:
        """Drop the map's pages below ``offset`` from this process once ``RELEASE_BYTES`` have been
        read past the last drop: a streamed read of a large file would otherwise keep every page
        it touched resident in the process (they stay in the page cache; a later read faults them
        back in). Payloads are read in file order, so everything below the chunk being handed out
        has been decoded."""
        if offset - self._released < RELEASE_BYTES or not hasattr(mmap, "MADV_DONTNEED"):
            return
        end = offset // mmap.PAGESIZE * mmap.PAGESIZE
        start = self._released // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
            self._released = end

    def iter_chunks(self, f: dict, segs: list[dict], ex: ThreadPoolExecutor | None = None,
                    ahead: int = 4) -> Iterator[np.ndarray]:
        """Decoded chunks of the segments ``segs`` of file ``f``, in order, each checked. One pipeline spans the segments, so small tensors do not
        drain the thread pool; small chunks decode inline (a hand-off costs more than they do).

        The caller is one of the decoders: with ``ex`` of w workers, it keeps a chunk for itself
        while its share of the work (the small chunks it decodes inline counted, each chunk
        costing its bytes plus ``CHUNK_COST``) is below 1/(w+1), and decodes it when its turn to be
        yielded comes while the workers decode the chunks queued after it. So n threads decode
        (w = n − 1), none of them waits idle in the common case, and no thread is added on top of
        n (more throughput than two workers and a waiting caller on 2 cores; counting the inline
        chunks keeps the caller, which also runs them and the bookkeeping, from being the one the
        others wait for). Each
        decoder checks the chunk it decoded (xxh3-64).

        Chunks are decoded into a few output arrays that go round: a yielded array is valid
        until the next one is asked for (every consumer here writes, hashes or copies it at
        once). Fresh arrays would cost a page fault every 4 KiB on their first write."""
        todo: deque[tuple[dict, int, Future | np.ndarray | None, np.ndarray]] = deque()
        every = ex._max_workers + 1 if ex is not None else 1
        free: list[np.ndarray] = []  # output arrays back from the consumer

        def buffer(raw: int) -> np.ndarray:
            # the longest unused that holds the chunk first (out of the consumer's cache): chunks of
            # different sizes (a quantized folder's codes) then reuse the arrays that went round
            # rather than page-faulting fresh ones in
            k = next((k for k, b in enumerate(free) if len(b) >= raw), None)
            if k is not None:
                return free.pop(k)
            if free:
                free.pop(0)  # none holds it: the oldest goes (the list stays as long as the pipeline)
            return np.empty(raw, np.uint8)

        def job(s: dict, i: int, buf: np.ndarray) -> np.ndarray:
            c = s["chunks"][i]
            return self._decode(f, s, i, self._read(c[0], c[1]), buf[: c[2]])

        def emit() -> Iterator[np.ndarray]:
            s, i, r, buf = todo.popleft()
            self._release_before(s["chunks"][i][0])
            out = r.result() if isinstance(r, Future) else job(s, i, buf) if r is None else r
            yield out
            free.append(buf)  # the consumer asked for the next chunk: done with this one

        mine = total = 0  # work given to the caller / to all, in bytes plus a per-chunk cost
        for s in segs:
            for i in range(len(s["chunks"])):
                raw = s["chunks"][i][2]
                buf = buffer(raw)
                cost = raw + CHUNK_COST
                total += cost
                if ex is None or raw < INLINE_BYTES:
                    r: Future | np.ndarray | None = job(s, i, buf)  # no pool, or small: at once
                    mine += cost
                elif mine * every < total:  # the caller is below its share: its own, decoded when yielded
                    r = None
                    mine += cost
                else:
                    r = ex.submit(job, s, i, buf)
                todo.append((s, i, r, buf))
                while len(todo) > ahead:
                    yield from emit()
        while todo:
            yield from emit()

    def iter_segment(self, f: dict, s: dict, ex: ThreadPoolExecutor | None = None, ahead: int = 4) -> Iterator[np.ndarray]:
        """Decoded chunks of one segment, in order."""
        return self.iter_chunks(f, [s], ex, ahead)

    def tensors(self) -> Iterator[tuple[dict, dict]]:
        for f in self.index["files"]:
            for s in f["segments"]:
                if s["kind"] == "tensor":
                    yield f, s

    def tensor(self, name: str, ex: ThreadPoolExecutor | None = None) -> torch.Tensor:
        """Decode one tensor (only its chunks are read)."""
        for f, s in self.tensors():
            if s["name"] == name:
                buf = bytearray(s["length"])
                dst = np.frombuffer(buf, np.uint8) if buf else None
                pos = 0
                for part in self.iter_segment(f, s, ex):
                    dst[pos : pos + len(part)] = part
                    pos += len(part)
                return _to_torch(buf, s["dtype"], s["shape"])
        raise NotFoundError(f"{self.path}: no tensor {name!r}")

    def file_chunks(self, f: dict, ex: ThreadPoolExecutor | None = None, ahead: int = 4) -> Iterator[np.ndarray | bytes]:
        """A stored file's bytes in order, a piece at a time: its chunks decoded (each valid until
        the next is asked for), or the base model's file where it is one."""
        if f.get("base"):
            self.require_base()
            return self.base.file_chunks(f["path"])  # type: ignore[union-attr]
        return self.iter_chunks(f, f["segments"], ex, ahead)

    def file_bytes(self, rel: str) -> bytes:
        for f in self.index["files"]:
            if f["path"] == rel:
                return b"".join(bytes(p) for p in self.file_chunks(f))
        raise NotFoundError(f"{self.path}: no file {rel!r}")


_scratch = threading.local()


class _Where:
    """Where in the index a check is: the file and segment, as an error message names them."""

    __slots__ = ("path", "f", "s")

    def __init__(self, path: Path, f: dict, s: dict):
        self.path, self.f, self.s = path, f, s

    def __str__(self) -> str:
        s = self.s
        return f"{self.path}: file {self.f['path']}, " + (f"tensor {s['name']!r}" if s["kind"] == "tensor" else f"bytes at {s['offset']}")


def _zero_scratch(m: int) -> np.ndarray:
    """This thread's array for a chunk's zero points, reused chunk after chunk (no page faults)."""
    a = getattr(_scratch, "zeros", None)
    if a is None or len(a) < m:
        a = _scratch.zeros = np.empty(m, np.uint8)
    return a


# safetensors dtype name -> torch dtype attribute
_TORCH = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
          "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def _to_torch(buf: bytearray, dtype: str, shape: list[int]) -> torch.Tensor:
    import torch  # here, not at the top: only open_tensor and load return tensors

    dt = getattr(torch, _TORCH[dtype])
    if not buf:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(buf, dtype=dt).reshape(shape)


