"""The long fuzz run of both readers (the CI-sized one is tests/fuzz/test_fuzz.py).

    nice -n 19 .venv/bin/python bench/fuzz.py [--seconds 300] [--inputs 100000] [--seed 0] [--readers folder,llmp]

Structure-aware mutations of real llmpress outputs (tests/fuzz/harness.py): a lossy folder
(rtn 4-bit g32 and svd+q) and ``.llmp`` files of the same checkpoint (rans, ans, zstd). Each reader
runs until ``--inputs`` inputs or ``--seconds`` seconds, whichever comes first. Per reader it
prints inputs tried, refused (an LlmpressError), accepted (and checked by the oracle), wrong
(accepted but not what the files hold), crashes (any other exception), hangs (> 1 s), the slowest
input, the largest peak resident memory above the clean input's and the inputs whose peak
exceeded it by more than 2× their size (+ 4 MiB of interpreter noise, harness.SLACK_BYTES); then the first failures in full. The process runs
under an address-space limit (``--max-gib``) so an allocation a lying input asks for fails
instead of exhausting the machine. Exit code 1 if anything but refused/accepted happened.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fuzz"))
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="time per reader")
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs per reader at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readers", default="folder,llmp")
    ap.add_argument("--max-gib", type=float, default=8.0, help="address-space limit of this process")
    ap.add_argument("--show", type=int, default=5, help="failures printed in full")
    args = ap.parse_args()
    limit = int(args.max_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)

    from harness import HANG_SECONDS, Fuzzer, Tally

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    print(f"# {' '.join(sys.argv)}\n# commit {commit}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, address space ≤ {args.max_gib:g} GiB")
    t0 = time.perf_counter()
    fz = Fuzzer()
    print(f"# bases built in {time.perf_counter() - t0:.1f} s; clean peak RSS: folder {fz.clean_peak['folder'] >> 10} KiB, "
          f"llmp {fz.clean_peak['llmp'] >> 10} KiB")
    tallies = {}
    try:
        for reader in args.readers.split(","):
            rng = random.Random(args.seed)
            tally = Tally()
            t = time.perf_counter()
            while tally.total < args.inputs and time.perf_counter() - t < args.seconds:
                tally.add(getattr(fz, reader)(rng), fz.clean_peak[reader])
            tallies[reader] = (tally, time.perf_counter() - t)
    finally:
        fz.close()

    print(f"\n| reader | inputs | seconds | refused | accepted | wrong | crash | hangs > {HANG_SECONDS:g} s | slowest s "
          "| max peak over clean KiB | over 2× size |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for reader, (t, secs) in tallies.items():
        c = t.counts
        print(f"| {reader} | {t.total} | {secs:.0f} | {c['refused']} | {c['accepted']} | {c['wrong']} | {c['crash']} | "
              f"{t.hangs} | {t.slowest:.3f} | {t.peak_over >> 10} | {t.over_2x} |")
    bad = 0
    for reader, (t, _) in tallies.items():
        bad += len(t.failures)
        for o in t.failures[: args.show]:
            print(f"\n--- {reader}: {o.kind}{' (slow)' if o.seconds > HANG_SECONDS else ''}: {o.what} ({o.seconds:.3f} s, peak {o.peak_bytes >> 10} KiB, input {o.size} B)\n{o.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
