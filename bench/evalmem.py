"""Peak RSS of ``llmpress eval`` in a fresh process, on a synthetic real-vocabulary model.

Builds (once, under --dir) a Llama with Llama-3.2-1B's vocabulary (128256, tied embeddings) but
a small body (hidden 256, 2 layers, random weights), SmolLM2's tokenizer (its ids are < 128256),
and a perturbed copy of it; then runs ``python -m llmpress eval COPY -r ORIGINAL --no-cache``
in a child process and prints its peak RSS (ru_maxrss of the child) with the figures.
Optionally the same for ``smollm2-135m`` against itself (--smollm).

    PYTHONPATH=src python bench/evalmem.py [--tokens 4096] [--hidden 256 --layers 2] [--smollm]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import subprocess
import sys
from pathlib import Path


def build(out: Path, vocab: int, hidden: int, layers: int) -> tuple[Path, Path]:
    """The two model folders, made in a child process (the parent stays small: see run_eval)."""
    orig, pert = out / "orig", out / "perturbed"
    if not (pert / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--_build", str(out), str(vocab), str(hidden), str(layers)], check=True)
    return orig, pert


def _build(out: Path, vocab: int, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmpress.models import resolve

    orig, pert = out / "orig", out / "perturbed"
    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m").path))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=2048, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(orig, safe_serialization=True)
    tok.save_pretrained(orig)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.std())
    model.save_pretrained(pert, safe_serialization=True)
    tok.save_pretrained(pert)


def run_eval(model: str, ref: str, tokens: int, ctx: int) -> tuple[dict, int]:
    """The eval's JSON result and that child's own peak RSS in bytes (os.wait4's rusage of it alone:
    the parent imports nothing heavy, so nothing it holds is counted in the forked child)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "llmpress", "eval", model, "-r", ref, "--no-cache", "--json",
                              "--tokens", str(tokens), "--ctx", str(ctx)], stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if p.returncode:
            raise SystemExit(err.read()[-3000:])
        return json.loads(out.read()), ru.ru_maxrss * 1024


def main() -> None:
    if sys.argv[1:2] == ["--_build"]:
        _build(Path(sys.argv[2]), *map(int, sys.argv[3:6]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(Path.home() / ".cache/llmpress/bench-evalmem"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256, help="2048 with --layers 2: Llama-3.2-1B's shape, two blocks")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--smollm", action="store_true", help="measure smollm2-135m against itself instead")
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {' '.join(sys.argv)} · commit {commit} · {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
          f"· OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} · PYTHONPATH={os.environ.get('PYTHONPATH')}")
    if a.smollm:
        name, (m, r) = "smollm2-135m vs itself", ("smollm2-135m", "smollm2-135m")
    else:
        orig, pert = build(Path(a.dir) / f"h{a.hidden}-L{a.layers}", 128256, a.hidden, a.layers)
        name, (m, r) = f"llama-vocab h{a.hidden} L{a.layers} (perturbed vs orig)", (str(pert), str(orig))
    res, peak = run_eval(m, r, a.tokens, a.ctx)
    print(f"| model | tokens | ctx | peak RSS GiB | ppl | kl_mean | top1 |")
    print(f"| {name} | {a.tokens} | {a.ctx} | {peak / 2**30:.3f} | {res['ppl']!r} | {res['kl_mean']!r} | {res['top1']!r} |")


if __name__ == "__main__":
    main()
