"""Do llmpress's GGUFs of every family run in llama.cpp and compute what transformers computes?

    .venv/bin/python bench/llama_cpp_arch.py                 # every family the GGUF target knows
    .venv/bin/python bench/llama_cpp_arch.py --only llama3,mixtral

The architecture matrix (``tests/families.py``, plus the two mixtures of experts of
``tests/test_moe.py``) checks GGUF exports with gguf-py's reader only; this runs them in the engine.
For each family: the shrunk model is built with random weights scaled up (so its predictions are
far from uniform and a wrong RoPE, norm or tensor layout moves the perplexity), a sliding window
shorter than the context widened to it (llama.cpp's llama and phi3 have none: the export warns;
the table's last column says so), then

1. ``export --type f32`` of the original: ``llama-perplexity`` against the same model in
   transformers on the very tokens llama.cpp scored (read from its ``--kl-divergence-base``
   file: the second half of each chunk);
2. on a 256-wide Llama: ``quantize --method gptq --grid gguf:q8_0`` and
   ``gguf:q4_k`` (a K-quant super-block per 256 weights), ``export --format gguf`` (codes written
   as they are): ``llama-perplexity`` against ``llmpress.load`` of the folder, the layers' inputs
   rounded to Q8_0 blocks as llama.cpp's CPU kernels round them.

Prints one table (PPL in llama.cpp, PPL in torch, their ratio) with command, commit and date.
llama.cpp's tools come from ``bench/build-llama-cpp.sh`` (built once, ~30 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from export import git_commit, llama_bin, q8_0_activations, read_kld_base, sh  # noqa: E402

SCALE = 6.0  # every matrix × SCALE: logits far from uniform
TEXT = ("The engine reads each tensor of the file, checks its type and shape, and maps the blocks into memory. "
        "Quantized weights are unpacked one row at a time while the activations stream through the layers; "
        "a mixture of experts routes each token to two of its experts and adds their outputs. ")


def _moe_config(model_type: str, vocab: int):
    from test_moe import _config

    return _config(model_type, vocab)


def widen_window(folder: Path, ctx: int) -> int | None:
    """A sliding window shorter than the bench's context widened to it (config.json rewritten; the
    weights do not depend on it): llama.cpp's llama and phi3 attend to the whole context (the
    export warns), so past the window the two engines compute different models. The old window, or None."""
    from llmpress.targets.gguf_arch import sliding_window

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    window = sliding_window({**cfg, "max_position_embeddings": ctx})
    if window is None:
        return None
    path.write_text(json.dumps({**cfg, "sliding_window": ctx}, indent=2))
    return window


def build(name: str, out: Path, tok_src: Path, ctx: int = 0) -> str:
    """The shrunk family ``name`` (tests/families.py, or an MoE of tests/test_moe.py), scaled; a
    sliding window shorter than ``ctx`` widened to it (:func:`widen_window`). A note for the table."""
    import families
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in families.FAMILIES:
        families.build(name, out, tok_src)
    else:
        tok = AutoTokenizer.from_pretrained(str(families.small_tokenizer(tok_src, out)))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_moe_config(name, len(tok))).save_pretrained(out)
    old = widen_window(out, ctx) if ctx else None
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(SCALE)
    model.save_pretrained(out)
    return "" if old is None else f"window {old}->{ctx}"


def wide_llama(out: Path, tok_src: Path) -> Path:
    """Llama-3 shrunk to hidden 256 (every row a whole K-quant super-block)."""
    import families

    fam = families.FAMILIES["llama3"]
    families.FAMILIES["llama3-256"] = type(fam)(fam.hub, fam.config, {**fam.shrink, "hidden_size": 256,
                                                                       "head_dim": 64, "intermediate_size": 512})
    try:
        build("llama3-256", out, tok_src)
        return out
    finally:
        del families.FAMILIES["llama3-256"]


def llama_ppl(bin_dir: Path, gguf: Path, text: Path, base: Path, ctx: int, chunks: int, tries: int = 12) -> float:
    """llama-perplexity's final estimate. ``--no-repack``: the CPU repacking of quantized weights
    crashes this build on AVX-512 hosts (SmolLM2's packaged Q4_1 file too). Its log is written by a
    worker thread of a logger llama.cpp leaks on purpose (common/log.cpp, ``common_log_main``; its
    issue 22142): a process that exits before the thread has caught up loses the last lines, exit
    status 0 (a third of the runs of the ~1 s Mixtral one on a busy 2-core host), so it is run again."""
    for _ in range(tries):
        r = sh([bin_dir / "llama-perplexity", "-m", gguf, "-f", text, "-c", ctx, "--chunks", chunks, "-b", ctx,
                "-t", 2, "--no-repack", "--kl-divergence-base", base])
        m = re.search(r"Final estimate: PPL = ([\d.]+)", r.stdout + r.stderr)
        if m is not None:
            return float(m.group(1))
    raise RuntimeError(f"no PPL in llama-perplexity's output for {gguf} ({tries} runs): {(r.stdout + r.stderr)[-600:]}")


def torch_ppl(model: torch.nn.Module, toks: np.ndarray, bos: int | None) -> float:
    """Perplexity on llama-perplexity's windows: each chunk (its first token replaced by BOS when
    the GGUF adds one), the tokens of its second half scored."""
    n_ctx = toks.shape[1]
    first = n_ctx // 2
    nll = []
    with torch.inference_mode():
        for row in toks:
            ids = torch.from_numpy(row.copy()).long()
            if bos is not None:
                ids[0] = bos
            lp = model(input_ids=ids[None], use_cache=False).logits[0, first:n_ctx - 1].float().log_softmax(-1)
            nll.append(-lp.gather(-1, ids[first + 1:, None]).squeeze(-1).double())
    return math.exp(float(torch.cat(nll).mean()))


def gguf_bos(path: Path) -> int | None:
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(key: str):
        f = r.fields.get(key)
        return None if f is None else f.parts[f.data[0]][0]

    return int(field("tokenizer.ggml.bos_token_id")) if bool(field("tokenizer.ggml.add_bos_token")) else None


def check(bin_dir: Path, work: Path, name: str, folder: Path, grids: list[str], ctx: int, chunks: int,
          note: str = "") -> list[dict]:
    import llmpress
    from transformers import AutoModelForCausalLM

    text = work / "text.txt"
    text.write_text(TEXT * 40)
    rows = []
    ref = work / f"{name}-f32.gguf"
    llmpress.export(folder, ref, format="gguf", type="f32")
    cases = [("f32", ref, AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), [])]
    for grid in grids:
        q = work / f"{name}-{grid.split(':')[1]}"
        llmpress.quantize(folder, q, method="gptq", grid=grid, calib=str(text), samples=8, seq_len=64, progress=False,
                          range="minmax")
        g = work / f"{q.name}.gguf"
        llmpress.export(q, g, format="gguf")
        model = llmpress.load(q).eval()
        lin = [n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"]
        cases.append((grid, g, model, lin))
    for label, gguf, model, lin in cases:
        base = work / f"{gguf.stem}.kld"
        ppl_cpp = llama_ppl(bin_dir, gguf, text, base, ctx, chunks)
        _, _, toks = read_kld_base(base)
        hooks = q8_0_activations(model, lin) if lin else []
        try:
            ppl_torch = torch_ppl(model, toks, gguf_bos(gguf))
        finally:
            for h in hooks:
                h.remove()
        rows.append({"family": name, "weights": label, "ppl_llama_cpp": ppl_cpp, "ppl_torch": ppl_torch,
                     "ratio": ppl_cpp / ppl_torch, "note": note})
        print(f"{name:10s} {label:12s} llama.cpp {ppl_cpp:10.3f}  torch {ppl_torch:10.3f}  ratio {ppl_cpp / ppl_torch:.4f}",
              file=sys.stderr, flush=True)
    return rows


def main() -> None:
    import families
    from llmpress.models import resolve
    from llmpress.targets.gguf_arch import ARCHS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma list of families (default: every one GGUF knows)")
    ap.add_argument("--ctx", type=int, default=64, help="llama-perplexity's context; shorter sliding windows "
                    "are widened to it (llama.cpp has none for these architectures)")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = [n for n, f in families.FAMILIES.items() if f.gguf] + ["mixtral", "qwen2_moe", "llama3-256"]
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    bin_dir = llama_bin()
    tok_src = resolve("smollm2-135m").path
    work = Path(tempfile.mkdtemp(prefix="llmpress-arch-"))
    try:
        for name in names:
            folder = work / name
            note = ""
            if name == "llama3-256":
                wide_llama(folder, tok_src)
                grids = ["gguf:q8_0", "gguf:q4_k"]
            else:
                note = build(name, folder, tok_src, args.ctx)
                mt = json.loads((folder / "config.json").read_text())["model_type"]
                assert mt in ARCHS, mt
                grids = []  # quantized layers: the 256-wide Llama below
            try:
                res["rows"] += check(bin_dir, work, name, folder, grids, args.ctx, args.chunks, note)
            except Exception as e:  # a family that fails is a row, not the end of the run
                res["rows"].append({"family": name, "error": f"{type(e).__name__}: {str(e)[-400:]}"})
                print(f"{name}: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(res))
        return
    print(f"# {res['command']}  (commit {res['commit']}, {res['date']})")
    print(f"{'family':12s} {'weights':10s} {'PPL llama.cpp':>14s} {'PPL torch':>10s} {'ratio':>7s}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['family']:12s} ERROR {r['error']}")
        else:
            print(f"{r['family']:12s} {r['weights']:10s} {r['ppl_llama_cpp']:14.3f} {r['ppl_torch']:10.3f} {r['ratio']:7.4f}  {r['note']}")


if __name__ == "__main__":
    main()
