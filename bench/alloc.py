"""Does the allocator's sensitivity predict the judge's KL? Proxy against truth on SmolLM2-135M.

    nice -n 19 env OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/alloc.py --blocks 0,15,29 --samples 8 --seq-len 256

For each chosen (layer, option): the layer alone is replaced by decode(encode(W, option)) with
the real codec and the layer's real calibration Stats, and the true mean KL(original ‖ changed)
is measured on the calibration windows; beside it the Fisher proxy the allocator uses
(``llmpress.sweep.sensitivity``: ½ Σ_i f_i ΔW_i H ΔW_iᵀ) and, for comparison, the layer-local
relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) the previous allocator used. Reported: each pair,
the Pearson and Spearman correlations of log values, the ratio proxy/true (median, range), and
one additivity row (every measured layer changed at once: Σ proxy against the true ΔKL).

With ``--memory`` it measures the allocation's cost instead: ``llmpress compress MODEL --target-bpw T
--menu M`` as a child process (``bench/capped.py``, no cap), its wall time, peak RSS and the recipe it
chose (its sha256 and how many layers took each option); ``--src`` runs another checkout's ``src``
(e.g. main's, for a before/after):

    nice -n 19 env OMP_NUM_THREADS=2 .venv/bin/python bench/alloc.py --memory --menu rtn --target-bpw 3.5
"""
from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rank(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for k, i in enumerate(order):
        r[i] = float(k)
    return r


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = math.sqrt(sum((x - ma) ** 2 for x in a))
    vb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / max(va * vb, 1e-300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--layers", default="self_attn.v_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    ap.add_argument("--options", default="gptq:2:64,gptq:3:128")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="time and peak RSS of `compress --target-bpw` instead")
    ap.add_argument("--menu", default="gptq-quick")
    ap.add_argument("--target-bpw", type=float, default=3.5)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    args = ap.parse_args()
    if args.memory:
        return memory(args)
    torch.set_num_threads(args.threads)

    from llmpress import skeleton as sk
    from llmpress.models import load_model, load_tokenizer
    from llmpress.pipeline import _calib_text, calib_ids, iter_stats
    from llmpress.sweep.menu import Option
    from llmpress.sweep.fisher import fisher_weights
    from llmpress.sweep.sensitivity import log_probs, measured_dkl, predicted_dkl
    from llmpress.tensor import get_codec

    t0 = time.perf_counter()
    blocks = [int(b) for b in args.blocks.split(",")]
    names = [f"model.layers.{b}.{l}" for b in blocks for l in args.layers.split(",")]
    opts = []
    for spec in args.options.split(","):
        m, b, g = spec.split(":")
        opts.append(Option.of(m, bits=int(b), group_size=int(g)))
    ids = calib_ids(load_tokenizer(args.model), _calib_text(None), args.samples, args.seq_len)
    model = load_model(args.model).eval()
    fisher = fisher_weights(args.model, ids)
    t_fisher = time.perf_counter() - t0
    ref = log_probs(model, ids)
    rows, decoded = [], {}
    for stats in iter_stats(args.model, samples=args.samples, seq_len=args.seq_len, progress=False):
        for name in [n for n in names if n in stats]:
            st = stats[name]
            w = sk.linear_weight(sk.get_module(model, name))
            h = st.gram.double()
            rel_den = float(((w.double() @ h) * w.double()).sum())
            for o in opts:
                codec = get_codec(o.method)
                w_hat = codec.decode(codec.encode(w, st, **o.params))
                d = w.double() - w_hat.double()
                rel = float(((d @ h) * d).sum()) / rel_den
                pred = predicted_dkl(w, w_hat, st.gram, st.n, fisher[name])
                true = measured_dkl(model, ids, {name: w_hat}, ref=ref)
                rows.append((name, o.label, pred, true, rel))
                decoded.setdefault(o.label, {})[name] = w_hat
                print(f"{name:34s} {o.label:14s} proxy {pred:.5f}  true {true:.5f}  ratio {pred / true:6.2f}  rel.err {rel:.4f}",
                      flush=True)
    first = opts[0].label
    together = measured_dkl(model, ids, decoded[first], ref=ref)
    summed = sum(p for _, lab, p, _, _ in rows if lab == first)
    summed_true = sum(t for _, lab, _, t, _ in rows if lab == first)

    lp, lt, lr = ([math.log(max(r[i], 1e-12)) for r in rows] for i in (2, 3, 4))
    ratios = sorted(r[2] / r[3] for r in rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print()
    print(f"# {' '.join(sys.argv)}")
    print(f"# commit {commit}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.model}, "
          f"{args.samples}×{args.seq_len} calibration tokens (Fisher and truth on the same), {args.threads} threads, "
          f"{time.perf_counter() - t0:.0f} s (Fisher pass {t_fisher:.0f} s)")
    print("| predictor of the true ΔKL | Pearson (log) | Spearman |")
    print("|---|---|---|")
    print(f"| Fisher proxy ½Σ f_i ΔW_i H ΔW_iᵀ | {_pearson(lp, lt):.3f} | {_pearson(_rank(lp), _rank(lt)):.3f} |")
    print(f"| relative output error (previous allocator) | {_pearson(lr, lt):.3f} | {_pearson(_rank(lr), _rank(lt)):.3f} |")
    print(f"proxy/true over {len(rows)} pairs: median {ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}–{ratios[-1]:.2f}")
    print(f"additivity ({len(decoded[first])} layers at {first} together): true {together:.4f}, Σ true alone "
          f"{summed_true:.4f}, Σ proxy {summed:.4f}")


def memory(args: argparse.Namespace) -> None:
    """One allocation run as a child process: its seconds, peak RSS and the recipe it chose."""
    sys.path.insert(0, str(Path(__file__).parent))
    from capped import make_cap, run

    src = Path(args.src).resolve()
    with tempfile.TemporaryDirectory(prefix="alloc-mem.") as tmp:
        out = Path(tmp) / "out"
        argv = [sys.executable, "-m", "llmpress", "compress", args.model, "-o", str(out), "--target-bpw",
                str(args.target_bpw), "--menu", args.menu, "--json"]
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
        res = run(argv, make_cap("none", 0), env=env)
        if res.rc != 0:
            sys.exit(f"compress failed ({res.rc}): {res.stderr[-2000:]}")
        rules = json.loads((out / "llmpress.json").read_text())["recipe"]["rules"]
    recipe = json.dumps(rules, sort_keys=True)
    counts = collections.Counter(
        f"{r['method']}:{r.get('bits', '')}:{r.get('group_size', '')}" for r in rules if r["method"] != "keep")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=src).stdout.strip()
    print(f"# llmpress {' '.join(argv[3:])}  (PYTHONPATH={src}, OMP_NUM_THREADS={args.threads})")
    print(f"# commit {commit} of {src}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| seconds | peak RSS GiB | recipe sha256 | layers per option |")
    print("|---|---|---|---|")
    print(f"| {res.seconds:.0f} | {res.peak_rss_bytes / (1 << 30):.2f} | {hashlib.sha256(recipe.encode()).hexdigest()[:12]} | "
          f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} |")


if __name__ == "__main__":
    main()
