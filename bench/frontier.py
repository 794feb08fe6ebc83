"""The frontier's first rows: allocation over each menu at a few bpw against the best uniform point.

    nice -n 19 env OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/frontier.py \\
        --menus gptq,awq,best,gguf --targets 2.5,3.0,3.5,4.0,4.5

On SmolLM2-135M: the uniform points (``--uniform``: each method of ``--uniform-methods`` at each
bits:group) and the mixed points (``compress --target-bpw`` over each menu of ``--menus``, one
sensitivity table per menu for all its targets) are compressed with the same calibration windows
and judged by ``llmpress.evaluate`` on each evaluation text separately (debian-handbook,
linux-doc: KL to the original, top-128, cached reference). Each mixed target is set beside the
best uniform point of any method at equal or lower bpw (lowest mean KL of the two texts), with
the ratio KL(mixed) / KL(uniform) and whether it meets ``--goal`` (0.85).

Every point (and every menu's sensitivity table) runs in its own fresh process, so its time and
peak memory (the process's maximum RSS) are its own. Results are kept in
``bench/out/frontier/results.json`` keyed by point and protocol, so a re-run resumes; each row
records the command, commit and date that measured it (``_record.py``; rows measured before the
record existed show none).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out" / "frontier"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One point in a fresh process: the menu's sensitivity table, or a compression and its evaluation."""
    import torch

    torch.set_num_threads(job["threads"])
    from llmpress.errors import InputError
    from llmpress.eval import evaluate
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe
    from llmpress.sweep.mixed import mixed_recipe
    from llmpress.sweep.sensitivity import load_or_measure
    from llmpress.text import EVAL_DEFAULTS

    p, t0 = job["proto"], time.perf_counter()
    cache = Path(job["cache"]) if job.get("cache") else None
    if job["kind"] == "sensitivity":  # its time and peak are the measurement's unless the table was cached already
        fresh = cache is None or not cache.exists()
        table = load_or_measure(cache, p["model"], job["menu"], samples=p["samples"], seq_len=p["seq_len"], progress=False)
        return {"seconds": table.meta["seconds"], "peak_rss_bytes": _peak() if fresh else None, "alloc_seconds": 0.0,
                "options": sum(len(c) for c in table.layers.values())}
    if job["kind"] == "uniform":
        recipe, alloc = Recipe.uniform(job["method"], bits=job["bits"], group_size=job["group"]), None
    else:
        try:
            recipe, alloc = mixed_recipe(p["model"], target_bpw=job["target"], menu=job["menu"], samples=p["samples"],
                                         seq_len=p["seq_len"], cache=cache)
        except InputError as e:  # the target is below the menu's cheapest choice (gguf's fallbacks on narrow rows)
            return {"infeasible": str(e), "seconds": time.perf_counter() - t0}
    t_alloc = time.perf_counter() - t0
    out = Path(job["out"]) / job["label"]
    s = compress(p["model"], recipe, out, calib=None, samples=p["samples"], seq_len=p["seq_len"], force=True, progress=False)
    row = {"bpw": s["bpw"], "seconds": time.perf_counter() - t0, "alloc_seconds": t_alloc, "alloc": alloc}
    for text in EVAL_DEFAULTS:
        ev = evaluate(str(out), reference=p["model"], text=text, ctx=p["ctx"], tokens=p["tokens"])
        row[f"kl:{text}"] = ev["kl_mean"]
    row["kl"] = sum(row[f"kl:{t}"] for t in EVAL_DEFAULTS) / len(EVAL_DEFAULTS)
    row["eval_seconds"] = time.perf_counter() - t0 - row["seconds"]
    row["peak_rss_bytes"] = _peak()
    return row


def _gib(b: int | None) -> str:
    return "peak not measured (table cached before)" if b is None else f"{b / 2**30:.2f} GiB"


def _provenance(r: dict[str, Any]) -> str:
    return f"{r['commit']} {r['date'][:10]}" if r.get("commit") else "no record"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0,4.5")
    ap.add_argument("--menus", default="gptq,awq,best,gguf", help="menus whose mixed points are measured")
    ap.add_argument("--uniform-methods", default="gptq,awq,rtn")
    ap.add_argument("--uniform", default="2:64,2:128,3:64,3:128,4:64,4:128", help="bits:group of the uniform points")
    ap.add_argument("--goal", type=float, default=0.85, help="KL(mixed) / KL(best uniform) the issue asks for")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens per text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT, help="results.json, sensitivity tables and the compressed points")
    args = ap.parse_args()

    from llmpress.sweep.menu import check_menu
    from llmpress.tensor import get_codec
    from llmpress.text import EVAL_DEFAULTS

    menus = args.menus.split(",")
    methods = args.uniform_methods.split(",")
    for m in menus:  # refused before any point runs
        check_menu(m, None)
    for m in methods:
        get_codec(m)
    specs = [tuple(int(x) for x in s.split(":")) for s in args.uniform.split(",")]
    targets = [float(x) for x in args.targets.split(",")]

    args.out.mkdir(parents=True, exist_ok=True)
    proto = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "ctx": args.ctx, "tokens": args.tokens,
             "texts": list(EVAL_DEFAULTS)}
    res_path = args.out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    t_start = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), max_tasks_per_child=1)

    def run(label: str, **job: Any) -> dict:
        key = json.dumps({"label": label, **proto}, sort_keys=True)
        if key in results:
            return results[key]
        row = {**record(), "label": label, **pool.submit(_job, {**job, "label": label, "proto": proto,
                                                                 "threads": args.threads, "out": str(args.out)}).result()}
        results[key] = row
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
        tmp.replace(res_path)
        kl = f" KL {row['kl']:.4f}" if "kl" in row else ""
        print(f"  {label}:{kl} ({row['seconds']:.0f} s, {_gib(row.get('peak_rss_bytes'))}) {row.get('infeasible', '')}",
              file=sys.stderr, flush=True)
        return row

    uniform = [run(f"{m}-w{b}-g{g}", kind="uniform", method=m, bits=b, group=g) for m in methods for b, g in specs]
    mixed: dict[str, list[tuple[float, dict]]] = {}
    sens: dict[str, dict] = {}
    for menu in menus:
        cache = str(args.out / f"sensitivity-{menu}-{args.samples}x{args.seq_len}.json")
        sens[menu] = run(f"sensitivity-{menu}", kind="sensitivity", menu=menu, cache=cache)
        mixed[menu] = [(t, run(f"mixed-{menu}-{t:g}", kind="mixed", menu=menu, target=t, cache=cache)) for t in targets]
    pool.shutdown()

    rec = record()
    d, l = EVAL_DEFAULTS[0], EVAL_DEFAULTS[1]
    print(f"# {rec['command']}")
    print(f"# commit {rec['commit']}, {rec['date']}, {args.model}, calibration "
          f"{args.samples}×{args.seq_len} tokens of the calibration mix, KL on {args.tokens} tokens per text (ctx "
          f"{args.ctx}), {args.threads} threads; this run {time.perf_counter() - t_start:.0f} s (cached rows not re-run; "
          f"each row's own commit and date in its last column)")
    print()
    head = ["target"] + [f"{m}: bpw, KL (ratio)" for m in menus] + ["best uniform ≤ target", "its bpw, KL"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, t in enumerate(targets):
        best = min((u for u in uniform if u["bpw"] <= t + 1e-9), key=lambda u: u["kl"], default=None)
        cells = [f"{t:g}"]
        for m in menus:
            r = mixed[m][i][1]
            if "infeasible" in r:
                cells.append("below the menu's cheapest")
                continue
            ratio = "" if best is None else f" ({r['kl'] / best['kl']:.2f}{' ✓' if r['kl'] <= args.goal * best['kl'] else ' ✗'})"
            cells.append(f"{r['bpw']:.3f}, {r['kl']:.4f}{ratio}")
        cells += ["—", "—"] if best is None else [best["label"], f"{best['bpw']:.3f}, {best['kl']:.4f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\n(ratio: KL(mixed) / KL(best uniform at equal or lower bpw); ✓: ≤ {args.goal}; KL the mean of {d} and {l})\n")
    print(f"| point | bpw | KL {d} / {l} (mean) | predicted ΔKL | time (of which allocation), peak RSS | measured |")
    print("|---|---|---|---|---|---|")
    for r in uniform + [r for m in menus for _, r in mixed[m] if "infeasible" not in r]:
        a = r.get("alloc") or {}
        pred = f"{a['predicted_dkl']:.4f}" if a else "—"
        print(f"| {r['label']} | {r['bpw']:.3f} | {r[f'kl:{d}']:.4f} / {r[f'kl:{l}']:.4f} ({r['kl']:.4f}) | {pred} | "
              f"{r['seconds']:.0f} s ({r['alloc_seconds']:.0f} s), {_gib(r['peak_rss_bytes'])} | {_provenance(r)} |")
    print()
    print("| menu | sensitivity table: options measured, time, peak RSS | measured |")
    print("|---|---|---|")
    for m in menus:
        r = sens[m]
        print(f"| {m} | {r['options']}, {r['seconds']:.0f} s, {_gib(r['peak_rss_bytes'])} | {_provenance(r)} |")
    print()
    for m in menus:
        for t, r in mixed[m]:
            print(f"mixed {m} {t:g}: " + (r["infeasible"] if "infeasible" in r else f"options {r['alloc']['options']}"))


if __name__ == "__main__":
    main()
