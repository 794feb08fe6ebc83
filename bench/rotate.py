"""Fused rotation before quantizing: KL to the original with and without ``--rotate``, side by side.

    nice -n 19 .venv/bin/python bench/rotate.py                      # SmolLM2-135M: GPTQ 3-bit g64, 2-bit g64, Q3_K_M mix (8×512 calibration)
    nice -n 19 .venv/bin/python bench/rotate.py --cases gptq3 --variants none,residual,full

Each case is quantized once per variant — ``none`` (no rotation), ``residual`` (the residual
stream alone, ``rotate={"heads": False}``), ``full`` (residual + each head's V→O rotation,
``--rotate``'s default), ``full+mlp`` (and an online Hadamard before down_proj, ``--rotate-mlp``)
— and judged by ``llmpress.evaluate`` (KL to the original, cached reference)
on each held-out text (debian-handbook, linux-doc). Prints one table: case, variant, bpw, KL per
text, their mean, the ratio to the case's unrotated mean (issue 16's target: ≤ 0.7), and the
quantization's seconds. Results are cached in ``bench/out/rotate.json`` keyed by case, variant and
protocol (a re-run resumes).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

CASES: dict[str, dict] = {
    "gptq3-g64": {"method": "gptq", "bits": 3, "group_size": 64},
    "gptq2-g64": {"method": "gptq", "bits": 2, "group_size": 64},
    "gptq-q3_k_m": {"method": "gptq", "gguf_mix": "q3_k_m"},
    "rtn3-g64": {"method": "rtn", "bits": 3, "group_size": 64},
}
VARIANTS: dict[str, object] = {"none": False, "residual": {"heads": False}, "full": True,
                               "full+mlp": {"mlp": True}}
FLAGS = {"none": "", "residual": " --rotate (heads=False: API)", "full": " --rotate", "full+mlp": " --rotate-mlp"}


def _command(model: str, case: dict, variant: str) -> str:
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in case.items())
    return f"llmpress quantize {model} -o OUT {opts}{FLAGS[variant]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--cases", default="gptq3-g64,gptq2-g64,gptq-q3_k_m")
    ap.add_argument("--variants", default="none,residual,full")
    ap.add_argument("--texts", default="debian-handbook,linux-doc")
    ap.add_argument("--tokens", type=int, default=8192, help="scored tokens per text")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (bench/quant.py's protocol)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="the rotation's seed")
    a = ap.parse_args()

    import torch

    import llmpress

    cases, variants, texts = a.cases.split(","), a.variants.split(","), a.texts.split(",")
    cache_file = HERE / "out" / "rotate.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    protocol = f"{a.model}|s{a.samples}|l{a.seq_len}|t{a.tokens}|seed{a.seed}|threads{torch.get_num_threads()}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"# {' '.join(sys.argv)}\n# commit {commit}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}, "
          f"{torch.get_num_threads()} threads, calibration {a.samples}×{a.seq_len}, {a.tokens} tokens per text")
    for c in cases:
        for v in variants:
            key = f"{c}|{v}|{protocol}"
            if key in cache and all(t in cache[key]["kl"] for t in texts):
                continue
            rot = VARIANTS[v]
            if isinstance(rot, dict):
                rot = {**rot, "seed": a.seed}
            elif rot:
                rot = {"seed": a.seed}
            with tempfile.TemporaryDirectory(dir=HERE / "out") as tmp:
                out = Path(tmp) / "q"
                res = llmpress.quantize(a.model, out, samples=a.samples, seq_len=a.seq_len, rotate=rot, progress=False,
                                        **CASES[c])
                kl = {t: llmpress.evaluate(out, a.model, t, tokens=a.tokens)["kl_mean"] for t in texts}
            quant = [r for r in res["layers"].values() if r["codec"] != "keep"]
            row = {"bpw": res["bpw"], "bpw_quantized": sum(r["bits"] for r in quant) / sum(r["numel"] for r in quant),
                   "bytes_out": res["bytes_out"], "seconds": res["seconds"], "kl": kl, "command": _command(a.model, CASES[c], v),
                   "rotation": res.get("rotation"), "commit": commit,
                   "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}"}
            cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}  # another run may have added rows
            cache[key] = row
            tmp_file = cache_file.with_suffix(".tmp")
            tmp_file.write_text(json.dumps(cache, indent=1))
            tmp_file.replace(cache_file)
            print(f"# done {c} {v}: {kl}", flush=True)

    cache = json.loads(cache_file.read_text())
    table = {"command": " ".join(sys.argv), "commit": commit, "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
             "protocol": protocol, "rows": {f"{c}|{v}": cache[f"{c}|{v}|{protocol}"] for c in cases for v in variants}}
    for c in cases:
        base = table["rows"].get(f"{c}|none")
        for v in variants:
            r = table["rows"][f"{c}|{v}"]
            r["kl_mean"] = sum(r["kl"][t] for t in texts) / len(texts)
            if base:
                r["ratio_to_unrotated"] = r["kl_mean"] / (sum(base["kl"][t] for t in texts) / len(texts))
    tmp_table = HERE / "out" / "rotate-table.tmp"
    tmp_table.write_text(json.dumps(table, indent=1))
    tmp_table.replace(HERE / "out" / "rotate-table.json")
    print(f"\n| case | rotation | bpw | {' | '.join(f'KL {t}' for t in texts)} | KL mean | × unrotated | seconds |")
    print(f"|---|---|---|{'---|' * len(texts)}---|---|---|")
    for c in cases:
        base = cache.get(f"{c}|none|{protocol}")
        base_mean = sum(base["kl"][t] for t in texts) / len(texts) if base else None
        for v in variants:
            r = cache[f"{c}|{v}|{protocol}"]
            mean = sum(r["kl"][t] for t in texts) / len(texts)
            ratio = f"{mean / base_mean:.3f}" if base_mean else "—"
            kls = " | ".join(f"{r['kl'][t]:.4f}" for t in texts)
            print(f"| {c} | {v} | {r['bpw']:.3f} | {kls} | {mean:.4f} "
                  f"| {ratio} | {r['seconds']:.0f} |")
    print("\nbpw counts every linear kept as stored: a rotated tied model whose final norm is not the identity "
          "stores an untied head (vocab × hidden, the source's dtype), which the unrotated tied model does not.")
    print("\ncommands:")
    for c in cases:
        for v in variants:
            print(f"  {c}/{v}: {cache[f'{c}|{v}|{protocol}']['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
