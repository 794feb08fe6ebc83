#!/usr/bin/env python
"""The compressed-tensors export on SmolLM2-135M: exact or not, by how much, and how it loads.

For 4-bit g64 RTN on the integer-zero-point grid (``asymz``, GPTQ's default grid) and on the
symmetric grid, the llmpress folder is exported with float32 scales (the default) and with
``dtype=float16``, loaded by plain transformers (``dequantize=True``, or packed for the symmetric
one) and judged by llmpress's judge against the llmpress model itself (mean KL, should be 0) and
against the original (should equal the llmpress model's own KL). Also: the largest difference
between a loaded weight and llmpress's decode, bytes out and export seconds.

    .venv/bin/python bench/export_ct.py [--tokens 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import llmpress  # noqa: E402
from llmpress.targets import ExportSource  # noqa: E402
from llmpress.targets.api import export  # noqa: E402
from llmpress.models import load_tokenizer, resolve  # noqa: E402
from llmpress.tensor import decode  # noqa: E402

OUT = Path(__file__).parent / "out" / "export_ct"
CASES = [  # (label, grid, export dtype, transformers dequantize)
    ("asymz fp32 scales, dequantize=True", "asymz", None, True),
    ("asymz fp16 params, dequantize=True", "asymz", "float16", True),
    ("sym fp32 scales, packed", "sym", None, False),
]


def _load(path: Path, dequantize: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=dequantize)).eval()


def _max_weight_diff(model: torch.nn.Module, folder: Path) -> float:
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2]]))  # a packed model decompresses at its first forward
    worst = 0.0
    with ExportSource(folder) as src:
        for name in src.compressed_names:
            w = model.get_parameter(name).detach().float()
            worst = max(worst, float((w - decode(src.compressed(name))).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    smol = resolve("smollm2-135m").path
    tok = load_tokenizer(smol)
    rows = []
    for label, grid, dtype, deq in CASES:
        q = OUT / f"q-{grid}"
        if not q.exists():
            llmpress.quantize(smol, q, method="rtn", bits=4, group_size=64, grid=grid, progress=False)
        out = OUT / f"ct-{grid}-{dtype or 'float32'}"
        t0 = time.perf_counter()
        rep = export(q, out, format="compressed-tensors", dtype=dtype, force=True)
        secs = time.perf_counter() - t0
        model = _load(out, deq)
        mine = llmpress.load(q)
        vs_llmpress = llmpress.evaluate(model, mine, tokenizer=tok, ref_tokenizer=tok, tokens=args.tokens, cache=False)
        vs_orig = llmpress.evaluate(model, smol, tokenizer=tok, tokens=args.tokens)
        llmp_orig = llmpress.evaluate(mine, smol, tokenizer=tok, tokens=args.tokens)
        rows.append({
            "case": label, "kl_vs_llmpress": vs_llmpress["kl_mean"], "kl_max_vs_llmpress": vs_llmpress["kl_max"],
            "top1_vs_llmpress": vs_llmpress["top1"], "kl_vs_original": vs_orig["kl_mean"],
            "llmpress_kl_vs_original": llmp_orig["kl_mean"], "max_weight_diff": _max_weight_diff(model, q),
            "bytes_out": rep["bytes_out"], "export_seconds": round(secs, 2),
        })
        print(json.dumps(rows[-1]))
    print("| case | KL vs llmpress | KL vs original (llmpress) | max |Δw| | bytes | export s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['kl_vs_llmpress']:.2e} | {r['kl_vs_original']:.5f} ({r['llmpress_kl_vs_original']:.5f}) "
              f"| {r['max_weight_diff']:.2e} | {r['bytes_out']:,} | {r['export_seconds']} |")


if __name__ == "__main__":
    main()
