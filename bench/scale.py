"""Scale benchmark: checkpoints larger than memory, each step a fresh CLI process under a memory cap.

    python bench/scale.py                 # 8B shapes (~16 GB) + 1B shapes + MiniLM, ~40 min on 2 cores
    python bench/scale.py --quick         # small stand-ins (2 layers), a few minutes: development, smoke test
    python bench/scale.py --json          # the same, one JSON object as the last line of stdout

What it measures (every step is ``python -m llmpress ...`` in a new process, capped at ``--cap-gib``
(6 GiB) by the first usable of cgroup v2, cgroup v1 (a child of this process's own memory cgroup)
or RLIMIT_DATA — see capped.py; wall time and the child's peak RSS from wait4):

- a synthetic checkpoint with Llama-3-8B's shapes (BF16, 4 shards, index, config, SmolLM2's
  tokenizer; values resampled from SmolLM2-135M's tensor of the same kind and depth, synth.py),
  written tensor by tensor into the scratch folder;
- ``pack`` / ``verify`` / ``unpack`` of it, beside the same for MiniLM (the packaged
  all-MiniLM-L6-v2), MB/s of the original bytes and MB/s per thread;
- ``quantize --method gptq --samples 16 --trial-blocks N`` on it: seconds per block (the runner's
  own timing), the whole run extrapolated to every block, peak RSS;
- a synthetic Llama-3.2-1B-shape checkpoint end to end: ``quantize --method gptq --samples 16``,
  load (``generate`` of a few tokens: load + decode), ``eval`` (KL/PPL against the original).

Everything it writes lives in one scratch folder (``--scratch``, default /work/scratch or the
system temp dir), removed at the end, on error and on Ctrl-C; big files are deleted as soon as
no later step needs them (the 8B checkpoint, its .llmp and its unpacked copy need ~45 GB at most).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _record import commit  # bench/ is the script's folder: first on sys.path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

import capped  # noqa: E402
import synth  # noqa: E402

GiB = 1 << 30
MB = 1e6


@dataclass
class Row:
    step: str
    model: str
    bytes: int | None  # bytes the step reads (the original's size for pack/verify/unpack)
    seconds: float | None
    peak_rss_bytes: int | None
    threads: int | None = None
    rc: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_s(self) -> float | None:
        return self.bytes / MB / self.seconds if self.bytes and self.seconds else None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d["mb_per_s"] = self.mb_s  # of the wall time, process start-up included
        work = self.extra.get("work_seconds")
        d["work_mb_per_s"] = self.bytes / MB / work if self.bytes and work else None
        d["work_mb_per_s_per_thread"] = d["work_mb_per_s"] / self.threads if d["work_mb_per_s"] and self.threads else None
        return {**d, **self.extra}


@dataclass
class Plan:
    """The shapes and sizes of one run (full or --quick)."""

    big: str
    small: str
    trial_blocks: int
    samples: int
    seq_len: int
    eval_tokens: int
    eval_ctx: int
    method: str = "gptq"  # of the end-to-end quantize


PLANS = {
    "full": Plan(big="llama3-8b", small="llama3.2-1b", trial_blocks=1, samples=16, seq_len=512, eval_tokens=2048, eval_ctx=512),
    "quick": Plan(big="quick-8b", small="quick-1b", trial_blocks=1, samples=16, seq_len=128, eval_tokens=512, eval_ctx=128),
}


class Bench:
    def __init__(self, scratch: Path, cap: capped._Cap, threads: int, log: Callable[[str], None]):
        self.scratch = scratch
        self.cap = cap
        self.threads = threads
        self.log = log
        self.rows: list[Row] = []
        self.env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(threads),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def cli(self, step: str, model: str, args: list[str], nbytes: int | None, threads: int | None = None,
            note: str = "") -> tuple[Row, dict[str, Any]]:
        """Run ``python -m llmpress ARGS --json`` under the cap; record a row; return it and the JSON."""
        argv = [sys.executable, "-m", "llmpress", *args, "--json"]
        self.log(f"[{time.strftime('%H:%M:%S')}] {step} {model}: {' '.join(args)}")
        r = capped.run(argv, self.cap, env=self.env, cwd=REPO)
        out: dict[str, Any] = {}
        if r.rc == 0:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            why = "killed (memory cap?)" if r.rc in (-9, 137) else f"exit {r.rc}"
            note = f"{why}: {r.stderr.strip().splitlines()[-1][:160] if r.stderr.strip() else ''}"
            self.log(f"  FAILED {note}\n{r.stderr[-3000:]}")
        row = Row(step, model, nbytes, r.seconds, r.peak_rss_bytes, threads, r.rc, note)
        if isinstance(out.get("seconds"), (int, float)):
            row.extra["work_seconds"] = out["seconds"]  # the command's own timing: no interpreter start-up
        self.rows.append(row)
        self.log(f"  {r.seconds:.1f} s, peak RSS {r.peak_rss_bytes / GiB:.2f} GiB")
        (HERE / "out").mkdir(exist_ok=True)  # the rows so far, in case the run is cut short
        (HERE / "out" / "scale-partial.json").write_text(json.dumps([x.to_dict() for x in self.rows], indent=1))
        return row, out

    def lossless(self, model: str, src: Path, keep_packed: bool = False) -> None:
        """pack, verify, unpack of ``src``; deletes the .llmp and the unpacked copy."""
        nbytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        packed = self.scratch / f"{model}.llmp"
        unpacked = self.scratch / f"{model}-unpacked"
        t = ["--threads", str(self.threads)]
        row, res = self.cli("pack", model, ["pack", str(src), "-o", str(packed), *t], nbytes, self.threads)
        if row.rc == 0:
            row.extra["ratio"] = res.get("ratio")
            self.cli("verify", model, ["verify", str(packed), *t], nbytes, self.threads)
            row2, _ = self.cli("unpack", model, ["unpack", str(packed), "-o", str(unpacked), *t], nbytes, self.threads)
            if row2.rc == 0:
                row2.extra["identical"] = _same_files(src, unpacked)
        shutil.rmtree(unpacked, ignore_errors=True)
        packed.unlink(missing_ok=True)

    def gptq_trial(self, model: str, src: Path, plan: Plan) -> None:
        args = ["quantize", str(src), "-o", str(self.scratch / f"{model}-gptq"), "--method", "gptq",
                "--samples", str(plan.samples), "--seq-len", str(plan.seq_len), "--trial-blocks", str(plan.trial_blocks)]
        row, res = self.cli("gptq trial", model, args, None, note=f"{plan.trial_blocks} block(s), then extrapolated")
        if row.rc == 0:
            tr, tm = res["trial"], res.get("timing", {})
            row.extra.update(seconds_per_block=tr["seconds_per_block"], blocks=f"{tr['blocks_done']}/{tr['blocks_total']}",
                             extrapolated_seconds=tr["extrapolated_seconds"], block_seconds=tm.get("block_seconds"),
                             setup_seconds=tm.get("setup_seconds"), outside_seconds=tm.get("outside_seconds"))

    def end_to_end(self, model: str, src: Path, plan: Plan) -> None:
        if plan.method != "gptq":  # GPTQ's time on these shapes, block by block
            self.gptq_trial(model, src, plan)
        q = self.scratch / f"{model}-{plan.method}"
        calib = [] if plan.method == "rtn" else ["--samples", str(plan.samples), "--seq-len", str(plan.seq_len)]
        row, res = self.cli(f"quantize {plan.method}", model, ["quantize", str(src), "-o", str(q), "--method", plan.method,
                                                              *calib], None)
        if row.rc != 0:
            return
        row.extra.update(bpw=res.get("bpw"), block_seconds=(res.get("timing") or {}).get("block_seconds"))
        row, res = self.cli("load+generate", model, ["generate", str(q), "The capital of France is", "-n", "8",
                                                    "--threads", str(self.threads)], None, note="load, 8 tokens")
        row, res = self.cli("eval", model, ["eval", str(q), "--tokens", str(plan.eval_tokens), "--ctx", str(plan.eval_ctx),
                                                 "--threads", str(self.threads)],
                            None, note=f"KL/PPL vs the original, {plan.eval_tokens} tokens")
        if row.rc == 0:
            row.extra.update(kl_mean=res.get("kl_mean"), top1=res.get("top1"), ppl=res.get("ppl"), ref_ppl=res.get("ref_ppl"))
        shutil.rmtree(q, ignore_errors=True)


def _same_files(a: Path, b: Path) -> bool:
    """Every file of ``a`` exists in ``b`` with the same size (the bytes were checked by unpack's checksums)."""
    fa = {p.relative_to(a): p.stat().st_size for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b): p.stat().st_size for p in b.rglob("*") if p.is_file()}
    return fa == fb


def _fmt(v: Any, f: str) -> str:
    return "—" if v is None else f.format(v)


def table(rows: list[Row]) -> str:
    head = (f"{'step':<14} {'model':<12} {'size GB':>8} {'seconds':>9} {'work s':>8} {'MB/s':>8} {'MB/s/thr':>9} "
            f"{'peak RSS GiB':>12}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        d = r.to_dict()
        work = d.get("work_seconds")
        mbs = r.bytes / MB / work if r.bytes and work else r.mb_s  # throughput of the work itself when reported
        note = r.note
        if "seconds_per_block" in d:
            note = (f"{d['seconds_per_block']:.1f} s/block ({d['blocks']} blocks), whole model ≈ "
                    f"{d['extrapolated_seconds'] / 60:.1f} min; " + note)
        for k in ("ratio", "kl_mean", "top1", "ppl", "ref_ppl", "bpw"):
            if d.get(k) is not None:
                note += f" {k}={d[k]:.4g}"
        if d.get("identical") is not None:
            note += " files identical" if d["identical"] else " FILES DIFFER"
        lines.append(f"{r.step:<14} {r.model:<12} {_fmt(r.bytes and r.bytes / 1e9, '{:.2f}'):>8} "
                     f"{_fmt(r.seconds, '{:.1f}'):>9} {_fmt(work, '{:.1f}'):>8} {_fmt(mbs, '{:.1f}'):>8} "
                     f"{_fmt(mbs and r.threads and mbs / r.threads, '{:.1f}'):>9} "
                     f"{_fmt(r.peak_rss_bytes and r.peak_rss_bytes / GiB, '{:.2f}'):>12}  "
                     f"{note.strip()}")
    return "\n".join(lines)


def _default_scratch() -> Path:
    base = Path("/work/scratch")
    return base if base.parent.exists() else Path(tempfile.gettempdir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Small stand-ins (2 layers): minutes, for development.")
    ap.add_argument("--scratch", type=Path, default=None, help="Where checkpoints are written (a new folder inside, removed after).")
    ap.add_argument("--cap", default="auto", help=f"Memory cap: auto | {' | '.join(capped.CAPS)}.")
    ap.add_argument("--cap-gib", type=float, default=6.0, help="Memory cap of each step, GiB.")
    ap.add_argument("--threads", type=int, default=2, help="Threads of every step (lossless workers, torch).")
    ap.add_argument("--trial-blocks", type=int, default=None, help="GPTQ blocks timed on the big shapes (default 2; quick 1).")
    ap.add_argument("--only", default="lossless,gptq,e2e", help="Parts to run: lossless, gptq, e2e (comma-separated).")
    ap.add_argument("--small", default=None, choices=sorted(synth.SHAPES),
                    help="Shapes of the end-to-end model (default llama3.2-1b; llama3.2-1b-2l: 2 of its blocks, "
                         "when 16 GPTQ blocks do not fit the time there is).")
    ap.add_argument("--e2e-method", default="gptq", choices=("gptq", "awq", "rtn"),
                    help="Method of the end-to-end quantize (rtn: the whole 1B in minutes; its GPTQ time per block "
                         "comes from --trial-blocks).")
    ap.add_argument("--json", action="store_true", help="Print one JSON object as the last line of stdout.")
    a = ap.parse_args()
    plan = PLANS["quick" if a.quick else "full"]
    if a.trial_blocks:
        plan.trial_blocks = a.trial_blocks
    if a.small:
        plan.small = a.small
    plan.method = a.e2e_method
    parts = set(a.only.split(","))
    if parts - {"lossless", "gptq", "e2e"}:
        ap.error(f"unknown part(s) {parts - {'lossless', 'gptq', 'e2e'}}")
    base = a.scratch or _default_scratch()
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="llmpress-scale-", dir=base))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    cap = capped.make_cap(a.cap, int(a.cap_gib * GiB))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = dt.datetime.now(dt.timezone.utc)
    b = Bench(scratch, cap, a.threads, log)
    try:
        from llmpress.models import resolve

        smol = resolve("smollm2-135m").path
        minilm = resolve("minilm-l6").path
        if parts & {"lossless", "gptq"}:
            big = scratch / plan.big
            t = time.perf_counter()
            info = synth.write_checkpoint(big, synth.SHAPES[plan.big], smol)
            b.rows.append(Row("synthesize", plan.big, info["bytes"], time.perf_counter() - t, None,
                              note=f"{info['files']} shard(s), {info['tensors']} tensors (this process, uncapped)"))
            log(f"synthesized {plan.big}: {info['bytes'] / 1e9:.2f} GB in {b.rows[-1].seconds:.0f} s")
            if "lossless" in parts:
                b.lossless("minilm-l6", minilm)
                b.lossless(plan.big, big)
            if "gptq" in parts:
                b.gptq_trial(plan.big, big, plan)
            shutil.rmtree(big, ignore_errors=True)
        if "e2e" in parts:
            small = scratch / plan.small
            info = synth.write_checkpoint(small, synth.SHAPES[plan.small], smol)
            b.end_to_end(plan.small, small, plan)
            shutil.rmtree(small, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        cap.cleanup()
    cmd = "python bench/scale.py " + " ".join(sys.argv[1:])
    head = (f"command: {cmd}\ncommit: {commit()}   date: {started:%Y-%m-%d %H:%M} UTC   "
            f"cap: {cap.name} {a.cap_gib:g} GiB   threads: {a.threads}   cpus: {os.cpu_count()}")
    print(head)
    print(table(b.rows))
    print("seconds: wall time of the step's process (start-up included); work s: the command's own timing; "
          "MB/s: original bytes / work s (wall when the command reports none); peak RSS: the process's ru_maxrss")
    result = {"command": cmd, "commit": commit(), "date": started.isoformat(), "cap": cap.name,
              "cap_bytes": int(a.cap_gib * GiB), "threads": a.threads, "quick": a.quick,
              "rows": [r.to_dict() for r in b.rows]}
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / ("scale-quick.json" if a.quick else "scale.json")).write_text(json.dumps(result, indent=1))
    if a.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0 if all(r.rc == 0 for r in b.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
