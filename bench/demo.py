"""The main job as a new user meets it: ``llmpress limit smollm2-135m --budget quick`` (what
``make demo`` runs) in a fresh process, timed.

Prints and writes (bench/out/demo.json, with command, commit and date) the sweep's CPU time
(user + sys of the process and its children), its wall time, and when the report first appeared
(wall and CPU seconds from the start), with the points it measured and the recommendation.

By default the run is as cold as a fresh clone's: the compiled numba kernels are cached in an
empty folder (NUMBA_CACHE_DIR), and llmpress's cache is a new folder holding only links to the
one-time set-up products of the user's cache (the embedded model's conversion, the texts), so the
original's reference log-probabilities are measured again. ``--warm`` uses the caches as they are.

    python bench/demo.py [--out-dir /tmp/demo] [--nice 0] [--warm]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import commit  # bench/ is the script's folder: first on sys.path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
SETUP = ("gguf", "text", "kernels")  # one-time products of the set-up (make setup), kept in a cold run


def _cpu_of(pid: int) -> float:
    """User + sys seconds of a running process (all its threads), from /proc."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", default="quick")
    ap.add_argument("--out-dir", type=Path, default=None, help="the sweep's report folder (default: a new temp folder)")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--warm", action="store_true", help="use the numba and llmpress caches as they are")
    ap.add_argument("--json", type=Path, default=HERE / "out" / "demo.json")
    a = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="llmpress-demo-"))
    out = a.out_dir or scratch / "limit"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not a.warm:
        user_cache = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress"))
        cache = scratch / "cache"
        cache.mkdir()
        for name in SETUP:
            if (user_cache / name).exists():
                (cache / name).symlink_to((user_cache / name).resolve())
        env.update(LLMPRESS_CACHE=str(cache), NUMBA_CACHE_DIR=str(scratch / "numba"))
    cmd = [sys.executable, "-m", "llmpress", "limit", a.model, "-o", str(out), "--budget", a.budget]
    shown = " ".join(["OMP_NUM_THREADS=" + env["OMP_NUM_THREADS"], *(["nice", "-n", str(a.nice)] if a.nice else []),
                      "llmpress", *cmd[3:]]) + ("" if a.warm else "   (cold: fresh numba and reference caches)")
    started = dt.datetime.now(dt.timezone.utc)
    report = out / "report.md"
    t0 = time.perf_counter()
    proc = subprocess.Popen(["nice", "-n", str(a.nice), *cmd], env=env, cwd=REPO)
    first_wall = first_cpu = None
    last_cpu = 0.0
    while proc.poll() is None:
        time.sleep(0.5)
        c = _cpu_of(proc.pid)
        last_cpu = c if c == c else last_cpu
        if first_wall is None and report.exists():
            first_wall, first_cpu = time.perf_counter() - t0, last_cpu
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if first_wall is None and report.exists():
        first_wall, first_cpu = wall, ru.ru_utime + ru.ru_stime
    summary = {}
    rows = []
    if proc.returncode == 0:
        from llmpress.sweep.driver import read_results  # noqa: E402 - after the run, in this process

        rows = [{k: r.get(k) for k in ("label", "bpw", "kl_mean", "cpu_seconds", "seconds")}
                for r in read_results(out / "results.jsonl")]
        summary = {"report": str(report)}
        head = report.read_text().split("## Limits")[0]
        summary["recommendation"] = next((line for line in head.splitlines() if line.startswith("**")), None)
    result = {"command": shown, "commit": commit(), "date": started.isoformat(), "returncode": proc.returncode,
              "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": wall,
              "first_report_wall_s": first_wall, "first_report_cpu_s": first_cpu, "points": rows, **summary,
              "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}}
    print(f"command: {shown}\ncommit: {result['commit']}   date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"{'CPU user+sys':>14} {'wall':>8} {'first report (wall / CPU)':>28}")
    print(f"{result['cpu_s']:>13.0f}s {wall:>7.0f}s {first_wall or float('nan'):>14.0f}s / {first_cpu or float('nan'):.0f}s")
    for r in rows:
        print(f"  {r['label']:<22} bpw {r['bpw']:.3f}  KL {r['kl_mean'] if r['kl_mean'] is not None else float('nan'):.4g}"
              f"  {r['cpu_seconds'] or 0:.0f} CPU-s")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
