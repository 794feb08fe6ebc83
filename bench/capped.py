"""Run a command as a fresh child process under a memory cap; measure its wall time and peak RSS.

Caps are a registry, tried in order by ``auto``:

- ``cgroup2``: a child cgroup with ``memory.max`` where the unified hierarchy is writable and
  delegates the memory controller;
- ``cgroup1``: a child of this process's own v1 memory cgroup with ``memory.limit_in_bytes``
  (nested, so every limit above still applies); removed afterwards;
- ``rlimit-data``: ``RLIMIT_DATA`` (private writable mappings: heap and anonymous mmaps) set in
  the child before exec. ``RLIMIT_AS`` counts address space that is only reserved (numba's and
  torch's allocators reserve several GiB at start-up), so at 6 GiB it kills a start-up that has
  a few hundred MiB resident; ``rlimit-as`` is offered but not chosen by ``auto``.

Peak RSS is the child's ``ru_maxrss`` from ``wait4`` (this child alone, KiB on Linux).
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

GiB = 1 << 30


@dataclass
class Result:
    argv: list[str]
    rc: int
    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str
    cap: str
    extra: dict = field(default_factory=dict)


class _Cap:
    """A way to bound a child's memory: ``usable()``, then ``preexec`` (in the child) and ``cleanup``."""

    name = ""

    def __init__(self, limit: int):
        self.limit = limit

    def usable(self) -> bool:
        return True

    def preexec(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


class _CgroupCap(_Cap):
    """A child cgroup of this process's own, made by ``usable`` with its limit file written."""

    limit_file = ""

    def _make(self, own: Path, optional: dict[str, str] | None = None) -> bool:
        """The child cgroup with its limit (and each ``optional`` file that exists) written."""
        try:
            self.dir = own / f"llmpress-bench-{os.getpid()}"
            self.dir.mkdir()
            (self.dir / self.limit_file).write_text(str(self.limit))
            for name, value in (optional or {}).items():
                if (self.dir / name).exists():
                    (self.dir / name).write_text(value)
            return True
        except OSError:
            self.cleanup()
            return False

    def preexec(self) -> None:
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def cleanup(self) -> None:
        d = getattr(self, "dir", None)
        if d is None or not d.exists():
            return
        for _ in range(50):  # the child's exit is accounted asynchronously
            try:
                d.rmdir()
                return
            except OSError:
                time.sleep(0.1)


class _Cgroup2(_CgroupCap):
    name = "cgroup2"
    root = Path("/sys/fs/cgroup")
    limit_file = "memory.max"

    def _own(self) -> Path | None:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                base = self.root if (self.root / "cgroup.controllers").exists() else self.root / "unified"
                return base / line[3:].lstrip("/")
        return None

    def usable(self) -> bool:
        own = self._own()
        if own is None or not (own / "cgroup.subtree_control").exists():
            return False
        if "memory" not in (own / "cgroup.controllers").read_text().split():
            return False
        return self._make(own, {"memory.swap.max": "0"})


class _Cgroup1(_CgroupCap):
    name = "cgroup1"
    root = Path("/sys/fs/cgroup/memory")
    limit_file = "memory.limit_in_bytes"

    def usable(self) -> bool:
        own = None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctl, path = line.split(":", 2)
            if "memory" in ctl.split(","):
                own = self.root / path.lstrip("/")
        if own is None or not (own / "memory.limit_in_bytes").exists():
            return False
        return self._make(own)


class _RlimitData(_Cap):
    name = "rlimit-data"

    def preexec(self) -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (self.limit, self.limit))


class _RlimitAS(_Cap):
    name = "rlimit-as"

    def preexec(self) -> None:
        resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))


class _NoCap(_Cap):
    name = "none"


CAPS: dict[str, type[_Cap]] = {c.name: c for c in (_Cgroup2, _Cgroup1, _RlimitData, _RlimitAS, _NoCap)}
AUTO_ORDER = ("cgroup2", "cgroup1", "rlimit-data")


def make_cap(kind: str, limit: int) -> _Cap:
    """The cap named ``kind`` (or the first usable of AUTO_ORDER for ``auto``), set up."""
    names = AUTO_ORDER if kind == "auto" else (kind,)
    for n in names:
        if n not in CAPS:
            raise ValueError(f"unknown cap {n!r}; known: auto, {', '.join(CAPS)}")
        cap = CAPS[n](limit)
        if cap.usable():
            return cap
    raise RuntimeError(f"no usable memory cap among {names}")


def run(argv: list[str], cap: _Cap, env: dict[str, str] | None = None, cwd: Path | None = None,
        on_start: Callable[[subprocess.Popen], None] | None = None) -> Result:
    """Run ``argv`` under ``cap``; stdout and stderr captured. A KeyboardInterrupt kills the child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                            preexec_fn=cap.preexec, text=True, start_new_session=True)
    if on_start:
        on_start(proc)
    try:
        out, err = _communicate(proc)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    secs = time.perf_counter() - t0
    rss = proc._llmp_rusage.ru_maxrss * 1024  # type: ignore[attr-defined]
    return Result(argv, proc.returncode, secs, rss, out, err, cap.name)


def _communicate(proc: subprocess.Popen) -> tuple[str, str]:
    """Read both pipes to the end (threads), then reap the child with wait4 for its own rusage."""
    import threading

    bufs: dict[str, list[str]] = {"out": [], "err": []}

    def pump(stream, key: str) -> None:
        for line in stream:
            bufs[key].append(line)

    ts = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
          threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in ts:
        t.start()
    _, status, ru = os.wait4(proc.pid, 0)
    for t in ts:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc._llmp_rusage = ru  # type: ignore[attr-defined]
    return "".join(bufs["out"]), "".join(bufs["err"])
