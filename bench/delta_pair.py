#!/usr/bin/env python
"""A realistic fine-tune pair for bench/delta.py: SmolLM2-135M fully fine-tuned on a real corpus.

The base is the embedded SmolLM2-135M (FP32 values on its Q4_1 grid). Training keeps FP32 master
weights and AdamW state (torch.optim.AdamW, constant learning rate after a short warm-up) on
random windows of the Debian Administrator's Handbook; checkpoints are saved as releases are,
with ``save_pretrained``: in BF16 (the base then being SmolLM2 cast to BF16, saved the same way)
and in FP32 (the base being the FP32 folder itself, saved again by ``save_pretrained``).

    .venv/bin/python bench/delta_pair.py                 # steps 30 / 100 / 300 / 1000 under bench/out/delta/
    .venv/bin/python bench/delta_pair.py --save 10 20 --out /tmp/pair   # a quick one

Cached: a folder that exists is not trained again (the run stops at the largest missing step).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "delta"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

log = logging.getLogger("delta_pair")


def _save(model: torch.nn.Module, tok, out: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` of a ``dtype`` copy (the master weights stay FP32), atomically."""
    from llmpress.io.atomic import atomic_dir

    sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tok.save_pretrained(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", type=int, nargs="+", default=[30, 100, 300, 1000], help="steps after which to save")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--corpus", default="debian-handbook")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpress.models import resolve
    from llmpress.text import load_text

    src = resolve("smollm2-135m").path
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, dt in (("base-bf16", torch.bfloat16), ("base-fp32", torch.float32)):
        if not (a.out / name).is_dir():
            _save(model, tok, a.out / name, dt)
    todo = [s for s in sorted(a.save) if not (a.out / f"ft-bf16-{s}").is_dir() or not (a.out / f"ft-fp32-{s}").is_dir()]
    if not todo:
        log.info("every pair is cached under %s", a.out)
        return
    ids = torch.tensor(tok(load_text(a.corpus))["input_ids"], dtype=torch.long)  # (T,)
    log.info("%s: %d tokens", a.corpus, len(ids))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    warm = 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(1, max(todo) + 1):
        starts = torch.randint(0, len(ids) - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([ids[s : s + a.seq] for s in starts])  # (batch, seq)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            log.info("step %d loss %.3f (mean of the last 50: %.3f) %.1f s", step, losses[-1], sum(losses[-50:]) / len(losses[-50:]),
                     time.perf_counter() - t0)
        if step in todo:
            for prec, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                _save(model, tok, a.out / f"ft-{prec}-{step}", dt)
            meta = {**record(), "steps": step, "lr": a.lr, "batch": a.batch, "seq": a.seq, "corpus": a.corpus,
                    "optimizer": "AdamW (FP32 master weights), 20-step warm-up", "seconds": time.perf_counter() - t0,
                    "loss_first50": sum(losses[:50]) / min(50, len(losses)), "loss_last50": sum(losses[-50:]) / min(50, len(losses))}
            (a.out / f"ft-{step}.json").write_text(json.dumps(meta, indent=1))
            log.info("saved step %d", step)


if __name__ == "__main__":
    main()
