#!/usr/bin/env python
"""Recovery training on SmolLM2-135M: how much of the KL gap a fixed CPU budget wins back.

For each case (3-bit RTN, 2-bit GPTQ, whitened SVD with 40 % of the linear parameters removed)
the model is compressed once (cached under bench/out/finetune/), then fine-tuned by
``llmpress.finetune`` for ``--minutes`` of training time (evaluation excluded) on the
calibration corpus, distilling from the original. KL to the original and perplexity are
measured on the held-out evaluation corpora (debian-handbook + linux-doc, never trained on)
before, during (the curve) and after (the re-packed folder, loaded back from disk), beside the
stored size before and after.

    .venv/bin/python bench/finetune.py                       # all cases, 20 minutes each
    .venv/bin/python bench/finetune.py --minutes 2 --cases rtn3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import llmpress  # noqa: E402
from llmpress.eval.causal import Reference  # noqa: E402
from llmpress.eval.cost import fingerprint_path  # noqa: E402
from llmpress.eval.windows import tokenizer_sha256  # noqa: E402
from llmpress.io.folder import read_manifest  # noqa: E402
from llmpress.models import load_tokenizer, resolve  # noqa: E402
from llmpress.pipeline import compress  # noqa: E402
from llmpress.recipe import Recipe  # noqa: E402
from llmpress.sweep.points import method_defaults  # noqa: E402
from llmpress.recovery.loop import CLOCKS  # noqa: E402
from llmpress.text import CALIB_DEFAULT, EVAL_DEFAULTS  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(OUT.parent))
from _record import record  # noqa: E402
MODEL = "smollm2-135m"

# name -> (recipe, lr of factors, lr of scales and offsets); QAT codes move at --code-lr steps/step
CASES = {
    "rtn3": (Recipe.uniform("rtn", bits=3, group_size=64), 1e-5, 2e-4),
    "gptq2": (Recipe.uniform("gptq", bits=2, group_size=64), 1e-5, 2e-4),  # GPTQ's default grid (asymz, clipped)
    # as measured before GPTQ's default grid changed: float offset, min–max ranges
    "gptq2-asym": (Recipe.uniform("gptq", bits=2, group_size=64, grid="asym", range="minmax"), 1e-5, 2e-4),
    "whiten40": (Recipe.uniform("whiten", ratio=0.6), 5e-5, None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--minutes", type=float, default=20.0, help="training time per case (evaluation excluded)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                    help="cpu (default): CPU time / threads, the same budget when other jobs share the machine; wall: elapsed")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="scored evaluation tokens (windows of 512)")
    ap.add_argument("--curve-points", type=int, default=4, help="evaluations during training")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens (gptq, whiten)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--code-lr", type=float, default=2e-2, help="QAT latent learning rate, in quantization steps")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps of the learning rate")
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                    help="cosine: decays over --minutes (llmpress's default); constant: the rate of the earlier runs")
    ap.add_argument("--holdout", type=int, default=8, help="training-text windows held out to keep the best state (0: none)")
    ap.add_argument("--patience", type=int, default=4, help="validations without a better held-out loss before stopping (0: never)")
    ap.add_argument("--keep-last", action="store_true", help="end with the last state, not the best held-out one")
    ap.add_argument("--qparams-only", action="store_true", help="QAT trains scales/offsets only (codes move through them)")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="multiply every case's learning rates")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = OUT / "finetune"
    work.mkdir(parents=True, exist_ok=True)
    ref_dir = resolve(MODEL).path
    tok = load_tokenizer(ref_dir)
    sha = tokenizer_sha256(tok)
    original = llmpress.load(ref_dir)
    ref = Reference.build(original, tok, list(EVAL_DEFAULTS), ctx=512, tokens=args.eval_tokens, name=MODEL,
                          fingerprint=fingerprint_path(ref_dir))
    del original
    results = []
    for name in args.cases:
        recipe, lr, qlr = CASES[name]
        # the cached compressed model is keyed by the recipe and its methods' defaults, so a changed
        # default (GPTQ's grid) compresses again instead of reusing the old folder
        key = json.dumps({"recipe": recipe.to_dict(), "defaults": method_defaults(recipe.to_dict()),
                          "samples": args.samples}, sort_keys=True, default=str)
        comp = work / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        if not comp.exists():
            print(f"[{name}] compressing …", file=sys.stderr)
            compress(MODEL, recipe, comp, samples=args.samples, seq_len=512)
        t0 = time.perf_counter()
        before = ref.compare(llmpress.load(comp), sha)
        print(f"[{name}] before: KL {before['kl_mean']:.4f}  PPL {before['ppl']:.2f} (original {before['ref_ppl']:.2f})", file=sys.stderr)
        curve = [{"step": 0, "train_seconds": 0.0, "kl_mean": before["kl_mean"], "ppl": before["ppl"]}]
        budget = args.minutes * 60
        now = CLOCKS[args.clock]
        clock = {"start": now(), "eval": 0.0, "next": budget / args.curve_points}

        def on_step(step: int, loss: float, model: torch.nn.Module) -> None:
            trained = now() - clock["start"] - clock["eval"]
            if trained < clock["next"] or trained >= budget:
                return
            te = now()
            model.eval()
            r = ref.compare(model, sha)
            model.train()
            curve.append({"step": step, "train_seconds": trained, "loss": loss, "kl_mean": r["kl_mean"], "ppl": r["ppl"]})
            print(f"[{name}] step {step} ({trained:.0f} s): loss {loss:.4f}  KL {r['kl_mean']:.4f}  PPL {r['ppl']:.2f}", file=sys.stderr)
            clock["next"] += budget / args.curve_points
            clock["eval"] += now() - te

        ft = work / f"{comp.name}-ft"
        run = llmpress.finetune(comp, ft, reference=MODEL, text=CALIB_DEFAULT, steps=args.max_steps,
                                lr=lr * args.lr_scale, qparam_lr=qlr * args.lr_scale if qlr else None, code_lr=args.code_lr,
                                seq_len=args.seq_len, batch_size=args.batch_size, max_seconds=budget, clock=args.clock,
                                schedule=args.schedule, force=True, on_step=on_step, checkpoint_every=0,
                                holdout=args.holdout, patience=args.patience, keep_best=not args.keep_last,
                                grad_ckpt=False, train_latent=not args.qparams_only, warmup=args.warmup)
        after = ref.compare(llmpress.load(ft), sha)
        curve.append({"step": run["steps"], "train_seconds": budget, "loss": run["loss_last"], "kl_mean": after["kl_mean"], "ppl": after["ppl"]})
        mb, ma = read_manifest(comp), read_manifest(ft)
        res = {
            **record(),
            "case": name, "recipe": recipe.to_dict(), "lr": lr * args.lr_scale, "qparam_lr": qlr and qlr * args.lr_scale, "code_lr": args.code_lr,
            "minutes": args.minutes, "train_latent": not args.qparams_only, "steps": run["steps"], "tokens_trained": run["steps"] * args.batch_size * args.seq_len,
            "kl_before": before["kl_mean"], "kl_after": after["kl_mean"], "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "ref_ppl": before["ref_ppl"], "top1_before": before["top1"], "top1_after": after["top1"],
            "recovered": (before["kl_mean"] - after["kl_mean"]) / before["kl_mean"],
            "bpw_before": mb["bpw"], "bpw_after": ma["bpw"], "bytes_before": mb["bytes_out"], "bytes_after": ma["bytes_out"],
            "loss_first": run["loss_first"], "loss_last": run["loss_last"], "curve": curve,
            "schedule": args.schedule, "held_out": run.get("held_out"), "best_step": run.get("best_step"),
            "kept_best": run.get("kept_best"), "stopped_early": run.get("stopped_early"),
            "final_over_curve_min": after["kl_mean"] / min(c["kl_mean"] for c in curve[:-1]),
            "train_text": CALIB_DEFAULT, "eval_text": list(EVAL_DEFAULTS), "overlap": run["overlap"],
            "seconds": time.perf_counter() - t0, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": args.threads, "clock": args.clock, "protocol": ref.protocol.to_dict(),
        }
        results.append(res)
        _save(res)
    _table(results)
    print(f"\nwritten {OUT / 'finetune.json'}")


def _save(res: dict) -> None:
    """Merge one case's result into bench/out/finetune.json (other cases' results stay)."""
    path = OUT / "finetune.json"
    old = json.loads(path.read_text())["results"] if path.exists() else []
    merged = [r for r in old if r["case"] != res["case"]] + [res]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": MODEL, "results": merged}, indent=1))
    tmp.replace(path)


def _table(results: list[dict]) -> None:
    head = f"{'case':10} {'bpw':>6} {'bytes before→after':>23} {'KL before→after':>17} {'recov':>6} {'PPL before→after (orig)':>25} {'steps':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['case']:10} {r['bpw_after']:6.3f} {r['bytes_before']:>11,}→{r['bytes_after']:<11,} "
              f"{r['kl_before']:7.4f}→{r['kl_after']:<7.4f} {100 * r['recovered']:5.1f}% "
              f"{r['ppl_before']:8.2f}→{r['ppl_after']:<7.2f} ({r['ref_ppl']:.2f}) {r['steps']:6d}")
        if r.get("peak_rss_bytes"):
            print(f"  time {r['seconds']:.0f} s (training, evaluations and the re-pack; {r['minutes']:g} {r['clock']}-minutes of "
                  f"training), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB (the process's, the reference included)")
        print("  curve (step: KL): " + ", ".join(f"{c['step']}: {c['kl_mean']:.4f}" for c in r["curve"]))
        if r.get("final_over_curve_min") is not None:
            print(f"  final KL / the curve's minimum before it: {r['final_over_curve_min']:.3f} "
                  f"({r.get('schedule')} schedule; best held-out step {r.get('best_step')}, kept: {r.get('kept_best')}, "
                  f"stopped early: {r.get('stopped_early')})")


if __name__ == "__main__":
    main()
