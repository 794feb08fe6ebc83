"""Generation speed and memory: SmolLM2-135M dense FP32 against the same model quantized to 4 bits.

    OMP_NUM_THREADS=1 .venv/bin/python bench/generate.py
    .venv/bin/python bench/generate.py --tokens 64 --repeats 3 --threads 1

Quantizes the model once (RTN, 4 bits, groups of 64, integer zero point: the layout torch's int4
CPU kernel runs) into a scratch folder, then runs ``llmpress generate`` in a fresh process for
every case and repeat (so each process's peak RSS is its own), greedy, batch 1, the end-of-sequence
token ignored so every run makes the same number of tokens. Repeats are interleaved (dense, packed,
..., dense, packed, ...) so that load from other jobs on the machine falls on every case alike;
the table shows the median decode rate, by wall time and by the process's CPU time (with one thread,
the time it actually ran: steadier when other jobs share the cores). Cases:

* ``dense``: the original FP32 model;
* ``int4``: the quantized folder, packed int4 kernel (computing in bf16), embeddings/head FP32;
* ``int4-bf16``: the same with the unquantized tensors (embedding/head, norms) in bf16
  (``--dtype bfloat16``): shows what the FP32 head costs; not the same model as ``dense`` there;
* ``int4-exact``: the same packed codes, float32 kept (``--exact``: dequantized at each call);
* ``dequant``: the old path, every layer dequantized at each call (``LLMPRESS_KERNEL=dequant``).

``weight`` is the resident bytes of parameters and buffers after loading (a tied embedding once);
``peak RSS`` the process's, loading and the Python/torch runtime included. Writes
``bench/out/generate.json`` (the command, git commit, date, every run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"

CASES = {  # name -> (model: "dense" or "quant", extra CLI options, extra environment)
    "dense": ("dense", [], {}),
    "int4": ("quant", [], {}),
    "int4-bf16": ("quant", ["--dtype", "bfloat16"], {}),
    "int4-exact": ("quant", ["--exact"], {}),
    "dequant": ("quant", [], {"LLMPRESS_KERNEL": "dequant"}),
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _quantize(model: str, folder: Path) -> None:
    if (folder / "llmpress.json").exists():
        return
    import llmpress

    t = time.perf_counter()
    llmpress.quantize(model, folder, method="rtn", bits=4, group_size=64, grid="asymz", force=True)
    print(f"quantized {model} → {folder} in {time.perf_counter() - t:.1f} s", file=sys.stderr)


def _run(model: str, prompt: str, tokens: int, threads: int, opts: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-c", "from llmpress.cli import main; main()", "generate", model, prompt,
           "--max-new-tokens", str(tokens), "--threads", str(threads), "--ignore-eos", "--json", *opts]
    e = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", **env}
    e.setdefault("PYTHONPATH", str(ROOT / "src"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=e)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="The history of the printing press begins")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--scratch", type=Path, default=OUT / "generate" / "q4g64-asymz")
    ap.add_argument("--out", type=Path, default=OUT / "generate.json")
    a = ap.parse_args()
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")

    _quantize(a.model, a.scratch)
    models = {"dense": a.model, "quant": str(a.scratch)}
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(a.repeats):
        for c in cases:
            kind, opts, env = CASES[c]
            res = _run(models[kind], a.prompt, a.tokens, a.threads, opts, env)
            runs[c].append(res)
            print(f"repeat {r + 1}/{a.repeats} {c:11s} {res['tokens_per_s']:6.2f} tok/s", file=sys.stderr)

    rows = {}
    for c, rs in runs.items():
        rows[c] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "tokens_per_s_all": [x["tokens_per_s"] for x in rs],
            "tokens_per_cpu_s": statistics.median((x["new_tokens"] - 1) / x["decode_cpu_s"] for x in rs),
            "prefill_s": statistics.median(x["prefill_s"] for x in rs),
            "weight_bytes": rs[0]["weight_bytes"],
            "peak_rss_bytes": max(x["peak_rss_bytes"] for x in rs),
            "forwards": rs[0]["forwards"],
            "tokens": rs[0]["tokens"],
        }
    base = rows.get("dense")
    exact_tokens = rows.get("int4-exact", rows.get("dequant", {})).get("tokens")
    head = (f"| case | tok/s (median of {a.repeats}) | × dense | tok per CPU s | × dense | weight MB | × dense | "
            "peak RSS MB | prefill s | same tokens as exact |")
    lines = [head, "|" + "---|" * 10]
    for c, row in rows.items():
        sp = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        spc = f"{row['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}" if base else "-"
        wr = f"{row['weight_bytes'] / base['weight_bytes']:.3f}" if base else "-"
        same = "-" if c == "dense" or exact_tokens is None else ("yes" if row["tokens"] == exact_tokens else
                                                                 f"first {_common(row['tokens'], exact_tokens)}")
        lines.append(f"| {c} | {row['tokens_per_s']:.2f} | {sp} | {row['tokens_per_cpu_s']:.2f} | {spc} | "
                     f"{_mb(row['weight_bytes'])} | {wr} | "
                     f"{_mb(row['peak_rss_bytes'])} | {row['prefill_s']:.3f} | {same} |")
    table = "\n".join(lines)
    print(table)

    import torch

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()},
        "settings": {"model": a.model, "quantized": str(a.scratch), "prompt": a.prompt, "tokens": a.tokens,
                     "repeats": a.repeats, "threads": a.threads},
        "rows": rows,
        "runs": runs,
        "table": table,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(a.out)
    print(f"wrote {a.out}", file=sys.stderr)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
