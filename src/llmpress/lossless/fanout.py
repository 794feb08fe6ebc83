"""``pack`` on Ray: one task per input file, the container assembled by the driver in file order.

Each task codes its file exactly as the one-process ``pack`` does (``container.code_file``, the
same settings) and streams it back as a Ray generator: payload batches of ``BATCH_BYTES``, then
the file's index record (chunk offsets counted from its first payload byte). The driver takes the
files in their sorted order, writes each batch to the output as it arrives, and shifts the
record's offsets to where the file landed, so the container, index included, is byte for byte
the one-process one. Besides the file being written, ``workers`` more are submitted (a local
cluster runs ``workers`` at a time); a finished file's batches wait in Ray's object store
(``STORE_BYTES`` on a local cluster, spilled to disk past it) until their turn, so the driver
holds one batch at a time and the store a bounded amount, never the model. On a cluster (``--address``) every node must see the input
files at the same path (a shared filesystem); a node that does not is named in the error, and so
is a node whose coding libraries differ from the driver's (zstd's output depends on its version):
the same bytes or an error, never a silently different file.
"""
from __future__ import annotations

import contextlib
import socket
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import MissingInputError
from ..cluster import ClusterError, ray_cluster
from .container import Coded, FileJob, _encoders, code_file, file_record

BATCH_BYTES = 16 << 20  # payload bytes per object a task yields: few objects, bounded memory
STORE_BYTES = 1 << 30  # a local cluster's object store: batches waiting beyond it spill to disk


def coder_versions() -> dict[str, str]:
    """The versions of what the coded bytes depend on besides llmpress (shipped with the job)."""
    from importlib.metadata import version

    import numba
    import zstandard

    return {"zstd": ".".join(map(str, zstandard.ZSTD_VERSION)), "constriction": version("constriction"),
            "numba": numba.__version__, "numpy": np.__version__}


def _code_remote(path: str, rel: str, job: FileJob, batch_bytes: int, versions: dict[str, str]) -> Iterator[Any]:
    """The Ray task: (input bytes, payload batch) items, then the file's index record."""
    here = coder_versions()
    if here != versions:
        diff = ", ".join(f"{k} {here.get(k)} (driver: {v})" for k, v in versions.items() if here.get(k) != v)
        raise ClusterError(f"Ray node {socket.gethostname()} codes with other library versions than the driver: "
                           f"{diff}; its bytes could differ from one process's")
    src = Path(path)
    if not src.is_file():
        raise MissingInputError(f"{path}: not found on Ray node {socket.gethostname()} (packing on a cluster "
                                "needs the checkpoint on a filesystem every node mounts at the same path)")
    frec = file_record(src, rel)
    batch, done = bytearray(), 0
    with _encoders(job.threads) as ex, ThreadPoolExecutor(1) as hasher:
        for ln, part in code_file(src, frec, job, ex, hasher):
            batch += part
            done += ln
            if len(batch) >= batch_bytes:
                yield done, np.frombuffer(batch, np.uint8)
                batch, done = bytearray(), 0
    if batch:
        yield done, np.frombuffer(batch, np.uint8)
    yield frec


def coded_files(stack: contextlib.ExitStack, files: list[Path], root: Path, job: FileJob, workers: int,
                address: str | None) -> Iterator[Coded]:
    """Every file coded by a Ray task, in ``files``' order. Ray is connected (or refused, with
    ``ClusterError``) here, before the caller opens its output; it stays up while ``stack`` does."""
    cluster = stack.enter_context(ray_cluster(workers, address, what="pack --workers", object_store_bytes=STORE_BYTES))
    task = cluster.remote(_code_remote)
    return _in_order(cluster.ray, task, files, root, job, workers)


def _in_order(ray: Any, task: Any, files: list[Path], root: Path, job: FileJob, workers: int) -> Iterator[Coded]:
    todo = deque(files)
    batch_bytes = BATCH_BYTES  # read here, in the driver: a setting of this process, not the node's
    versions = coder_versions()
    inflight: deque[tuple[Path, Any]] = deque()

    def submit() -> None:
        while todo and len(inflight) < workers:
            path = todo.popleft()
            inflight.append((path, task.remote(str(path.resolve()), path.relative_to(root).as_posix(), job,
                                                   batch_bytes, versions)))

    submit()
    while inflight:
        path, gen = inflight.popleft()
        submit()  # the next file starts while this one's batches are written
        got: dict[str, Any] = {}
        yield (lambda got=got: got["frec"]), _pieces(ray, gen, path, got)


def _pieces(ray: Any, gen: Any, path: Path, got: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    for ref in gen:
        try:
            item = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the task's own error (a bad header...), as one process raises it
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from None
        del ref
        if isinstance(item, dict):
            got["frec"] = item
        else:
            yield item
    if "frec" not in got:
        raise ClusterError(f"{path}: the Ray task ended without its index record")
    if got["frec"]["size"] != path.stat().st_size:
        raise ClusterError(f"{path}: the Ray node read {got['frec']['size']} bytes, this machine sees {path.stat().st_size}")
