"""The long fuzz run of both readers (the CI-sized one is tests/fuzz/test_fuzz.py).

    nice -n 19 .venv/bin/python bench/fuzz.py [--seconds 300] [--inputs 100000] [--seed 0] [--readers folder,llmp]
                                              [--start N] [--state bench/out/fuzz-seed7.json]

Structure-aware mutations of real llmpress outputs (tests/fuzz/harness.py): a lossy folder
(rtn 4-bit g32 and svd+q) and ``.llmp`` files of the same checkpoint (rans, ans, zstd). Input i of
a reader draws its mutation from its own generator, seeded by (seed, reader, i): any input is
reproduced alone with ``--start i --inputs i+1``, and a run continues where it stopped. Each
reader runs from ``--start`` until input ``--inputs`` or ``--seconds`` seconds, whichever comes
first. With ``--state``, the tallies and the next input are saved there (atomically) every
``--every`` inputs and at the end, and a run given an existing state file continues from it
(same seed and readers; ``--start`` ignored); ``--report`` prints a state file's tables (of a run
going on or stopped) without running anything.

Per reader it prints inputs tried, refused (an LlmpressError), accepted (and checked by the
oracle), wrong (accepted but not what the files hold), crashes (any other exception), hangs (over
1 s of CPU time, on a second run too: harness.Fuzzer.run), the slowest input (CPU and wall
seconds), the largest peak resident memory above the clean input's and the inputs whose peak
exceeded it by more than 2× their size (+ 4 MiB of interpreter noise, harness.SLACK_BYTES), and
how many inputs were run a second time; then the first failures in full. The process runs under
an address-space limit (``--max-gib``) so an allocation a lying input asks for fails instead of
exhausting the machine. Exit code 1 if anything but refused/accepted happened.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fuzz"))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from _record import record  # noqa: E402


def _rng(seed: int, reader: str, i: int) -> random.Random:
    return random.Random(f"{seed}/{reader}/{i}")


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _report(state: dict, readers: list[str], seed: int, show: int) -> int:
    """Print the run's table and its first failures; 1 if anything failed."""
    from harness import HANG_SECONDS, Tally

    print(f"\n| reader | inputs | wall s | CPU s | refused | accepted | wrong | crash | hangs > {HANG_SECONDS:g} s CPU "
          "| slowest CPU s | slowest wall s | max peak over clean KiB | over 2× size | run twice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for reader in readers:
        st = state["readers"][reader]
        t = Tally.from_json(st["tally"])
        c = t.counts
        print(f"| {reader} | {t.total} | {st['seconds']:.0f} | {st['cpu']:.0f} | {c['refused']} | {c['accepted']} | {c['wrong']} | "
              f"{c['crash']} | {t.hangs} | {t.slowest:.3f} | {t.slowest_wall:.3f} | {t.peak_over >> 10} | {t.over_2x} | {t.rerun} |")
    for reader in readers:
        t = Tally.from_json(state["readers"][reader]["tally"])
        bad += len(t.failures)
        for o in t.failures[: show]:
            print(f"\n--- {reader} input {o.index}: {o.kind}{' (slow)' if o.cpu > HANG_SECONDS else ''}: {o.what} "
                  f"({o.cpu:.3f} s CPU, {o.seconds:.3f} s wall, peak {o.peak_bytes >> 10} KiB, input {o.size} B) {o.first}\n"
                  f"reproduce: bench/fuzz.py --seed {seed} --readers {reader} --start {o.index} --inputs {o.index + 1}\n{o.detail}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="time per reader (this invocation)")
    ap.add_argument("--inputs", type=int, default=100_000, help="run each reader up to this input number")
    ap.add_argument("--start", type=int, default=0, help="first input number")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readers", default="folder,llmp")
    ap.add_argument("--state", type=Path, default=None, help="save/continue the run's tallies here")
    ap.add_argument("--every", type=int, default=500, help="inputs between saves of --state")
    ap.add_argument("--max-gib", type=float, default=8.0, help="address-space limit of this process")
    ap.add_argument("--show", type=int, default=5, help="failures printed in full")
    ap.add_argument("--report", action="store_true", help="print the tables of --state (a run going on or stopped) and exit")
    args = ap.parse_args()
    if args.report:
        state = json.loads(args.state.read_text())
        print(f"# {args.state} (seed {state['seed']}), read {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
        return _report(state, list(state["readers"]), state["seed"], args.show)
    limit = int(args.max_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)

    from harness import Fuzzer, Tally

    readers = args.readers.split(",")
    state = {"seed": args.seed, "readers": {r: {"next": args.start, "seconds": 0.0, "cpu": 0.0, "tally": Tally().to_json()}
                                            for r in readers}}
    if args.state and args.state.exists():
        state = json.loads(args.state.read_text())
        if state["seed"] != args.seed or set(state["readers"]) != set(readers):
            sys.exit(f"{args.state}: a run of seed {state['seed']} over {sorted(state['readers'])}, not this one")
    rec = record()
    state.update(rec)  # the invocation that last added to the tallies (a resumed run: its latest part)
    print(f"# {rec['command']}\n# commit {rec['commit']}, {rec['date']}, "
          f"{os.cpu_count()} CPUs, nice {os.nice(0)}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"address space ≤ {args.max_gib:g} GiB", flush=True)
    t0 = time.perf_counter()
    fz = Fuzzer()
    print(f"# bases built and warm in {time.perf_counter() - t0:.1f} s; clean peak RSS: folder {fz.clean_peak['folder'] >> 10} KiB, "
          f"llmp {fz.clean_peak['llmp'] >> 10} KiB", flush=True)
    try:
        for reader in readers:
            st = state["readers"][reader]
            tally = Tally.from_json(st["tally"])
            t, c = time.perf_counter(), time.process_time()
            base_s, base_c = st["seconds"], st["cpu"]
            while st["next"] < args.inputs and time.perf_counter() - t < args.seconds:
                o = getattr(fz, reader)(_rng(args.seed, reader, st["next"]))
                o.index = st["next"]
                tally.add(o, fz.clean_peak[reader])
                st["next"] += 1
                if args.state and (st["next"] % args.every == 0 or st["next"] == args.inputs):
                    st.update(tally=tally.to_json(), seconds=base_s + time.perf_counter() - t, cpu=base_c + time.process_time() - c)
                    _save(args.state, state)
            st.update(tally=tally.to_json(), seconds=base_s + time.perf_counter() - t, cpu=base_c + time.process_time() - c)
            if args.state:
                _save(args.state, state)
    finally:
        fz.close()

    return _report(state, readers, args.seed, args.show)


if __name__ == "__main__":
    sys.exit(main())
