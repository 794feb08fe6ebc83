"""Start-up as a user sees it: whole fresh processes of ``llmpress pack/unpack/verify`` against
ZipNN's equivalents on all-MiniLM-L6-v2 cast to BF16 (the file bench/lossless.py builds).

    .venv/bin/python bench/startup.py [--reps 5] [--baseline /path/to/other/src] [--cold]

Each rep runs every (operation, tool) pair once as a new process, the tools' order rotated
from rep to rep (alternating, so load on a shared machine falls on all of them alike); a row is
the median wall time (process start to exit) over the reps. llmpress runs as its console
script does (``llmpress.cli.main``) with this checkout's ``src`` first on the path;
``--baseline DIR`` adds the same commands with another source tree (e.g. main's ``src``), so
a before/after ratio comes from the same run. ZipNN (its own venv, bench/.venvs/zipnn, made by
bench/lossless.py; ``--zipnn-python`` to use another) runs what its file scripts do: read the
file, compress or decompress it (``bytearray_dtype="bfloat16"``, the same threads as llmpress),
write the result; its "verify" decompresses in memory and checks the sha256, as llmpress's does.

``--files BF16,GGUF-Q4_1,GGUF-Q4_K_M`` adds ``llmpress unpack`` alone on each of those inputs
(bench/lossless.py's: the BF16 file, the packaged GGUF and llmpress's Q4_K_M export), each packed
once with the default policy, then unpacked in fresh processes alternating over the files: the
median, the output's MB/s, and the seconds per output MB against the first file's.

``--cold`` adds what a fresh installation pays once: ``llmpress warmup`` building the AOT kernels
into an empty cache, and ``unpack`` with no AOT build and an empty numba cache (numba compiles at
first use), then with no AOT build and numba's cache warm.

Results: a table on stdout and bench/out/startup.json (command, commit, date, load, raw times).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import commit  # bench/ is the script's folder: first on sys.path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

CLI = "import sys; from llmpress.cli import main; sys.argv[0] = 'llmpress'; main()"
ZIPNN = r"""
import hashlib, sys, zipnn
op, src, dst, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=threads)
data = bytearray(open(src, "rb").read())
if op == "pack":
    out = bytes(z.compress(data))
else:
    out = bytes(z.decompress(data))
if op == "verify":
    assert hashlib.sha256(out).hexdigest() == open(dst).read().strip(), "zipnn: sha256 mismatch"
else:
    with open(dst + ".tmp", "wb") as f:
        f.write(out)
    import os; os.replace(dst + ".tmp", dst)
"""
OPS = ("pack", "unpack", "verify")


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    s = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({r.returncode}): {r.stderr[-2000:]}")
    return s


class Tools:
    """Each tool's command line for each operation, on files in ``work``."""

    def __init__(self, src: Path, work: Path, zpy: Path, baseline: Path | None, threads: int):
        self.src, self.work, self.zpy, self.threads = src, work, zpy, threads
        self.trees = {"llmpress": REPO / "src"} | ({"baseline": baseline} if baseline else {})
        (work / "sha256").write_text(hashlib.sha256(src.read_bytes()).hexdigest())

    def names(self) -> list[str]:
        return [*self.trees, "zipnn"]

    def env(self, tool: str, **extra: str) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), **extra}
        if tool in self.trees:
            env["PYTHONPATH"] = str(self.trees[tool])
        return env

    def cmd(self, tool: str, op: str) -> list[str]:
        w = self.work
        if tool == "zipnn":
            src = {"pack": self.src, "unpack": w / "z.znn", "verify": w / "z.znn"}[op]
            dst = {"pack": w / "z.znn", "unpack": w / "z.out", "verify": w / "sha256"}[op]
            return [str(self.zpy), "-c", ZIPNN, op, str(src), str(dst), str(self.threads)]
        p = w / f"{tool}.llmp"
        args = {"pack": ["pack", str(self.src), "-o", str(p), "--force"],
                "unpack": ["unpack", str(p), "-o", str(w / f"{tool}.out"), "--force"],
                "verify": ["verify", str(p)]}[op]
        return [sys.executable, "-c", CLI, *args, "--threads", str(self.threads)]


def cold(tools: Tools, reps: int) -> dict[str, list[float]]:
    """What a fresh installation pays once (each in a new empty cache), and unpack without the AOT build."""
    out: dict[str, list[float]] = {"warmup (AOT build, empty cache)": [], "unpack, no AOT build, empty numba cache": [],
                                   "unpack, no AOT build, numba cache warm": []}
    for _ in range(1):  # minutes each: once
        with tempfile.TemporaryDirectory(dir=OUT) as d:
            out["warmup (AOT build, empty cache)"].append(
                _timed([sys.executable, "-c", CLI, "warmup"], tools.env("llmpress", LLMPRESS_CACHE=d)))
        with tempfile.TemporaryDirectory(dir=OUT) as d:
            out["unpack, no AOT build, empty numba cache"].append(
                _timed(tools.cmd("llmpress", "unpack"), tools.env("llmpress", LLMPRESS_AOT="0", NUMBA_CACHE_DIR=d)))
    for _ in range(reps):
        out["unpack, no AOT build, numba cache warm"].append(
            _timed(tools.cmd("llmpress", "unpack"), tools.env("llmpress", LLMPRESS_AOT="0")))
    return out


def unpack_files(labels: list[str], tools: Tools, reps: int) -> dict[str, dict]:
    """``llmpress unpack`` alone on each input, fresh processes alternating over the files (see the module)."""
    from lossless import inputs

    srcs = inputs(labels)
    w = tools.work
    cmds = {}
    for k, src in srcs.items():
        packed, out = w / f"file-{k}.llmp", w / f"file-{k}.out"
        subprocess.run([sys.executable, "-c", CLI, "pack", str(src), "-o", str(packed), "--force"],
                       env=tools.env("llmpress"), check=True, capture_output=True)
        cmds[k] = [sys.executable, "-c", CLI, "unpack", str(packed), "-o", str(out), "--force", "--threads", str(tools.threads)]
        _timed(cmds[k], tools.env("llmpress"))  # untimed first run
    times: dict[str, list[float]] = {k: [] for k in srcs}
    for rep in range(reps):
        for k in labels[rep % len(labels):] + labels[: rep % len(labels)]:
            times[k].append(_timed(cmds[k], tools.env("llmpress")))
    out: dict[str, dict] = {}
    for k, src in srcs.items():
        n, med = src.stat().st_size, statistics.median(times[k])
        restored = (w / f"file-{k}.out").read_bytes() == src.read_bytes()
        out[k] = {"input": str(src), "bytes": n, "median_s": med, "mb_s": n / 1e6 / med, "s_per_mb": med / (n / 1e6),
                  "times_s": times[k], "restored": restored}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="fresh processes per (operation, tool); the median is reported")
    ap.add_argument("--baseline", type=Path, default=None, help="another llmpress source tree (its src/) to run alongside")
    ap.add_argument("--zipnn-python", type=Path, default=None, help="a Python with zipnn (default: bench/.venvs/zipnn)")
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="threads for every tool")
    ap.add_argument("--cold", action="store_true", help="also time a fresh installation's first runs")
    ap.add_argument("--files", default="", help="also time unpack alone on these bench/lossless.py inputs, "
                    "e.g. BF16,GGUF-Q4_1,GGUF-Q4_K_M")
    a = ap.parse_args()
    from lossless import ensure_zipnn, inputs

    started = dt.datetime.now(dt.timezone.utc)
    OUT.mkdir(exist_ok=True)
    src = inputs()["BF16"]
    zpy = a.zipnn_python or ensure_zipnn()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=OUT) as d:
        tools = Tools(src, Path(d), zpy, a.baseline, a.threads)
        names = tools.names()
        # untimed: every tool's output exists (unpack/verify read it) and the AOT build is in place
        subprocess.run([sys.executable, "-c", CLI, "warmup"], env=tools.env("llmpress"), check=True, capture_output=True)
        for t in names:
            for op in OPS:
                _timed(tools.cmd(t, op), tools.env(t))
        times: dict[str, dict[str, list[float]]] = {op: {t: [] for t in names} for op in OPS}
        for rep in range(a.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for op in OPS:
                for t in order:
                    times[op][t].append(_timed(tools.cmd(t, op), tools.env(t)))
        restored = (Path(d) / "llmpress.out").read_bytes() == src.read_bytes()
        cmd = "python bench/startup.py " + " ".join(sys.argv[1:])
        med = {op: {t: statistics.median(v) for t, v in row.items()} for op, row in times.items()}
        result = {"command": cmd, "commit": commit(), "date": started.isoformat(), "cpus": os.cpu_count(),
                  "threads": a.threads, "load_before": load0, "load_after": os.getloadavg(), "input": str(src),
                  "input_bytes": src.stat().st_size, "reps": a.reps,
                  "baseline": str(a.baseline) if a.baseline else None, "median_s": med,
                  "ratio_to_zipnn": {op: {t: med[op][t] / med[op]["zipnn"] for t in names if t != "zipnn"}
                                     for op in OPS},
                  "times_s": times, "restored": restored}
        (OUT / "startup.json").write_text(json.dumps(result, indent=1))  # again below with the cold rows
        print(f"command: {cmd}\ncommit: {result['commit']}   date: {started:%Y-%m-%d %H:%M} UTC   "
              f"cpus: {os.cpu_count()}   threads: {a.threads}   load (1 min) before/after: "
              f"{load0[0]:.1f}/{result['load_after'][0]:.1f}")
        print(f"input: {src.name} ({src.stat().st_size / 1e6:.1f} MB); whole fresh processes, median of {a.reps}, "
              f"alternating; ratio: tool / ZipNN (target ≤ 0.5)")
        print(f"{'operation':<10}" + "".join(f"{c + ' s':>16}" for c in names)
              + "".join(f"{c + '/zipnn':>18}" for c in names if c != "zipnn"))
        for op in OPS:
            print(f"{op:<10}" + "".join(f"{med[op][c]:>16.2f}" for c in names)
                  + "".join(f"{med[op][c] / med[op]['zipnn']:>18.2f}" for c in names if c != "zipnn"))
        print(f"unpack restored the file byte for byte: {restored}", flush=True)
        if a.files:
            result["unpack_files"] = unpack_files(a.files.split(","), tools, a.reps)
            first = next(iter(result["unpack_files"].values()))
            for k, v in result["unpack_files"].items():
                print(f"unpack {k} ({v['bytes'] / 1e6:.1f} MB): median {v['median_s']:.3f} s, {v['mb_s']:.0f} MB/s, "
                      f"s per MB / {a.files.split(',')[0]}'s {v['s_per_mb'] / first['s_per_mb']:.2f}, "
                      f"restored byte for byte: {v['restored']}")
            (OUT / "startup.json").write_text(json.dumps(result, indent=1))
        if a.cold:
            result["cold_s"] = cold(tools, a.reps)
            for k, v in result["cold_s"].items():
                print(f"{k}: median {statistics.median(v):.2f} s of {len(v)}")
            (OUT / "startup.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
