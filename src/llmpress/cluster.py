"""Ray start-up, shared by everything that fans out (the sweep's points, ``pack``'s shards).

``ray_cluster(workers, address)`` connects to an existing cluster (``address``) or starts a local
one with ``workers`` CPUs, and shuts down on exit only what it started (a session the caller
already opened is used as it is). A session it opens has a runtime environment (Ray's job-level
one: a local folder can be shipped only there) that makes every worker import llmpress from the
driver's own source: on a local cluster the source folder is put first on their ``PYTHONPATH`` (so
numba's compiled-function caches are shared too), on an existing cluster the package is shipped with
the job (``py_modules``), so the nodes need its dependencies, not llmpress itself. A missing Ray or an address where nothing answers is refused
with ``ClusterError`` before anything starts, so a caller can check before it writes any output.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from .errors import ResourceLimitError

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0  # a cluster's head answers a TCP connect at once; ray.init itself retries for a minute
_NO_PROBE = ("auto", "local")  # addresses Ray resolves itself (auto: the cluster started on this machine)


class ClusterError(ResourceLimitError):
    """Ray is not installed, or no cluster answers at the address given."""


def _package_dir() -> Path:
    return Path(__file__).resolve().parent  # .../llmpress


def runtime_env(remote_cluster: bool) -> dict[str, Any]:
    """The session's runtime environment: llmpress imported from the driver's source."""
    if remote_cluster:
        return {"py_modules": [str(_package_dir())]}
    paths = [str(_package_dir().parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def import_ray(what: str) -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ClusterError(f"{what} needs Ray: pip install 'llmpress[ray]' (or use one worker)") from None
    return ray


def probe(address: str) -> None:
    """Refuse an address where nothing listens (``host:port``, ``ray://host:port``) within seconds."""
    if address in _NO_PROBE:
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS):
            pass
    except OSError as e:
        raise ClusterError(f"no Ray cluster answers at {address}: {e}") from None


@dataclass
class Cluster:
    """A connected Ray: ``remote(fn)`` makes a task of ``fn`` (one CPU unless told)."""

    ray: ModuleType

    def remote(self, fn: Callable, **options: Any) -> Any:
        options.setdefault("num_cpus", 1)
        return self.ray.remote(fn).options(**options)


@contextlib.contextmanager
def ray_cluster(workers: int, address: str | None = None, *, what: str = "parallel work",
                object_store_bytes: int | None = None) -> Iterator[Cluster]:
    """Ray connected to ``address`` or started here with ``workers`` CPUs (and, if given, an object
    store of ``object_store_bytes``: Ray spills what does not fit to disk); see the module doc."""
    ray = import_ray(what)
    if address:
        probe(address)
    started = False
    if not ray.is_initialized():
        # "local": a new cluster even where one started by `ray start` is running (ray.init() would join it)
        kwargs: dict[str, Any] = {"address": address} if address else {"address": "local", "num_cpus": max(1, workers)}
        if object_store_bytes and not address:
            kwargs["object_store_memory"] = object_store_bytes
        try:
            ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env(bool(address)), **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"Ray did not start{f' at {address}' if address else ''}: {e}") from None
        started = True
        log.info("ray: %s", "connected to " + address if address else f"started locally with {workers} CPUs")
    try:
        yield Cluster(ray)
    finally:
        if started:
            ray.shutdown()
