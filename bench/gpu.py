"""GPTQ time and evaluation speed on a GPU: llmpress against llm-compressor on the same device.

Run by ``bench/gpu.sh`` on a machine with a lent GPU and no network. For each model shape
(SmolLM2-135M's and Llama-3.2-1B's configs, random weights drawn on the GPU, saved in bf16 with
SmolLM2's real tokenizer — real weights cannot travel to that machine):

* llmpress: ``python -m llmpress quantize --method gptq --device cuda`` (its own ``seconds``: load,
  calibration, GPTQ, writing);
* llm-compressor: ``oneshot`` with ``GPTQModifier`` on the same calibration windows, the model moved
  to the same GPU (timed from its load through ``oneshot``, not writing), when it imports;
* ``python -m llmpress eval --device cuda`` of llmpress's output against the original: tokens/s of
  both (the reference's forward, then the 4-bit model's).

Calibration and evaluation read real text carried in ``.whl/text`` (``bench/gpu-wheels.sh``), or
random token windows when it is absent; the table says which. Prints one table with the command,
commit, date and device. ``--deadline`` (seconds) skips what would not finish in time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.monotonic()

# shape name -> transformers LlamaConfig values (from the models' own config.json)
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # a smoke test of this script where there is no GPU (--device cpu --shapes tiny)
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}


def left(deadline: float) -> float:
    return deadline - (time.monotonic() - T0)


def build(shape: str, tokenizer: str, folder: Path, device: str) -> int:
    """Random weights for ``shape`` drawn on ``device``, saved in bf16 with the tokenizer; returns params."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        cfg = json.loads((folder / "config.json").read_text())
        return int(cfg.get("llmpress_bench_params", 0))
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.config.llmpress_bench_params = n
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return n


def texts(args, tok_dir: str, work: Path) -> tuple[str, str, str]:
    """(calibration file, evaluation file, what they are)."""
    if Path(args.calib).is_file() and Path(args.eval_text).is_file():
        return args.calib, args.eval_text, "real text (llmpress.text corpora carried in .whl/text)"
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    g = torch.Generator().manual_seed(0)
    out = []
    for name in ("calib", "eval"):
        ids = torch.randint(0, len(tok), (200_000,), generator=g).tolist()
        p = work / f"random-{name}.txt"
        p.write_text(tok.decode(ids))
        out.append(str(p))
    return out[0], out[1], "random token windows (no text carried)"


def run_json(cmd: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run a command; its last stdout line as JSON, or None and why."""
    if timeout < 20:
        return None, "skipped: out of time"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return None, f"failed ({p.returncode}): " + " | ".join(tail)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), ""
    except (IndexError, json.JSONDecodeError):
        return None, "no JSON line"


def llmc_main(folder: str, ids_file: str, bits: int, gs: int, device: str) -> None:
    """In a subprocess: llm-compressor's GPTQ on ``device``; prints {"seconds": ...} or raises."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = json.loads(Path(ids_file).read_text())
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=gs)
    mod = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                       ignore=["lm_head"])
    oneshot(model=model, recipe=[mod], dataset=ds, num_calibration_samples=len(ids), max_seq_length=len(ids[0]))
    sync()
    print(json.dumps({"seconds": time.perf_counter() - t}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--tokenizer", default=str(ROOT / ".whl/tokenizer"))
    ap.add_argument("--calib", default=str(ROOT / ".whl/text/calib.txt"))
    ap.add_argument("--eval-text", default=str(ROOT / ".whl/text/eval.txt"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)  # divides every width of both shapes (576 too)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--work", default="/tmp/llmpress-gpu")
    ap.add_argument("--deadline", type=float, default=400.0, help="seconds for everything; later steps are skipped")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of this script)")
    ap.add_argument("--llmc", nargs=4, metavar=("FOLDER", "IDS", "BITS", "GS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llmc:
        llmc_main(args.llmc[0], args.llmc[1], int(args.llmc[2]), int(args.llmc[3]), args.device)
        return

    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: torch sees no CUDA device")
    if not Path(args.tokenizer).is_dir():
        sys.exit(f"bench/gpu.py: no tokenizer folder {args.tokenizer}: run bench/gpu-wheels.sh where PyPI is reachable "
                 "and carry .whl")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, evtext, text_kind = texts(args, args.tokenizer, work)
    from transformers import AutoTokenizer

    from llmpress.pipeline import calib_ids

    ids = calib_ids(AutoTokenizer.from_pretrained(args.tokenizer), Path(calib).read_text(), args.samples, args.seq_len)
    ids_file = work / "calib-ids.json"
    ids_file.write_text(json.dumps(ids.tolist()))
    try:
        import llmcompressor  # noqa: F401

        llmc_ok = ""
    except Exception as e:  # noqa: BLE001 - any import failure means: skip it, say why
        llmc_ok = f"skipped: llm-compressor does not import ({type(e).__name__}: {str(e)[:120]})"
        print(llmc_ok, file=sys.stderr)

    py = sys.executable
    rows = []
    for shape in args.shapes.split(","):
        folder = work / f"{shape}-random"
        t = time.perf_counter()
        n = build(shape, args.tokenizer, folder, args.device)
        print(f"{shape}: {n / 1e6:.0f} M params built on {args.device} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        out = work / f"{shape}-gptq"
        ours, why = run_json([py, "-m", "llmpress", "quantize", str(folder), "-o", str(out), "--method", "gptq",
                              "--bits", str(args.bits), "--group-size", str(args.group_size), "--calib", calib,
                              "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--device", args.device,
                              "--force", "--json"], left(args.deadline) - 30)
        row = {"shape": shape, "params_m": n / 1e6, "llmpress_s": ours["seconds"] if ours else why}
        print(f"{shape}: llmpress {row['llmpress_s']}", file=sys.stderr)
        if llmc_ok:
            row["llmc_s"] = llmc_ok
        else:
            theirs, why = run_json([py, str(Path(__file__).resolve()), "--device", args.device, "--llmc", str(folder),
                                    str(ids_file), str(args.bits), str(args.group_size)], left(args.deadline) - 30)
            row["llmc_s"] = theirs["seconds"] if theirs else why
            print(f"{shape}: llm-compressor {row['llmc_s']}", file=sys.stderr)
        if ours:
            ev, why = run_json([py, "-m", "llmpress", "eval", str(out), "--reference", str(folder), "--text", evtext,
                                "--tokens", str(args.eval_tokens), "--ctx", "512", "--device", args.device, "--no-cache",
                                "--json"], left(args.deadline) - 10)
            row["eval_tps"] = ev["tokens_per_s"] if ev else why
            row["ref_tps"] = ev.get("ref_tokens_per_s") if ev else ""
        rows.append(row)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n# llmpress GPU bench — command: bash bench/gpu.sh ({' '.join(sys.argv)})")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.device} (smoke test)"
    print(f"commit {commit or 'unknown'} · {time.strftime('%Y-%m-%d %H:%M:%S %Z')} · {where} · "
          f"torch {torch.__version__} · transformers {transformers.__version__}")
    print(f"GPTQ {args.bits}-bit, groups of {args.group_size}, {args.samples} × {args.seq_len} calibration tokens of "
          f"{text_kind}; random weights (bf16 on disk, float32 in work) with the real configs' shapes")
    print("llmpress s: its reported seconds (load, calibration, GPTQ, writing); llm-compressor s: load + oneshot "
          "(not writing); eval: `llmpress eval --device`, "
          f"{args.eval_tokens} tokens, ctx 512 (tok/s of the 4-bit model, and of the original)\n")
    print("| shape | params (M) | llmpress GPTQ s | llm-compressor GPTQ s | eval tok/s 4-bit | eval tok/s original |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params_m']:.0f} | {fmt(r['llmpress_s'])} | {fmt(r['llmc_s'])} | "
              f"{fmt(r.get('eval_tps', ''))} | {fmt(r.get('ref_tps', ''))} |")


if __name__ == "__main__":
    main()
