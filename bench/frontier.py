"""The frontier's first rows: allocation (gptq menu) at a few bpw against the best uniform GPTQ point.

    nice -n 19 env OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/frontier.py --targets 3.0,3.5,4.0

On SmolLM2-135M: the uniform GPTQ points (``--uniform``) and the mixed points (``compress
--target-bpw``, the gptq menu, one sensitivity table for all targets) are compressed with the same
calibration windows and judged by ``llmpress.evaluate`` on each evaluation text separately
(debian-handbook, linux-doc: KL to the original, top-128, cached reference). Each mixed target is
set beside the best uniform point at equal or lower bpw (lowest mean KL of the two texts), with the
ratio KL(mixed) / KL(uniform). Time and peak memory of every compression are reported. Results are
kept in ``bench/out/frontier/results.json`` keyed by point and protocol, so a re-run resumes; each
row records the command, commit and date that measured it (``_record.py``).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "frontier"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="3.0,3.5,4.0")
    ap.add_argument("--uniform", default="2:64,3:128,3:64,4:128", help="bits:group of the uniform GPTQ points")
    ap.add_argument("--menu", default="gptq")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per text")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llmpress.eval import evaluate
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe
    from llmpress.sweep.mixed import mixed_recipe
    from llmpress.text import EVAL_DEFAULTS

    OUT.mkdir(parents=True, exist_ok=True)
    proto = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "ctx": args.ctx, "tokens": args.tokens,
             "texts": list(EVAL_DEFAULTS)}
    res_path = OUT / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    t_start = time.perf_counter()

    def run(label: str, make) -> dict:
        key = json.dumps({"label": label, **proto}, sort_keys=True)
        if key in results:
            return results[key]
        t0 = time.perf_counter()
        recipe, alloc = make()
        t_alloc = time.perf_counter() - t0
        out = OUT / label
        s = compress(args.model, recipe, out, calib=None, samples=args.samples, seq_len=args.seq_len, force=True,
                     progress=False)
        row = {**record(), "label": label, "bpw": s["bpw"], "seconds": time.perf_counter() - t0, "alloc_seconds": t_alloc,
               "peak_rss_bytes": _peak(), "alloc": alloc}
        for text in EVAL_DEFAULTS:
            ev = evaluate(str(out), reference=args.model, text=text, ctx=args.ctx, tokens=args.tokens)
            row[f"kl:{text}"] = ev["kl_mean"]
        row["kl"] = sum(row[f"kl:{t}"] for t in EVAL_DEFAULTS) / len(EVAL_DEFAULTS)
        results[key] = row
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
        tmp.replace(res_path)
        print(f"  {label}: bpw {row['bpw']:.3f} KL {row['kl']:.4f} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        return row

    uniform = []
    for spec in args.uniform.split(","):
        b, g = (int(x) for x in spec.split(":"))
        uniform.append(run(f"gptq-w{b}-g{g}", lambda b=b, g=g: (Recipe.uniform("gptq", bits=b, group_size=g), None)))
    cache = OUT / f"sensitivity-{args.menu}-{args.samples}x{args.seq_len}.json"
    mixed = []
    for t in (float(x) for x in args.targets.split(",")):
        mixed.append((t, run(f"mixed-{args.menu}-{t:g}", lambda t=t: mixed_recipe(
            args.model, target_bpw=t, menu=args.menu, samples=args.samples, seq_len=args.seq_len, cache=cache))))

    rec = record()
    d, l = EVAL_DEFAULTS[0], EVAL_DEFAULTS[1]
    print(f"# {rec['command']}")
    print(f"# commit {rec['commit']}, {rec['date']}, {args.model}, calibration "
          f"{args.samples}×{args.seq_len} tokens of the calibration mix, KL on {args.tokens} tokens per text (ctx "
          f"{args.ctx}), {args.threads} threads; this run {time.perf_counter() - t_start:.0f} s (cached rows not re-run)")
    print(f"| target | mixed bpw | mixed KL {d} / {l} (mean) | predicted ΔKL | best uniform ≤ target | its bpw | "
          f"its KL (mean) | ratio | mixed time, peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, m in mixed:
        best = min((u for u in uniform if u["bpw"] <= t + 1e-9), key=lambda u: u["kl"], default=None)
        a = m["alloc"]
        cells = [f"{t:g}", f"{m['bpw']:.3f}", f"{m[f'kl:{d}']:.4f} / {m[f'kl:{l}']:.4f} ({m['kl']:.4f})",
                 f"{a['predicted_dkl']:.4f}"]
        if best is None:
            cells += ["—", "—", "—", "—"]
        else:
            cells += [best["label"], f"{best['bpw']:.3f}", f"{best['kl']:.4f}", f"{m['kl'] / best['kl']:.2f}"]
        cells.append(f"{m['seconds']:.0f} s (allocation {m['alloc_seconds']:.0f} s), {m['peak_rss_bytes'] / 2**30:.2f} GiB")
        print("| " + " | ".join(cells) + " |")
    print()
    print("| uniform point | bpw | KL " + f"{d} / {l} (mean)" + " | time, peak RSS |")
    print("|---|---|---|---|")
    for u in uniform:
        print(f"| {u['label']} | {u['bpw']:.3f} | {u[f'kl:{d}']:.4f} / {u[f'kl:{l}']:.4f} ({u['kl']:.4f}) | "
              f"{u['seconds']:.0f} s, {u['peak_rss_bytes'] / 2**30:.2f} GiB |")
    for t, m in mixed:
        print(f"mixed {t:g}: options {m['alloc']['options']}")


if __name__ == "__main__":
    main()
