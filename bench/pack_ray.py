"""pack on Ray: MB/s of ``pack --workers N`` against one process, on a sharded checkpoint.

    .venv/bin/python bench/pack_ray.py [--shards 4] [--copies 1] [--dtype bf16] [--workers 2] [--reps 3]

The checkpoint is built in a temporary folder from SmolLM2-135M's real weights (the embedded
default, dequantized FP32), cast to ``--dtype``; ``--copies K`` adds K − 1 copies of every
tensor, each with its rows permuted by a seeded permutation (same value distribution, different
bytes); the tensors are spread over ``--shards`` files of about equal size with a
``model.safetensors.index.json``. Everything is deleted at the end.
Each configuration runs in its own process: ``pack`` once untimed (numba caches loaded; on Ray the
cluster started and its workers warmed), then the best of ``--reps``; MB/s of the input bytes.
Ray start-up (``ray.init``, and the first pack, which starts the workers) is reported apart. RSS is
the driver process's (Ray's workers are processes of their own), after the imports (and
``ray.init``) and at its peak; on Ray it counts the object-store pages the driver read. Every configuration's ``.llmp`` sha256 is
compared with the first's. Results: bench/out/pack_ray.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


def build(dst: Path, shards: int, copies: int, dtype: str) -> int:
    """The sharded checkpoint in ``dst``; returns its tensor bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    from llmpress.models import resolve

    src = resolve("smollm2-135m").path
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update({k: v.to(tdtype) for k, v in load_file(str(f)).items()})
    g = torch.Generator().manual_seed(0)
    originals = list(state)
    for c in range(1, copies):
        for k in originals:
            t = state[k]
            state[f"{k}#copy{c}"] = t[torch.randperm(t.shape[0], generator=g)].contiguous() if t.ndim else t.clone()
    # greedy: the largest tensors first, each to the emptiest shard
    sizes = [0] * shards
    groups: list[list[str]] = [[] for _ in range(shards)]
    for k in sorted(state, key=lambda k: -state[k].numel()):
        i = sizes.index(min(sizes))
        groups[i].append(k)
        sizes[i] += state[k].numel() * state[k].element_size()
    weight_map = {}
    for i, names in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in sorted(names)}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                                 "weight_map": weight_map}, indent=2))
    shutil.copy(src / "config.json", dst / "config.json")
    return sum(sizes)


def run_one(model: Path, out: Path, workers: int, threads: int, reps: int) -> dict:
    """One configuration, in this (fresh) process."""
    from llmpress.lossless.container import pack

    t0 = time.perf_counter()
    start = 0.0
    if workers > 1:
        from llmpress.cluster import ray_cluster
        from llmpress.lossless.fanout import STORE_BYTES

        stack = ray_cluster(workers, object_store_bytes=STORE_BYTES)  # as pack starts it
        stack.__enter__()
        start = time.perf_counter() - t0
    import llmpress.lossless.container  # noqa: F401  (torch, numba: the baseline below)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t1 = time.perf_counter()
    r = pack(model, out, force=True, threads=threads, workers=workers)  # untimed: warm-up
    first = time.perf_counter() - t1
    best = float("inf")
    for _ in range(reps):
        r = pack(model, out, force=True, threads=threads, workers=workers)
        best = min(best, r["seconds"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pack's, before the check below
    with open(out, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"workers": workers, "threads": threads, "bytes_in": r["bytes_in"], "bytes_out": r["bytes_out"],
            "seconds": best, "mb_s": r["bytes_in"] / best / 1e6, "first_seconds": first, "ray_init_seconds": start,
            "rss_before_bytes": before, "peak_rss_bytes": peak,
            "sha256": sha}


def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--one", nargs=5, metavar=("MODEL", "OUT", "WORKERS", "THREADS", "REPS"), help=argparse.SUPPRESS)
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        m, o, w, t, r = args.one
        print(json.dumps(run_one(Path(m), Path(o), int(w), int(t), int(r))))
        return
    if args.build:
        print(build(Path(args.build), args.shards, args.copies, args.dtype))
        return
    configs = [("1 process, 1 thread", 1, 1), (f"1 process, {args.workers} threads", 1, args.workers),
               (f"Ray, {args.workers} workers × 1 thread", args.workers, 1)]
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                 "load_avg": os.getloadavg(), "dtype": args.dtype, "shards": args.shards, "copies": args.copies,
                 "runs": []}
    with tempfile.TemporaryDirectory(prefix="llmpress-packray-") as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        # built in a process of its own: a child's ru_maxrss starts from its parent's at fork, so the
        # parent stays small
        p = subprocess.run([sys.executable, __file__, "--build", str(model), "--shards", str(args.shards), "--copies",
                            str(args.copies), "--dtype", args.dtype], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"building the checkpoint failed:\n{p.stderr[-4000:]}")
        res["tensor_bytes"] = int(p.stdout.strip().splitlines()[-1])
        for label, w, t in configs:
            p = subprocess.run([sys.executable, __file__, "--one", str(model), str(Path(tmp) / "out.llmp"),
                                str(w), str(t), str(args.reps)], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{label} failed:\n{p.stderr[-4000:]}")
            res["runs"].append({"label": label, **json.loads(p.stdout.strip().splitlines()[-1])})
    base = res["runs"][0]
    OUT.mkdir(exist_ok=True)
    (OUT / "pack_ray.json").write_text(json.dumps(res, indent=2))
    print(f"\npack on Ray · SmolLM2-135M {args.dtype} ×{args.copies} in {args.shards} shards "
          f"({base['bytes_in'] / 1e6:.0f} MB) · commit {res['commit']} · {res['date']} · {res['cpus']} CPUs, "
          f"load {res['load_avg'][0]:.1f}\ncommand: {res['command']}\n")
    print(f"| {'configuration':<28} | {'MB/s':>6} | {'s':>6} | {'×':>5} | {'first s':>7} | {'ray.init s':>10} "
          f"| {'driver RSS MB: start → peak':>27} | same bytes |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 8}|{'-' * 7}|{'-' * 9}|{'-' * 12}|{'-' * 29}|{'-' * 12}|")
    for r in res["runs"]:
        print(f"| {r['label']:<28} | {r['mb_s']:6.1f} | {r['seconds']:6.2f} | {base['seconds'] / r['seconds']:5.2f} "
              f"| {r['first_seconds']:7.2f} | {r['ray_init_seconds']:10.2f} | {r['rss_before_bytes'] / 1e6:18.0f} → {r['peak_rss_bytes'] / 1e6:6.0f} "
              f"| {'yes' if r['sha256'] == base['sha256'] else 'NO':>10} |")
    print(f"\nratio {base['bytes_out'] / base['bytes_in']:.4f}; results: {OUT / 'pack_ray.json'}")


if __name__ == "__main__":
    main()
