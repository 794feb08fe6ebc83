"""Low-rank benchmark on SmolLM2-135M: plain, randomized, ASVD and whitened SVD; GPTQ ± LQER.

    .venv/bin/python bench/lowrank.py                          # everything below (long on 2 cores)
    .venv/bin/python bench/lowrank.py --removed 0.2 --methods svd,whiten --no-lqer

For each fraction of linear-layer parameters *removed* (10 %, 20 %, 40 %: ``factorize`` ratio =
1 − removed, uniform allocation, embeddings/head kept) and each method, factorize SmolLM2-135M
through the sequential pipeline and judge it with ``llmpress.evaluate`` against the original:
perplexity and top-128 KL per token on the held-out texts ``llmpress.text.EVAL_DEFAULTS``
(debian-handbook + linux-doc; calibration is the separate ``calib-mix``). Time: the whole
factorize run (calibration passes for whiten/asvd included) and, separately, the sum of the
per-layer encode times (the SVDs themselves), all with ``--threads`` torch threads.

Then, at (nearly) equal bits per weight: 3-bit GPTQ with groups of 64 (3.5 bpw) against 3-bit
GPTQ with groups of 128 plus a whitened low-rank correction of its error (``lqer``) whose float16
factors take 1/64 of each layer's parameter count (+0.25 bpw). bpw is measured, not assumed.

Checks printed at the end (targets of issue 5): whitened SVD's PPL increase at 20 % ≤ 1/10 of
plain SVD's; randomized SVD's KL within 2 % of exact SVD's, in less time; GPTQ+LQER's KL below
GPTQ's. Results: a table on stdout and ``bench/out/lowrank.json`` (written after every point;
a rerun with the same settings skips the points already there).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))
from _record import record  # noqa: E402
MODEL = "smollm2-135m"
KEYS = ("ppl", "ref_ppl", "kl_mean", "kl_median", "kl_p99", "top1", "bpw")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--removed", default="0.1,0.2,0.4", help="fractions of linear-layer parameters removed")
    p.add_argument("--methods", default="svd,rsvd,asvd,whiten,whiten@budget",
                   help="low-rank codecs; METHOD@budget = budgeted allocation of the same total; METHOD:key=value:… "
                        "passes codec params (e.g. rsvd:crossover=1 never hands over to exact SVD)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (whiten, asvd, gptq, lqer)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (split over the texts; ≥ ctx per text)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--no-lqer", action="store_true", help="skip the GPTQ ± low-rank correction comparison")
    p.add_argument("--timing", action="store_true", help="measure the SVD timing table again (else reuse the saved one)")
    p.add_argument("--alloc-mem", choices=("all", "blocks"),
                   help="only measure the peak memory of the budget's sensitivity pass (all layers at once | block by block)")
    p.add_argument("--json", default=str(OUT / "lowrank.json"))
    return p.parse_args()


def _evaluate(out: Path, ref: Path, a: argparse.Namespace) -> dict:
    from llmpress.eval import evaluate

    ev = evaluate(str(out), reference=str(ref), tokens=a.tokens, ctx=a.ctx)
    return {k: ev.get(k) for k in KEYS}


def _factorize_point(method: str, removed: float, ref: Path, a: argparse.Namespace) -> dict:
    import llmpress

    out = OUT / "lowrank-work" / f"{method.replace('@', '-').replace(':', '-')}-{removed}"
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] factorize {method} {removed}", file=sys.stderr, flush=True)
    spec, *kvs = method.split(":")  # "whiten:solver=randomized:crossover=1": codec params
    codec, _, allocation = spec.partition("@")  # "whiten@budget": budgeted allocation
    params = {k: _value(v) for k, _, v in (x.partition("=") for x in kvs)}
    res = llmpress.factorize(MODEL, out, method=codec, ratio=round(1 - removed, 6), samples=a.samples,
                             seq_len=a.seq_len, force=True, progress=False, allocation=allocation or "uniform", **params)
    secs = time.perf_counter() - t0
    enc = sum(r.get("seconds", 0.0) for r in res["layers"].values() if r["codec"] != "keep")
    print(f"[{time.strftime('%H:%M:%S')}] factorized in {secs:.0f} s; evaluating", file=sys.stderr, flush=True)
    solvers = res.get("solvers", {})
    row = {"kind": "lowrank", "method": method, "removed": removed, "params_kept": res["params_kept"],
           "randomized_layers": solvers.get("randomized", 0), "exact_layers": solvers.get("exact", 0),
           "dense_layers": len(res["dense_layers"]), "seconds": secs, "encode_seconds": enc, **_evaluate(out, ref, a)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def _value(v: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _quant_point(name: str, rule: dict, ref: Path, a: argparse.Namespace) -> dict:
    import llmpress
    from llmpress.recipe import Recipe

    out = OUT / "lowrank-work" / name
    method = rule.pop("method")
    t0 = time.perf_counter()
    res = llmpress.compress(MODEL, Recipe.uniform(method, **rule), out, samples=a.samples, seq_len=a.seq_len,
                            force=True, progress=False)
    row = {"kind": "quant", "method": name, "removed": None, "params_kept": None, "seconds": time.perf_counter() - t0,
           "encode_seconds": sum(r.get("seconds", 0.0) for r in res["layers"].values() if r["codec"] != "keep"),
           **_evaluate(out, ref, a)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def _svd_timing() -> list[dict]:
    """Exact vs randomized truncated SVD on block 4's four weight shapes, by rank: CPU time
    (``time.process_time``, best of 3; one thread, so other processes on the machine do not
    count) and the truncation error ‖W − W_k‖²/‖W‖² of each. Ranks: 32, 64, 128 and those of
    10 %, 20 %, 40 % removed. Randomized variants: the former default (p = 10, 2 power
    iterations), the default (p = max(10, ⌈k/2⌉), 2 iterations) forced, and the default as the
    ``rsvd`` codec runs it (exact SVD past the crossover)."""
    from llmpress.lowrank.allocate import rank_for_ratio
    from llmpress.lowrank.svd import truncated_svd
    from llmpress.models import TensorStore, resolve

    store = TensorStore(resolve(MODEL))
    variants = {"exact": {}, "rand p10 q2 (old)": {"solver": "randomized", "oversample": 10, "crossover": 1.0},
                "rand default forced": {"solver": "randomized", "crossover": 1.0},
                "rsvd default": {"solver": "randomized"}}
    rows = []
    for layer in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
        w = store.get(f"model.layers.4.{layer}.weight").float()
        m, n = w.shape
        for k in sorted({32, 64, 128} | {rank_for_ratio(m, n, r) for r in (0.9, 0.8, 0.6)}):
            for name, kw in variants.items():
                best = float("inf")
                for _ in range(3):
                    t0 = time.process_time()
                    tr = truncated_svd(w, rank=k, **kw)
                    best = min(best, time.process_time() - t0)
                rows.append({"layer": layer, "shape": [m, n], "rank": k, "solver": name, "ran": tr.solver,
                             "seconds": best, "err": tr.tail / tr.energy_total})
    return rows


def _print_timing(timing: list[dict]) -> None:
    print("exact vs randomized truncated SVD, model.layers.4.* of SmolLM2-135M: CPU s (best of 3, 1 thread), "
          "‖W−W_k‖²/‖W‖² and its excess over exact")
    exact = {(t["layer"], t["rank"]): t for t in timing if t["solver"] == "exact"}
    for t in timing:
        e = exact[(t["layer"], t["rank"])]
        m, n = t["shape"]
        print(f"  {t['layer']:<17} {m:>4}×{n:<4} k {t['rank']:>4}  {t['solver']:<20} ran {t['ran']:<10} "
              f"{t['seconds'] * 1e3:7.1f} ms ({t['seconds'] / e['seconds']:.2f}× exact)  err {t['err']:.5f} "
              f"({t['err'] / e['err'] - 1:+.2%})")


def _fmt(x, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else format(x, f">{width}{spec}")


def _table(rows: list[dict]) -> str:
    cols = [("method", 22), ("removed", 8), ("kept", 7), ("bpw", 7), ("ppl", 11), ("ΔPPL", 11), ("KL mean", 9),
            ("KL p99", 8), ("top1", 7), ("time s", 8), ("svd s", 7)]
    head = "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(cols))
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["kind"] == "error":
            continue
        d = None if r.get("ppl") is None or r.get("ref_ppl") is None else r["ppl"] - r["ref_ppl"]
        lines.append(f"{r['method']:<22}{_fmt(r['removed'], '.0%', 8)}{_fmt(r['params_kept'], '.3f', 7)}"
                     f"{_fmt(r['bpw'], '.2f', 7)}{_fmt(r['ppl'], '.5g', 11)}{_fmt(d, '.5g', 11)}"
                     f"{_fmt(r['kl_mean'], '.4f', 9)}{_fmt(r['kl_p99'], '.3f', 8)}{_fmt(r['top1'], '.3f', 7)}"
                     f"{_fmt(r['seconds'], '.0f', 8)}{_fmt(r['encode_seconds'], '.0f', 7)}")
    return "\n".join(lines)


def _checks(rows: list[dict]) -> list[str]:
    by = {(r["method"], r["removed"]): r for r in rows if r["kind"] != "error"}
    out = []
    s, w = by.get(("svd", 0.2)), by.get(("whiten", 0.2))
    if s and w:
        ds, dw = s["ppl"] - s["ref_ppl"], w["ppl"] - w["ref_ppl"]
        out.append(f"whiten ΔPPL at 20 % = {dw:.3f} vs plain SVD {ds:.3f}: ratio {dw / ds:.2e} "
                   f"(target ≤ 0.1) -> {'MET' if dw <= 0.1 * ds else 'MISSED'}")
    pairs = [(r["method"].split(":")[0].replace("rsvd", "svd"), r["method"]) for r in rows
             if r["kind"] == "lowrank" and (r["method"].startswith("rsvd") or "randomized" in r["method"])]
    for removed in sorted({r["removed"] for r in rows if r["removed"] is not None}):
        for base, rand in dict.fromkeys(pairs):
            s, q = by.get((base, removed)), by.get((rand, removed))
            if not (s and q):
                continue
            rel = q["kl_mean"] / s["kl_mean"] - 1
            ran = f"{q['randomized_layers']} of {q['randomized_layers'] + q['exact_layers']} layers randomized" \
                if q.get("randomized_layers") is not None else "layers randomized: not recorded"
            out.append(f"{rand} vs {base} at {removed:.0%}: KL {q['kl_mean']:.4f} vs {s['kl_mean']:.4f} ({rel:+.2%}, "
                       f"target ≤ +2 %) -> {'MET' if rel <= 0.02 else 'MISSED'}; SVD time {q['encode_seconds']:.1f} s vs "
                       f"{s['encode_seconds']:.1f} s ({q['encode_seconds'] / max(s['encode_seconds'], 1e-9):.2f}×); {ran}")
    g, c = by.get(("gptq-3b-g64", None)), by.get(("gptq-3b-g128+lqer", None))
    if g and c:
        out.append(f"GPTQ 3-bit {g['bpw']:.3f} bpw KL {g['kl_mean']:.4f} vs GPTQ 3-bit + LQER {c['bpw']:.3f} bpw KL "
                   f"{c['kl_mean']:.4f} -> {'MET' if c['kl_mean'] < g['kl_mean'] else 'MISSED'}"
                   f" (bpw difference {c['bpw'] - g['bpw']:+.3f})")
    return out


def _alloc_memory(mode: str, a: argparse.Namespace) -> None:
    """Peak memory of measuring every layer's whitened spectrum for ``--allocation budget``:
    ``all`` = every layer's Stats collected first (the former way), ``blocks`` = block by block
    (``api.layer_spectra``). Prints the peak bytes of live Gram matrices (counted at every
    Stats.add), the process's peak RSS and a checksum of the allocated ranks. Run each mode in
    its own process (peak RSS is per process)."""
    import re
    import resource
    import weakref

    import torch

    from llmpress import pipeline
    from llmpress import skeleton as sk
    from llmpress.lowrank import allocate, api
    from llmpress.models import TensorStore, resolve
    from llmpress.tensor import Stats, get_codec

    kw = {"samples": a.samples, "seq_len": a.seq_len, "progress": False}
    live: list[weakref.ref] = []
    peak = [0]
    init, add = Stats.__init__, Stats.add

    def look() -> None:
        peak[0] = max(peak[0], sum(st.gram.numel() * 8 for r in live if (st := r()) is not None and st.gram is not None))

    def init_(st, *args, **kws):
        init(st, *args, **kws)
        live.append(weakref.ref(st))

    def add_(st, *args, **kws):
        add(st, *args, **kws)
        look()

    Stats.__init__, Stats.add = init_, add_
    t0 = time.perf_counter()
    if mode == "all":
        src = resolve(MODEL)
        store, skel = TensorStore(src), sk.build_meta(sk.folder_config(src.folder))
        names = [n for n in sk.linear_names(skel) if not re.search(api.KEEP_DEFAULT, n)]
        stats = pipeline.collect_stats(MODEL, match="|".join(allocate.exact_rule(n) for n in names), **kw)
        look()
        codec, spectra = get_codec("whiten"), []
        for n in names:
            w = store.get(f"{n}.weight").float()
            x = codec.transform(w, stats.pop(n), **codec.extra).apply(w.double())
            spectra.append(allocate.LayerSpectrum(n, *w.shape, torch.linalg.svdvals(x) ** 2, float((x * x).sum())))
    else:
        spectra = api.layer_spectra(MODEL, "whiten", **kw)
    ranks = allocate.allocate_budget(spectra, 0.8, floor=0.1)
    print(f"{mode}: peak live Gram matrices {peak[0] / 2**20:.1f} MiB, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB, {time.perf_counter() - t0:.0f} s, "
          f"{len(spectra)} layers, rank sum at 20 % removed {sum(k or 0 for k in ranks.values())}")


def main() -> None:
    a = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)
    if a.alloc_mem:
        _alloc_memory(a.alloc_mem, a)
        return
    from llmpress.models import resolve

    ref = resolve(MODEL).path
    settings = {"samples": a.samples, "seq_len": a.seq_len, "tokens": a.tokens, "ctx": a.ctx, "threads": a.threads}
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(path.read_text()) if path.exists() else {}
    rows: list[dict] = [r for r in prev.get("rows", []) if r["kind"] != "error"] if prev.get("settings") == settings else []
    done = {(r["method"], r["removed"]) for r in rows}

    timing: list[dict] = prev.get("svd_timing", [])

    def save() -> None:
        path.write_text(json.dumps({"model": MODEL, "settings": settings, "rows": rows, "svd_timing": timing}, indent=1))

    points: list[tuple[str, float | None, callable]] = []
    for removed in (float(x) for x in a.removed.split(",")):
        for method in a.methods.split(","):
            points.append((method, removed, lambda m=method, r=removed: _factorize_point(m, r, ref, a)))
    if not a.no_lqer:
        points.append(("gptq-3b-g64", None, lambda: _quant_point(
            "gptq-3b-g64", {"method": "gptq", "bits": 3, "group_size": 64}, ref, a)))
        points.append(("gptq-3b-g128+lqer", None, lambda: _quant_point(
            "gptq-3b-g128+lqer", {"method": "lqer", "quant": "gptq", "bits": 3, "group_size": 128, "ratio": 1 / 64}, ref, a)))
    for method, removed, run in points:
        if (method, removed) in done:
            continue
        t0 = time.perf_counter()
        try:
            rows.append({**record(), **run()})  # each row: the command, commit and date that measured it
        except Exception as e:  # noqa: BLE001 - record and go on with the other points
            rows.append({"kind": "error", "method": method, "removed": removed, "error": f"{type(e).__name__}: {e}",
                         **{k: None for k in (*KEYS, "params_kept", "seconds", "encode_seconds")}})
        print(f"[{time.strftime('%H:%M:%S')}] {method} {removed}: {time.perf_counter() - t0:.0f} s "
              f"{rows[-1].get('error') or ''}", file=sys.stderr, flush=True)
        save()
    if a.timing or not timing or "layer" not in timing[0]:
        timing[:] = _svd_timing()
        save()
    _print_timing(timing)
    print(f"SmolLM2-135M, {a.threads} threads; calibration {a.samples}×{a.seq_len} tokens (calib-mix); "
          f"evaluation {a.tokens} tokens, ctx {a.ctx} (debian-handbook + linux-doc)")
    print(_table(rows))
    for line in _checks(rows):
        print(line)
    for r in rows:
        if r["kind"] == "error":
            print(f"error at {r['method']} {r['removed']}: {r['error']}")
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
