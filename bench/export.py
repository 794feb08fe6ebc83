"""Export benchmark: does a model llmpress compressed run, unchanged, in the engines people use?

    OMP_NUM_THREADS=1 .venv/bin/python bench/export.py            # everything, ~15-25 minutes here
    .venv/bin/python bench/export.py --chunks 4 --skip generate    # quicker

On SmolLM2-135M, side by side in one run:

1. llama.cpp's tools are built once, outside the repository (``bench/build-llama-cpp.sh``).
2. The original is exported as an F32 GGUF (the reference llama.cpp compares against), and a
   4-bit GPTQ model is made on llama.cpp's Q4_0 grid (``--grid gguf:q4_0``: blocks of 32, FP16
   scale), so that one model exports exactly to every format.
3. That model is exported as GGUF, compressed-tensors and dense, each through the CLI as a user
   would; each export's weights are read back by the engine's own reader (gguf-py's dequantizer,
   compressed-tensors' decompressor in transformers, safetensors) and compared with llmpress's
   decoded weights.
4. KL to the original on the evaluation texts (debian-handbook, linux-doc), on llama.cpp's own
   windows: ``llama-perplexity --kl-divergence`` for the GGUF against the F32 GGUF, and llmpress's
   exact full-vocabulary KL in torch on the very tokens and positions llama.cpp scored (read from
   its ``--kl-divergence-base`` file: chunks of ``ctx`` tokens, the second half of each scored),
   for the llmpress model and each export loaded in its engine (transformers for
   compressed-tensors and dense).
5. The GGUF writes text in ``llama-completion``; the compressed-tensors export runs a local
   lm-eval task beside the llmpress model; ``bench/generate.py`` measures packed inference.

Prints one table and writes ``bench/out/export.json`` (command, commit, date, every figure).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
WORK = OUT / "export"
MODEL = "smollm2-135m"


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def llmpress_cli(*args: str) -> dict:
    r = sh([sys.executable, "-m", "llmpress", *args, "--json"])
    return json.loads(r.stdout.strip().splitlines()[-1])


# ============================================================================ llama.cpp
def llama_bin() -> Path:
    r = sh(["bash", HERE / "build-llama-cpp.sh"])
    return Path(r.stdout.strip().splitlines()[-1])


def eval_text_file(name: str, n_chars: int, work: Path = WORK) -> Path:
    """A slice of an evaluation corpus as a text file, taken from its middle (front matter is
    not representative): llama-perplexity reads the file from its start."""
    from llmpress.text import load_text

    text = load_text(name)
    start = len(text) // 3
    start = text.find("\n\n", start) + 2
    p = work / f"{name}.txt"
    p.write_text(text[start:start + n_chars])
    return p


def read_kld_base(path: Path) -> tuple[int, int, np.ndarray]:
    """The tokens llama-perplexity scored: (n_ctx, n_vocab, tokens (n_chunk, n_ctx))."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path}: not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32).tolist()
        toks = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32).reshape(n_chunk, n_ctx)
    return n_ctx, n_vocab, toks.copy()


_STAT = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
         "kl_mean": r"Mean\s+KLD:\s*([\d.eE+-]+)", "same_top": r"Same top p:\s*([\d.]+)"}


def llama_kl(bin_dir: Path, ref_gguf: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    """llama-perplexity's KL divergence of ``gguf`` against ``ref_gguf`` on ``text`` (the reference's
    logits are kept beside ``text``, one file per text, context and chunk count)."""
    base = text.parent / f"{text.stem}-c{ctx}-n{chunks}.kld"
    common = ["-f", text, "-c", ctx, "--chunks", chunks, "-t", threads, "-b", ctx, "--no-repack"]  # repacking crashes on some AVX-512 hosts
    if not base.exists():
        sh([bin_dir / "llama-perplexity", "-m", ref_gguf, *common, "--kl-divergence-base", base])
    for _ in range(3):  # llama-perplexity's last log lines are sometimes lost at exit: retry
        r = sh([bin_dir / "llama-perplexity", "-m", gguf, *common, "--kl-divergence-base", base, "--kl-divergence"])
        log = r.stdout + r.stderr
        out = {"kld_file": str(base)}
        for k, pat in _STAT.items():
            m = re.search(pat, log)
            out[k] = float(m.group(1)) if m else None
        if out["kl_mean"] is not None:
            break
    if out["same_top"] is not None:
        out["same_top"] /= 100.0
    return out


# ============================================================================ torch side
def torch_kl(ref: torch.nn.Module, model: torch.nn.Module, toks: np.ndarray) -> dict:
    """Exact full-vocabulary KL(ref ‖ model) and top-1 agreement on llama-perplexity's windows:
    each chunk as it is (no BOS: SmolLM2's GGUF has add_bos_token false, checked by the caller),
    logits at positions ctx/2 … ctx−2 (the tokens after them are the scored ones)."""
    n_ctx = toks.shape[1]
    first = n_ctx // 2
    kls, same = [], []
    with torch.inference_mode():
        for row in toks:
            ids = torch.from_numpy(row).long()[None]
            lp = ref(input_ids=ids, use_cache=False).logits[0, first:n_ctx - 1].float().log_softmax(-1)
            lq = model(input_ids=ids, use_cache=False).logits[0, first:n_ctx - 1].float().log_softmax(-1)
            kls.append((lp.exp() * (lp - lq)).sum(-1).double())
            same.append((lp.argmax(-1) == lq.argmax(-1)).double())
    kl = torch.cat(kls)
    return {"kl_mean": float(kl.mean()), "kl_se": float(kl.std() / math.sqrt(kl.numel())),
            "same_top": float(torch.cat(same).mean()), "tokens": int(kl.numel())}


def q8_0_activations(model: torch.nn.Module, names: list[str]) -> list:
    """Round the inputs of the named linears as llama.cpp's CPU kernels do before a dot product
    with Q4_0/Q4_1/Q5/Q8_0 weights: blocks of 32 along the row, d = amax/127 stored in FP16,
    q = round(x/d) in int8. Returns the hook handles (remove them to undo)."""

    def q8(x: torch.Tensor) -> torch.Tensor:
        xb = x.float().reshape(-1, 32)  # (blocks, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))).clamp(-127, 127)
        return (q * d.half().float()).reshape(x.shape).to(x.dtype)

    mods = dict(model.named_modules())
    return [mods[n].register_forward_pre_hook(lambda _m, a: (q8(a[0]), *a[1:])) for n in names]


def load_hf(folder: Path, dequantize: bool = False) -> torch.nn.Module:
    """A folder loaded by plain transformers (compressed-tensors: packed as transformers loads it by
    default, or decompressed to float weights with ``dequantize``)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()


def max_weight_diff(model: torch.nn.Module, qfolder: Path) -> float:
    """Largest |a float model's linear weight − llmpress's decoded weight| over the compressed layers."""
    from llmpress.targets.source import ExportSource

    worst = 0.0
    with ExportSource(qfolder) as src:
        mods = dict(model.named_modules())
        for name in src.compressed_names:
            w = mods[name.rpartition(".")[0]].weight.detach().float()
            worst = max(worst, float((w - src.get(name).decoded()).abs().max()))
    return worst


# ============================================================================ main
def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True)
    return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks per text")
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows (of 512 tokens)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--texts", default="debian-handbook,linux-doc")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: lmeval, generate, completion")
    ap.add_argument("--redo", action="store_true", help="rebuild the models and exports")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
                 "model": MODEL, "ctx": args.ctx, "chunks": args.chunks}

    bin_dir = llama_bin()
    force = ["--force"] if args.redo else []
    ref_gguf, q, paths = WORK / "ref-f32.gguf", WORK / "gptq4-q4_0", {}
    if args.redo or not ref_gguf.exists():
        res["ref_export"] = llmpress_cli("export", MODEL, "-o", str(ref_gguf), "--format", "gguf", "--type", "f32", "--force")
    if args.redo or not q.exists():
        res["quantize"] = llmpress_cli("quantize", MODEL, "-o", str(q), "--method", "gptq", "--grid", "gguf:q4_0",
                                       "--samples", str(args.samples), "--force")
    res["bpw"] = json.loads((q / "llmpress.json").read_text())["bpw"]
    for fmt, dest in (("gguf", WORK / "gptq4.gguf"), ("compressed-tensors", WORK / "gptq4-ct"), ("dense", WORK / "gptq4-dense")):
        paths[fmt] = dest
        if args.redo or not dest.exists():
            res[f"export_{fmt}"] = llmpress_cli("export", str(q), "-o", str(dest), "--format", fmt, *force)

    # -- weights read back by each engine's reader
    from llmpress.targets.gguf_verify import verify as gguf_verify
    import llmpress

    g = gguf_verify(paths["gguf"], q)
    assert not g["missing"], g["missing"]
    res["weights_max_abs_diff"] = {"gguf": g["max_abs_exact"]}
    res["gguf_layers_bitwise"] = sum(v["bitwise"] for v in g["layers"].values() if v["exact_layer"])
    res["weights_max_abs_diff"]["compressed-tensors"] = max_weight_diff(load_hf(paths["compressed-tensors"], True), q)
    ct_model = load_hf(paths["compressed-tensors"])  # as a user gets it: packed
    dense_model = load_hf(paths["dense"])
    res["weights_max_abs_diff"]["dense"] = max_weight_diff(dense_model, q)

    # -- KL on llama.cpp's windows
    from llmpress.models import resolve
    import gguf as ggufpy

    add_bos = ggufpy.GGUFReader(ref_gguf).fields["tokenizer.ggml.add_bos_token"].contents()
    assert not add_bos, "the torch side assumes no BOS substitution"
    ref = llmpress.load(MODEL).eval()
    ours = llmpress.load(q).eval()
    compressed = list(json.loads((q / "llmpress.json").read_text())["tensors"])
    n_chars = args.ctx * args.chunks * 6
    res["texts"] = {}
    for name in args.texts.split(","):
        text = eval_text_file(name, n_chars)
        row = {"llama.cpp gguf": llama_kl(bin_dir, ref_gguf, paths["gguf"], text, args.ctx, args.chunks, args.threads)}
        _, _, toks = read_kld_base(Path(row["llama.cpp gguf"]["kld_file"]))
        row["llmpress"] = torch_kl(ref, ours, toks)
        hooks = q8_0_activations(ours, [n.rpartition(".")[0] for n in compressed])
        row["llmpress, llama.cpp's Q8_0 activations emulated"] = torch_kl(ref, ours, toks)
        for h in hooks:
            h.remove()
        row["compressed-tensors (transformers)"] = torch_kl(ref, ct_model, toks)
        row["dense (transformers)"] = torch_kl(ref, dense_model, toks)
        res["texts"][name] = row
        print(json.dumps({name: row}, indent=1), file=sys.stderr)

    if "completion" not in skip:
        r = sh([bin_dir / "llama-completion", "-m", paths["gguf"], "--no-repack", "-p", "The capital of France is", "-n", "12",
                "--temp", "0", "-t", str(args.threads), "-no-cnv"])
        res["llama_completion"] = r.stdout.strip()[-300:]
    if "lmeval" not in skip:
        res["lmeval"] = run_lmeval(ours, ct_model, q)
    if "generate" not in skip and (HERE / "generate.py").exists():
        sh([sys.executable, HERE / "generate.py"])
        res["generate"] = json.loads((OUT / "generate.json").read_text())
    res["seconds"] = time.time() - t0
    (OUT / "export.json").write_text(json.dumps(res, indent=1))
    show(res)


def run_lmeval(ours: torch.nn.Module, ct_model: torch.nn.Module, q: Path) -> dict:
    """The local lm-eval tasks: the llmpress model beside the original, and the
    compressed-tensors export (in transformers) beside the llmpress model (Δ should be 0)."""
    from llmpress.eval.tasks import evaluate_tasks
    from llmpress.models import load_tokenizer

    tasks = [str(ROOT / "tests" / "data" / "lmeval")]
    tok = load_tokenizer(MODEL)
    flat = lambda r: {f"{t}/{m}": {k: v[k] for k in ("model", "reference", "delta", "delta_se") if k in v}
                      for t, tr in r["tasks"].items() for m, v in tr["metrics"].items()}
    return {"llmpress vs original": flat(evaluate_tasks(ours, tasks, reference=MODEL, tokenizer=tok)),
            "compressed-tensors vs llmpress": flat(evaluate_tasks(ct_model, tasks, reference=ours, tokenizer=tok,
                                                                  ref_tokenizer=tok))}


def show(res: dict) -> None:
    print(f"\nexport benchmark · {res['model']} · GPTQ 4-bit on gguf:q4_0 ({res['bpw']:.3f} bpw) · commit {res['commit']} · "
          f"{res['date']} · {res['threads']} thread(s)")
    print("\nweights read back by each engine's reader, max |Δ| vs llmpress's decode:")
    for k, v in res["weights_max_abs_diff"].items():
        print(f"  {k:20s} {v:.3g}")
    print(f"  (GGUF: {res['gguf_layers_bitwise']} layers equal bit for bit)")
    print(f"\nKL to the original on llama.cpp's windows ({res['chunks']} chunks × {res['ctx']}, second halves scored):")
    print(f"  {'text':16s} {'engine':50s} {'mean KL':>9s} {'vs llmpress':>11s} {'same top-1':>10s}")
    for name, row in res["texts"].items():
        base = row["llmpress"]["kl_mean"]
        for eng, r in row.items():
            print(f"  {name:16s} {eng:50s} {r['kl_mean']:9.5f} {r['kl_mean'] / base - 1:+10.2%} {r['same_top']:10.3f}")
    if "llama_completion" in res:
        print(f"\nllama-completion: {res['llama_completion']!r}")
    if "lmeval" in res:
        print("\nlm-eval, local tasks (tests/data/lmeval):")
        for side, metrics in res["lmeval"].items():
            for m, v in metrics.items():
                print(f"  {side:32s} {m:28s} {v['model']:.3f} vs {v['reference']:.3f}  Δ {v['delta']:+.3f} ± {v.get('delta_se') or 0:.3f}")
    if "generate" in res:
        rows = res["generate"]["rows"]
        d = rows["dense"]
        print(f"\nllmpress generate ({res['generate']['settings']['tokens']} tokens, batch 1, "
              f"{res['generate']['settings']['threads']} thread; bench/generate.py), against the dense FP32 model:")
        for case, r in rows.items():
            print(f"  {case:20s} {r['tokens_per_s']:7.2f} tok/s ({r['tokens_per_s'] / d['tokens_per_s']:.2f}×)  "
                  f"weights {r['weight_bytes'] / 2**20:7.1f} MiB ({r['weight_bytes'] / d['weight_bytes']:.3f}×)")
    print(f"\n{res['seconds']:.0f} s; bench/out/export.json")


if __name__ == "__main__":
    main()
