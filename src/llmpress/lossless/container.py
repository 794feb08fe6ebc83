"""The lossless verbs: ``pack``, ``unpack``, ``verify``, ``open_tensor`` and the ``.llmp`` loader.

The container format is specified in docs/FORMAT.md (summary in reader.py). Packing and unpacking stream chunk by chunk
through a thread pool with a bounded queue, so peak memory is a few chunks per thread plus,
for ``load`` and ``open_tensor``, the tensors being returned.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import zstandard

from ..errors import InputError
from .base import BaseModel
from ..io.atomic import atomic_dir, atomic_file, check_output
from ..loading import register_loader
from .chunk import POLICIES, encode_chunk_parts
from .gguf import is_gguf
from .delta import MODES, can_delta, encode_delta_parts
from .grid import Grid, detect_segment
from .reader import (
    CHUNK_BYTES,
    END,
    FOOTER,
    MAGIC,
    MAX_CHUNK_BYTES,
    CODES_VERSION,
    GGUF_VERSION,
    DELTA_VERSION,
    GRID_VERSION,
    VERSION,
    ZEROS_VERSION,
    CorruptError,
    Packed,
    chunk_sum,
    crc32,
)
from .fields import CODES
from .quantized import quantized_of
from .segments import Segment, chunks_of, plan_file
from .zeros import ZeroRef, chunk_zeros, zero_table

if TYPE_CHECKING:  # pack/unpack/verify never import torch (tests/test_lossless_startup.py)
    import torch

log = logging.getLogger(__name__)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ------------------------------------------------------------------------------- pack


def _input_files(src: Any) -> tuple[Path, list[Path], str]:
    """(root, files, root kind) of a model source; a GGUF file is packed as itself (its blocks
    coded by field), not as the folder ``resolve`` would dequantize it into."""
    from ..models import resolve

    p = Path(src)
    if p.is_file() and is_gguf(p):
        return p.parent, [p], "file"
    s = resolve(src)
    if s.path.is_file():
        return s.path.parent, [s.path], "file"
    files = sorted(p for p in s.path.rglob("*") if p.is_file() and not p.name.startswith(".llmp"))
    return s.path, files, "folder"


def _chunks_of(seg: Segment, chunk_bytes: int) -> list[tuple[int, int]]:
    return chunks_of(seg, chunk_bytes, MAX_CHUNK_BYTES)


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
    threads: int | None = None,
    policy: str = "rans",
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    address: str | None = None,
    grids: bool = True,
    base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Pack a model source (see :func:`llmpress.models.resolve`) into one ``.llmp`` file.

    ``progress(n)`` is called with the number of input bytes done after each chunk (after each
    batch of chunks on Ray). ``workers`` > 1 or an ``address`` codes each input file in a Ray task
    (fanout.py), ``threads`` coders per task; the file is byte for byte the one a single process
    writes. Returns ``bytes_in``, ``bytes_out``, ``ratio``, ``seconds``, ``bound_bytes`` and, under
    ``tensors``, ``{name: {"file", "bytes", "packed", "bound_bits"}}`` for every packed tensor
    (name as in its safetensors header; ``packed`` = its chunk payload bytes, so the packed size
    of any subset of tensors is a sum). ``grids``: look for block grids in float32 tensors
    (grid.py; a file with one is format 3); False: every float tensor takes the float path.
    A GGUF file (or one in a folder) is packed as itself: its tensors of ggml blocks coded by
    field (gguf.py; a file with one is format 5), restored byte for byte.
    ``base``: a base model the receiver has (a folder, ``.safetensors`` or ``.llmp`` file): each
    float tensor with a counterpart of the same name, dtype and shape there is coded against it
    (delta.py), each other file identical to the base's file of the same path is stored as a
    reference to it (format 4); unpacking then needs that base, checked by sha256.
    """
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise InputError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
    if workers < 1:
        raise InputError("workers must be at least 1")
    root, files, root_kind = _input_files(src)
    out = Path(out)
    check_output(out, force)
    base_path = str(Path(base).expanduser().resolve()) if base is not None else None
    t0 = time.perf_counter()
    fan = workers > 1 or address is not None
    threads = threads or (max(1, min(4, (os.cpu_count() or 1) // workers)) if fan else default_threads())
    found = quantized_of(root) if root_kind == "folder" else {}
    version = VERSION  # the lowest that describes the file: known once every file is coded
    index: dict[str, Any] = {"format": "llmpress.lossless", "version": version, "root": root_kind,
                             "chunk_bytes": chunk_bytes, "policy": policy, "files": []}
    tensors: dict[str, dict[str, Any]] = {}
    job = FileJob(threads, policy, chunk_bytes, tuple(sorted((k, v.bits) for k, v in found.items())), grids,
                  tuple(sorted((k, v.zero) for k, v in found.items() if v.zero is not None)), base_path)
    with contextlib.ExitStack() as stack:
        bm = stack.enter_context(_opened_base(base_path)) if base_path else None
        if fan:  # Ray is connected (or refused) before the output exists
            from .fanout import coded_files

            coded = coded_files(stack, files, root, job, workers, address)
        else:
            coded = _coded_here(stack, files, root, job)
        with atomic_file(out, force=force) as tmp, open(tmp, "wb") as fo:
            fo.write(MAGIC + struct.pack("<I", version))
            for record, pieces in coded:
                base = fo.tell()
                for ln, data in pieces:
                    fo.write(data)
                    if progress and ln:
                        progress(ln)
                frec = record()  # complete once its pieces are written
                _rebase(frec, base)
                for srec in frec["segments"]:
                    if srec["kind"] == "tensor":
                        tensors[srec["name"]] = {"file": frec["path"], **srec.get("stats", {})}
                index["files"].append(frec)
            if any("base" in frec or any("base" in srec for srec in frec["segments"]) for frec in index["files"]):
                assert bm is not None
                index["base"] = {"name": bm.path.name, "kind": bm.kind}
            elif bm is not None:
                log.warning("%s: no tensor or file matched the base model %s (same name, dtype and shape): "
                            "packed without it", src, bm.path)
            version = index["version"] = format_version(index)
            if version != VERSION:
                end = fo.tell()
                fo.seek(len(MAGIC))
                fo.write(struct.pack("<I", version))
                fo.seek(end)
            blob = zstandard.ZstdCompressor(level=9).compress(json.dumps(index, separators=(",", ":")).encode())
            off = fo.tell()
            fo.write(blob)
            fo.write(FOOTER.pack(off, len(blob), crc32(blob), END))
    bytes_in = sum(f["size"] for f in index["files"])
    bytes_out = out.stat().st_size
    bound = sum(s.get("bound_bits", 0) for s in tensors.values()) / 8
    return {"bytes_in": bytes_in, "bytes_out": bytes_out, "ratio": bytes_out / max(bytes_in, 1),
            "seconds": time.perf_counter() - t0, "files": len(index["files"]), "tensors_packed": len(tensors),
            "tensor_bytes_in": sum(s.get("bytes", 0) for s in tensors.values()),
            "tensor_bytes_out": sum(s.get("packed", 0) for s in tensors.values()),
            "bound_bytes": bound, "policy": policy, "threads": threads, "workers": workers if fan else 1,
            "out": str(out), "version": version,
            "base": index.get("base"), "base_files": sum(1 for f in index["files"] if f.get("base")),
            "delta_modes": {m: sum(v.get("delta_modes", [0, 0, 0])[i] for v in tensors.values()) for i, m in enumerate(MODES)},
            "tensors": {k: {"file": v["file"], "bytes": int(v.get("bytes", 0)), "packed": int(v.get("packed", 0)),
                            "bound_bits": float(v.get("bound_bits", 0.0)), "delta": "delta_modes" in v,
                            "delta_modes": list(v.get("delta_modes", [0, 0, 0]))} for k, v in tensors.items()}}


def format_version(index: dict[str, Any]) -> int:
    """The lowest version that describes an index (each version reads everything the lower ones
    do): 10 (format 6) where a codes segment has zero points or codes sit in a wider integer dtype
    than U8, 9 (format 5) where a segment holds GGUF blocks, 8 (format 4) where a tensor is coded
    against a base model or a file refers to the base's, 7 (format 3) where a segment has a
    grid, 6 (format 2) where one has codes, else 5 (format 1): an older reader reads what it can."""
    segs = [s for f in index["files"] for s in f["segments"]]
    if any("zero" in s or ("codes" in s and s["dtype"] != "U8") for s in segs):
        return ZEROS_VERSION
    if any("gguf" in s for s in segs):
        return GGUF_VERSION
    if any("base" in f for f in index["files"]) or any("base" in s for s in segs):
        return DELTA_VERSION
    if any("grid" in s for s in segs):
        return GRID_VERSION
    return CODES_VERSION if any("codes" in s for s in segs) else VERSION


# (the file's index record, once its pieces are consumed; its pieces: (input bytes done, payload bytes))
Coded = tuple[Callable[[], dict[str, Any]], Iterator[tuple[int, Any]]]


@dataclass(frozen=True)
class FileJob:
    """How every file of one pack is coded: the same settings in this process or a Ray task."""

    threads: int
    policy: str
    chunk_bytes: int
    codes: tuple[tuple[str, int], ...] = ()  # (tensor name, bits) of the U8 tensors holding bit-packed codes
    grids: bool = True  # look for block grids in float32 tensors (grid.py)
    zeros: tuple[tuple[str, ZeroRef], ...] = ()  # (codes tensor name, where its zero points are)
    base: str | None = None  # the base model's resolved path (base.py): float tensors coded against it


_BASES: dict[str, BaseModel] = {}  # base path -> the base opened in this process (a pack's, or a Ray task's)
_BASES_LOCK = threading.Lock()


def _base_model(path: str) -> BaseModel:
    """The base model at ``path``, opened once per process (its tensor digests kept)."""
    with _BASES_LOCK:
        bm = _BASES.get(path)
        if bm is None:
            bm = _BASES[path] = BaseModel(path)
        return bm


@contextmanager
def _opened_base(path: str) -> Iterator[BaseModel]:
    """The base for one pack, opened before the output is (a bad base is refused first), closed after."""
    bm = _base_model(path)
    try:
        yield bm
    finally:
        with _BASES_LOCK:
            _BASES.pop(path, None)
        bm.close()


def codes_of(root: Path) -> dict[str, int]:
    """{stored tensor name: bits} of a quantized folder's bit-packed codes (quantized.py: an
    llmpress folder's ``qweight``s, a compressed-tensors folder's ``weight_packed``s, below 8
    bits); {} for any other folder, or one whose description does not read (packed as bytes)."""
    return {k: v.bits for k, v in quantized_of(root).items()}


def _coded_here(stack: contextlib.ExitStack, files: list[Path], root: Path, job: FileJob) -> Iterator[Coded]:
    """Every file coded in this process, one after the other, by one set of coder threads."""
    ex = stack.enter_context(_encoders(job.threads))
    hasher = stack.enter_context(ThreadPoolExecutor(1))
    for path in files:
        frec = file_record(path, path.relative_to(root).as_posix())
        yield (lambda frec=frec: frec), code_file(path, frec, job, ex, hasher)


def file_record(path: Path, rel: str) -> dict[str, Any]:
    """A file's index record before coding: its path in the container and its size."""
    return {"path": rel, "size": path.stat().st_size, "segments": []}


def _rebase(frec: dict[str, Any], base: int) -> None:
    """Chunk offsets of one file, recorded from its first payload byte, made offsets in the container."""
    for srec in frec["segments"]:
        for c in srec["chunks"]:
            c[0] += base


def code_file(path: Path, frec: dict[str, Any], job: FileJob, ex: ThreadPoolExecutor | None,
              hasher: ThreadPoolExecutor) -> Iterator[tuple[int, Any]]:
    """Code one file chunk by chunk: yields (input bytes, payload part) in the order they are
    written, and fills ``frec`` (its segments with chunk offsets counted from the file's first
    payload byte, tensor stats, sha256) as it goes; complete when the generator is exhausted.
    The bytes depend on nothing but the file and ``job.policy``/``chunk_bytes``: each chunk is
    coded on its own, whichever thread takes it."""
    threads = job.threads if ex is not None else 1
    bm = _base_model(job.base) if job.base else None
    if bm is not None and _same_as_base(path, frec, bm):
        return
    sha = hashlib.sha256()
    pos = 0
    # (segment record, length, the worker's future or the raw chunk the caller codes itself,
    # the chunk's hash future)
    pending: deque[tuple[dict, int, Future | tuple[np.ndarray, str, int], Future]] = deque()

    def drain(limit: int) -> Iterator[tuple[int, Any]]:
        nonlocal pos
        while len(pending) > limit:
            rec, ln, work, hashed = pending.popleft()
            hashed.result()  # the hash thread keeps up: no queue of raw chunks behind it
            parts, st, crc = work.result() if isinstance(work, Future) else _encode_job(*work, policy=job.policy)
            size = sum(len(b) for b in parts)
            rec["chunks"].append([pos, size, ln, crc])
            pos += size
            _account(rec, st)
            for i, b in enumerate(parts):
                yield (ln if i == 0 else 0), b

    k = 0
    with open(path, "rb") as fi:
        plan = plan_file(path, dict(job.codes))
        tables = _zero_tables(fi, plan, dict(job.zeros), path)
        for seg in plan:
            cuts = _chunks_of(seg, job.chunk_bytes)
            if bm is not None and seg.kind == "tensor" and not seg.codes and can_delta(seg.dtype) \
                    and bm.match(seg.name, seg.dtype, seg.shape):
                seg.base = bm.digest(seg.name)
            elif seg.kind == "tensor" and job.grids:
                seg.grid = detect_segment(fi, seg.offset, seg.dtype, seg.shape, seg.length)
                if seg.grid is not None and any(ln % (4 * seg.grid.block) for _, ln in cuts):
                    seg.grid = None  # chunks of whole blocks only (an odd chunk_bytes)
            table = tables.get(seg.name) if seg.kind == "tensor" else None
            seg.zero = table[0] if table is not None else None
            srec = _segment_record(seg)
            frec["segments"].append(srec)
            fi.seek(seg.offset)
            for co, ln in cuts:
                raw = np.frombuffer(fi.read(ln), np.uint8)
                zeros = None if table is None else chunk_zeros(table[1], table[0], 8 * co // seg.codes,
                                                               CODES[seg.codes].symbols(ln))
                if len(raw) != ln:
                    raise InputError(f"{path}: file shrank while packing")
                # the file's sha256 runs in its own thread (one worker keeps the order;
                # hashlib releases the GIL), beside the coding. The caller codes every
                # threads-th chunk itself when its turn to be written comes (as the
                # decoders do), the workers the others
                mine = ex is None or k % threads == 0
                based = (job.base, seg.name, co) if seg.base else None
                pending.append((srec, ln, (raw, seg.dtype, seg.codes, seg.grid, zeros, seg.gguf, based) if mine else
                                ex.submit(_encode_job, raw, seg.dtype, seg.codes, seg.grid, zeros, seg.gguf, based,
                                          job.policy),
                                hasher.submit(sha.update, raw)))
                k += 1
                yield from drain(2 * threads if ex is not None else 0)
        yield from drain(0)
    for srec in frec["segments"]:
        if srec["kind"] == "tensor":
            _compact(srec["stats"])
    frec["sha256"] = hasher.submit(sha.hexdigest).result()


def _zero_tables(fi: Any, plan: list[Segment], zeros: dict[str, ZeroRef], path: Path) -> dict[str, tuple[ZeroRef, np.ndarray]]:
    """{codes tensor name: (its ZeroRef, the zero points (rows, groups))} of the codes segments
    whose zero points read (zeros.zero_table) from a tensor of the same file; the others are coded
    without them."""
    by_name = {s.name: s for s in plan if s.kind == "tensor"}
    out = {}
    for name, ref in zeros.items():
        seg, zs = by_name.get(name), by_name.get(ref.tensor)
        if seg is None or zs is None or not seg.codes or ref.tensor == name:
            continue
        fi.seek(zs.offset)
        try:
            out[name] = (ref, zero_table(np.frombuffer(fi.read(zs.length), np.uint8), zs.dtype, zs.shape,
                                         ref.packing, seg.codes))
        except ValueError as e:
            log.debug("%s: %s coded without zero points (%s)", path, name, e)
    return out


def _encode_job(raw: np.ndarray, dtype: str, codes: int, grid: Grid | None, zeros: np.ndarray | None,
                gguf: str, based: tuple[str, str, int] | None, policy: str) -> tuple[list, Any, int]:
    """One chunk's payload parts, stats and checksum, all computed by whichever coder (a worker or
    the caller) takes the chunk; ``based``: (base path, tensor name, the chunk's offset in the
    tensor) of a chunk coded against the base, whose bytes this coder reads."""
    if based is not None:
        parts, st = encode_delta_parts(raw, _base_model(based[0]).read(based[1], based[2], len(raw)), dtype, policy)
    else:
        parts, st = encode_chunk_parts(raw, dtype, policy, codes, grid, zeros, gguf)
    return parts, st, chunk_sum(raw)


def _same_as_base(path: Path, frec: dict[str, Any], bm: BaseModel) -> bool:
    """Whether the non-tensor file ``path`` is the base's file of the same path, byte for byte:
    then its record says so (``base``) and nothing of it is stored."""
    rel = frec["path"]
    if path.suffix == ".safetensors" or bm.file_size(rel) != frec["size"]:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as fi:
        while piece := fi.read(16 << 20):
            h.update(piece)
    if h.hexdigest() != bm.file_digest(rel):
        return False
    frec.update(sha256=h.hexdigest(), base=True)
    return True


@contextmanager
def _encoders(threads: int) -> Iterator[ThreadPoolExecutor | None]:
    """The workers that code beside the caller (``threads`` coders in all); None for one."""
    if threads <= 1:
        yield None
        return
    with ThreadPoolExecutor(threads - 1) as ex:
        yield ex


def _segment_record(seg: Segment) -> dict[str, Any]:
    rec: dict[str, Any] = {"kind": seg.kind, "offset": seg.offset, "length": seg.length, "dtype": seg.dtype,
                           "chunks": []}
    if seg.kind == "tensor":
        rec.update(name=seg.name, shape=list(seg.shape), stats={"bytes": seg.length, "packed": 0, "bound_bits": 0.0})
    if seg.codes:
        rec["codes"] = seg.codes
    if seg.grid is not None:
        rec["grid"] = seg.grid.to_index()
    if seg.zero is not None:
        rec["zero"] = seg.zero.to_index()
    if seg.gguf:
        rec["gguf"] = seg.gguf
    if seg.base:
        rec["base"] = seg.base
    return rec


def _compact(stats: dict) -> None:
    """Index bytes count in the ratio: the exponent histogram keeps its nonzero span (from
    ``exp_lo``), the bound a tenth of a bit."""
    stats["bound_bits"] = round(stats["bound_bits"], 1)
    if "field_bits" in stats:
        stats["field_bits"] = {k: round(v, 1) for k, v in stats["field_bits"].items()}
    h = stats.get("exp_hist")
    if h is not None:
        nz = np.flatnonzero(h)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        stats["exp_lo"], stats["exp_hist"] = lo, [int(c) for c in h[lo:hi]]


def _account(rec: dict, st: Any) -> None:
    stats = rec.get("stats")
    if stats is None:
        return
    stats["packed"] += rec["chunks"][-1][1]
    stats["bound_bits"] += st.bound_bits
    if st.field_bits is not None:  # a GGUF tensor's per-field bound bits and packed bytes
        for key, new in (("field_bits", st.field_bits), ("field_bytes", st.field_bytes)):
            acc = stats.setdefault(key, {})
            for k, v in new.items():
                acc[k] = acc.get(k, 0) + v
    if st.delta is not None:  # chunks coded alone / as XOR / as DIFF against the base
        stats.setdefault("delta_modes", [0, 0, 0])[st.delta] += 1
    if st.exp_hist is not None:  # summed as an array; a list (JSON) from _compact
        h = stats.get("exp_hist")
        stats["exp_hist"] = st.exp_hist.astype(np.int64) if h is None else h + st.exp_hist


# ------------------------------------------------------------------------------- unpack / verify


@contextmanager
def _pool(threads: int | None) -> Iterator[ThreadPoolExecutor | None]:
    """The workers that decode beside the caller: ``threads`` decoders in all, the caller being
    one of them (``Packed.iter_chunks``); 0 or 1: the caller alone, no hand-off at all."""
    n = default_threads() if threads is None else threads
    if n <= 1:
        yield None
        return
    with ThreadPoolExecutor(n - 1) as ex:
        yield ex


def _restore(p: Packed, f: dict, sink: Any, ex: ThreadPoolExecutor | None, progress: Callable[[int], None] | None,
             sha256: bool = True) -> None:
    """Decode one stored file into ``sink`` (a binary file or None); every chunk is checked
    against its checksum as it is decoded, and with ``sha256`` the whole file against its sha256."""
    sha = hashlib.sha256() if sha256 else None
    for part in p.file_chunks(f, ex, ahead=4 * (ex._max_workers + 1) if ex else 0):
        if sha is not None:
            sha.update(part)
        if sink is not None:
            sink.write(part)
        if progress:
            progress(len(part))
    if sha is not None and sha.hexdigest() != f["sha256"]:
        raise CorruptError(f"{p.path}: file {f['path']}: sha256 mismatch after decoding")


def unpack(
    packed: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    sha256: bool = True,
    base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Restore every packed file byte for byte under ``out`` (a folder; a file when a single
    file was packed). Every chunk's checksum is verified, and (``sha256``) every file's sha256.
    ``base``: the base model a delta file was packed against (refused, before anything is
    decoded or written, unless every tensor and file it needs has the recorded sha256)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    with Packed(packed) as p, _with_base(p, base), _pool(threads) as ex:
        if p.index["root"] == "file" and len(p.index["files"]) == 1:
            with atomic_file(out, force=force) as tmp, open(tmp, "wb") as fo:
                _restore(p, p.index["files"][0], fo, ex, progress, sha256)
        else:
            with atomic_dir(out, force=force) as tmp:
                for f in p.index["files"]:
                    dst = tmp / f["path"]
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with open(dst, "wb") as fo:
                        _restore(p, f, fo, ex, progress, sha256)
        n = sum(f["size"] for f in p.index["files"])
        return {"bytes_in": p.size, "bytes_out": n, "ratio": p.size / max(n, 1), "files": len(p.index["files"]),
                "seconds": time.perf_counter() - t0, "out": str(out)}


def verify(packed: str | os.PathLike, *, threads: int | None = None,
           progress: Callable[[int], None] | None = None, sha256: bool = True,
           base: str | os.PathLike | None = None) -> dict[str, Any]:
    """Decode everything in memory, chunk by chunk, and check every checksum (each chunk's
    xxh3-64; with ``sha256`` also each file's sha256, a serial pass); raises CorruptError.
    ``base``: as for :func:`unpack`."""
    t0 = time.perf_counter()
    with Packed(packed) as p, _with_base(p, base), _pool(threads) as ex:
        for f in p.index["files"]:
            _restore(p, f, None, ex, progress, sha256)
        n = sum(f["size"] for f in p.index["files"])
        return {"ok": True, "files": len(p.index["files"]), "tensors": sum(1 for _ in p.tensors()),
                "bytes_in": n, "bytes_out": p.size, "ratio": p.size / max(n, 1), "seconds": time.perf_counter() - t0}


@contextmanager
def _with_base(p: Packed, base: str | os.PathLike | None) -> Iterator[BaseModel | None]:
    """``p`` attached to the base model at ``base`` (checked first), or refused where it needs one
    and none is given; a file that needs none ignores ``base``."""
    if not p.needs_base:
        yield None
        return
    if base is None:
        p.require_base()
    with BaseModel(base) as bm:  # type: ignore[arg-type]
        p.attach_base(bm)
        try:
            yield bm
        finally:
            p.base = None


def open_tensor(packed: str | os.PathLike, name: str, base: str | os.PathLike | None = None) -> torch.Tensor:
    """One tensor of a ``.llmp`` file, without decoding the rest (``base``: as for :func:`unpack`)."""
    with Packed(packed) as p, _with_base(p, base):
        return p.tensor(name)


# ------------------------------------------------------------------------------- load


def _is_packed(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == MAGIC


@register_loader("llmp", _is_packed)
def load_packed(path: str | os.PathLike, dtype: torch.dtype | None = None, threads: int | None = None,
                base: str | os.PathLike | None = None, **_: Any) -> torch.nn.Module:
    """Build the transformers model of a ``.llmp`` file in memory (no temporary files): the
    stored config.json gives the architecture, the decoded tensors its state dict."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    with Packed(path) as p, _with_base(p, base), _pool(threads) as ex:
        names = [f["path"] for f in p.index["files"]]
        cfg_name = next((n for n in names if n == "config.json"), None) or next((n for n in names if n.endswith("/config.json")), None)
        if cfg_name is None:
            raise CorruptError(f"{p.path}: no config.json was packed; cannot build a model (use unpack)")
        cfg = json.loads(p.file_bytes(cfg_name))
        config = AutoConfig.for_model(**cfg)
        state = {s["name"]: p.tensor(s["name"], ex) for _, s in p.tensors()}
    archs = cfg.get("architectures") or []
    cls = AutoModelForCausalLM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else AutoModel
    model = cls.from_config(config)
    if dtype is not None:
        model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied:
        log.warning("%s: tensors missing from the state dict: %s", path, sorted(set(missing) - tied)[:8])
    if unexpected:
        log.warning("%s: tensors not used by %s: %s", path, cls.__name__, sorted(unexpected)[:8])
    model.tie_weights()
    return model.eval()
