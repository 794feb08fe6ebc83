"""K-quant grids, layer by layer: RTN / GPTQ / AWQ on llama.cpp's Q2_K..Q6_K grids, SmolLM2-135M.

    OMP_NUM_THREADS=2 .venv/bin/python bench/kquant.py --blocks 0,10,20,29 --samples 8 --seq-len 256

SmolLM2's rows are 576 wide except ``mlp.down_proj``'s (1536 = 6 × 256), so only those take a
K-quant grid (llama.cpp stores the others as Q5_0/Q5_1/Q8_0). For each chosen block's down_proj and
each type × method: the relative output error ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs
(``calib-mix``) and on held-out inputs (``debian-handbook``), bits per weight as stored, seconds,
and whether the packed GGUF blocks dequantize (gguf-py) to llmpress's decode bit for bit (rtn-mse:
RTN with the full K-quant search, ``range: mse``). AWQ here
is the per-layer form (its input scale stored; in the runner it is folded into the previous op).
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time

import gguf
import torch

from llmpress.pipeline import collect_stats
from llmpress.quant.kquant import LAYOUTS
from llmpress.targets.gguf_blocks import pack_blocks
from llmpress.models import TensorStore, resolve
from llmpress.tensor import get_codec


def out_err(w: torch.Tensor, wh: torch.Tensor, H: torch.Tensor) -> float:
    d = w - wh
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,10,20,29")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--types", default=",".join(LAYOUTS))
    ap.add_argument("--methods", default="rtn,rtn-mse,gptq,awq")
    a = ap.parse_args()
    names = [f"model.layers.{int(b)}.mlp.down_proj" for b in a.blocks.split(",")]
    match = "|".join(n.replace(".", r"\.") + "$" for n in names)
    kw = dict(samples=a.samples, seq_len=a.seq_len, match=match, progress=False)
    calib = collect_stats(a.model, **kw)
    held = collect_stats(a.model, calib="debian-handbook", **kw)
    store = TensorStore(resolve(a.model))
    rows = []
    for kind in a.types.split(","):
        for method in a.methods.split(","):
            ec, eh, bpw, secs, exact = [], [], [], 0.0, True
            for n in names:
                w = store.get(n + ".weight").to(torch.float32)
                codec = get_codec(method.split("-")[0])
                extra = {"range": "mse"} if method == "rtn-mse" else {}
                t = time.perf_counter()
                ct = codec.encode(w, None if codec.name == "rtn" else calib[n], grid=f"gguf:{kind}", **extra)
                secs += time.perf_counter() - t
                wh = codec.decode(ct)
                ec.append(out_err(w, wh, calib[n].gram.float()))
                eh.append(out_err(w, wh, held[n].gram.float()))
                bpw.append(sum(v.numel() * v.element_size() * 8 for v in ct.data.values()) / ct.numel())
                if "in_scale" in ct.data:
                    exact = "n/a (in_scale)"
                else:
                    raw, qt = pack_blocks(ct)
                    same = torch.equal(wh, torch.from_numpy(gguf.quants.dequantize(raw, qt)))
                    exact = exact if same else False
            rows.append((kind, method, sum(ec) / len(ec), sum(eh) / len(eh), max(bpw), secs,
                         {True: "yes", False: "NO"}.get(exact, exact)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"$ {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"commit {commit}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch threads {torch.get_num_threads()}, layers {', '.join(names)}")
    print("| type | method | out err (calib) | out err (held-out) | bpw (data) | seconds | GGUF bitwise |")
    print("|---|---|---|---|---|---|---|")
    for kind, method, c, h, b, s, ex in rows:
        print(f"| {kind} | {method} | {c:.5f} | {h:.5f} | {b:.4f} | {s:.2f} | {ex} |")


if __name__ == "__main__":
    main()
