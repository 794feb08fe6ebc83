"""A base model that deltas are coded against: its tensors read by name, a range at a time.

The base is a folder (its ``.safetensors`` files and every other file), one ``.safetensors``
file, or a ``.llmp`` file (decoded in memory, chunk by chunk: a range decodes only the chunks
that hold it). Reads are thread-safe (memory maps; a ``.llmp`` chunk decodes into a fresh array
in the reading thread), so the coders and decoders each read the base range of the chunk they
hold, and memory stays a chunk per thread. Nothing is loaded whole.

A base's identity is the sha256 of each tensor's bytes (:meth:`BaseModel.digest`, one streamed
pass per tensor, kept) and of each other file's bytes (:meth:`BaseModel.file_digest`).
"""
from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import BaseModelError, InputError, MissingInputError

HASH_BYTES = 16 << 20  # a tensor or file is hashed this many bytes at a time


@dataclass(frozen=True)
class BaseTensor:
    dtype: str
    shape: tuple[int, ...]
    length: int
    where: Any  # a file base: (file index, offset); an .llmp base: (file record, segment record)


class BaseModel:
    """A base checkpoint opened for reading (``with BaseModel(path) as b``)."""

    def __init__(self, src: str | os.PathLike):
        from .reader import MAGIC, Packed
        from .segments import plan_file

        self.path = Path(src).expanduser()
        if not self.path.exists():
            raise MissingInputError(f"{self.path}: base model not found")
        self.tensors: dict[str, BaseTensor] = {}
        self.files: dict[str, Any] = {}  # relative path -> Path (a folder) or file record (.llmp)
        self._maps: list[tuple[Any, mmap.mmap | None]] = []
        self._packed: Packed | None = None
        self._digests: dict[str, str] = {}
        self._lock = threading.Lock()
        self._starts: dict[int, list[int]] = {}  # id(segment) -> each chunk's offset in the tensor
        if self.path.is_file():
            with open(self.path, "rb") as f:
                head = f.read(len(MAGIC))
        if self.path.is_file() and head == MAGIC:
            self.kind = "llmp"
            self._packed = p = Packed(self.path)
            if "base" in p.index:
                p.close()
                raise InputError(f"{self.path}: this .llmp file is itself coded against a base model; "
                                 "unpack it first and give the result as the base")
            for f in p.index["files"]:
                if not f["path"].endswith(".safetensors"):
                    self.files[f["path"]] = f
                for s in f["segments"]:
                    if s["kind"] == "tensor":
                        self.tensors.setdefault(s["name"], BaseTensor(s["dtype"], tuple(s["shape"]), s["length"], (f, s)))
            return
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise InputError(f"{self.path}: a base model is a folder, a .safetensors file or a .llmp file")
            self.kind, paths, root = "safetensors", [self.path], self.path.parent
        else:
            self.kind, root = "folder", self.path
            paths = sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith(".llmp"))
        for path in paths:
            rel = path.relative_to(root).as_posix()
            if path.suffix != ".safetensors":
                self.files[rel] = path
                continue
            fh = open(path, "rb")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None
            k = len(self._maps)
            self._maps.append((fh, mm))
            for seg in plan_file(path):
                if seg.kind == "tensor":
                    self.tensors.setdefault(seg.name, BaseTensor(seg.dtype, seg.shape, seg.length, (k, seg.offset)))

    def close(self) -> None:
        for fh, mm in self._maps:
            if mm is not None:
                mm.close()
            fh.close()
        self._maps = []
        if self._packed is not None:
            self._packed.close()

    def __enter__(self) -> "BaseModel":
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()

    def describe(self) -> str:
        return f"{self.path.name} ({self.kind}, {len(self.tensors)} tensors)"

    def match(self, name: str, dtype: str, shape: tuple[int, ...] | list[int]) -> bool:
        """Whether the base has a tensor ``name`` of this dtype and shape."""
        t = self.tensors.get(name)
        return t is not None and t.dtype == dtype and t.shape == tuple(shape)

    # -- reading

    def read(self, name: str, offset: int, length: int) -> np.ndarray:
        """Bytes [offset, offset + length) of tensor ``name``: (length,) uint8, read-only."""
        t = self.tensors[name]
        if not 0 <= offset <= offset + length <= t.length:
            raise InputError(f"{self.path}: tensor {name!r}: bytes {offset}..{offset + length} outside its {t.length}")
        if self._packed is None:
            k, start = t.where
            mm = self._maps[k][1]
            if mm is None or not length:
                return np.zeros(0, np.uint8)
            out = np.frombuffer(mm, np.uint8, length, start + offset)
            # a header whose length is not a multiple of 8 leaves the words unaligned: the
            # compiled kernels take aligned words only (else numba's slower generic path)
            return out if out.ctypes.data % 8 == 0 else out.copy()
        return self._read_packed(t, offset, length)

    def _read_packed(self, t: BaseTensor, offset: int, length: int) -> np.ndarray:
        f, s = t.where
        p = self._packed
        starts = self._starts.get(id(s))
        if starts is None:
            starts, pos = [], 0
            for c in s["chunks"]:
                starts.append(pos)
                pos += c[2]
            self._starts[id(s)] = starts
        i = bisect.bisect_right(starts, offset) - 1
        parts, end = [], offset + length
        while length and i < len(starts) and starts[i] < end:
            o, ln, raw, _ = s["chunks"][i]
            dec = p._decode(f, s, i, p._read(o, ln), np.empty(raw, np.uint8))
            a, z = max(offset, starts[i]) - starts[i], min(end, starts[i] + raw) - starts[i]
            parts.append(dec if (a, z) == (0, raw) else dec[a:z])
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """Tensor ``name``'s bytes in order, a piece at a time."""
        t = self.tensors[name]
        if self._packed is not None:
            f, s = t.where
            yield from self._packed.iter_segment(f, s)
            return
        for o in range(0, t.length, HASH_BYTES):
            yield self.read(name, o, min(HASH_BYTES, t.length - o))

    def digest(self, name: str) -> str:
        """sha256 of tensor ``name``'s bytes (computed once)."""
        with self._lock:
            d = self._digests.get(name)
            if d is None:
                h = hashlib.sha256()
                for part in self.chunks(name):
                    h.update(part)
                d = self._digests[name] = h.hexdigest()
        return d

    def file_chunks(self, rel: str) -> Iterator[np.ndarray | bytes]:
        """The bytes of the base's non-tensor file ``rel``, a piece at a time."""
        src = self.files[rel]
        if isinstance(src, Path):
            with open(src, "rb") as fi:
                while piece := fi.read(HASH_BYTES):
                    yield piece
            return
        assert self._packed is not None
        yield from self._packed.iter_chunks(src, src["segments"])

    def file_digest(self, rel: str) -> str | None:
        """sha256 of the base's file ``rel`` (None: the base has no such file)."""
        src = self.files.get(rel)
        if src is None:
            return None
        if not isinstance(src, Path):
            return src["sha256"]  # checked against the bytes whenever they are decoded
        h = hashlib.sha256()
        for piece in self.file_chunks(rel):
            h.update(piece)
        return h.hexdigest()

    def file_size(self, rel: str) -> int | None:
        src = self.files.get(rel)
        if src is None:
            return None
        return src.stat().st_size if isinstance(src, Path) else src["size"]

    # -- identity

    def check(self, index: dict, where: str) -> None:
        """Refuse this base for the ``.llmp`` index ``index`` (of the file ``where``) unless every
        tensor and file it was coded against is here with the recorded sha256; nothing is
        decoded before this returns."""
        for f in index["files"]:
            if f.get("base"):
                got = self.file_digest(f["path"])
                if got != f["sha256"]:
                    what = "has no such file" if got is None else "holds different bytes"
                    raise BaseModelError(f"{where}: file {f['path']!r} is the base model's, and the base given "
                                         f"({self.path}) {what}: not the base this file was packed against")
            for s in f["segments"]:
                if "base" not in s:
                    continue
                t = self.tensors.get(s["name"])
                if t is None or (t.dtype, list(t.shape)) != (s["dtype"], list(s["shape"])):
                    have = "has no such tensor" if t is None else f"holds it as {t.dtype} {list(t.shape)}"
                    raise BaseModelError(f"{where}: tensor {s['name']!r} ({s['dtype']} {s['shape']}) was coded against "
                                         f"the base model, and the base given ({self.path}) {have}")
                if self.digest(s["name"]) != s["base"]:
                    raise BaseModelError(f"{where}: tensor {s['name']!r} of the base given ({self.path}) differs from "
                                         "the one this file was packed against (sha256 mismatch): wrong base model")
