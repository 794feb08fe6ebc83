"""``llmpress quantize MODEL -o OUT``: RTN / GPTQ / AWQ / HQQ into a loadable folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .app import CALIB_OPT, DEVICE_OPT, FORCE_OPT, JSON_OPT, SAMPLES_OPT, SEQ_LEN_OPT, app, console, emit, rotate_option, kv_table


def _show(res: dict[str, Any]) -> None:
    rows = {k: res[k] for k in ("bpw", "bytes_in", "bytes_out", "ratio", "seconds", "peak_rss_bytes", "out") if res.get(k) is not None}
    trial = res.get("trial")
    if trial:
        rows.update({f"trial {k}": v for k, v in trial.items()})
    console.print(kv_table("quantize", rows))


@app.command()
def quantize(
    model: str = typer.Argument("smollm2-135m", help="Model: a folder, .safetensors, .gguf, hub id or embedded name."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    method: str = typer.Option("rtn", "--method", "-m", help="rtn | gptq | awq | awq+gptq (AWQ scales, GPTQ codes) | hqq"),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="2, 3, 4, 5, 6 or 8 (default 4, or the preset's).",
                                       show_default=False),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", show_default=False,
                                             help=">0 group of input columns; -1 per channel; 0 per tensor "
                                                  "(default 128, or the preset's)."),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", show_default=False,
                                       help="Symmetric grid (scale only) or asymmetric (scale + float offset). "
                                            "Default: the method's grid (gptq: asymz; others: asym)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="asym | asymz (integer zero point) | sym | sym_signed | absmax | nf | "
                                                             "seed | seed_rtn (overrides --sym); or a preset that also fixes "
                                                             "bits, group size and FP16 parameters: gguf:q4_0 | gguf:q4_1 | "
                                                             "gguf:q5_0 | gguf:q5_1 | gguf:q8_0 (llama.cpp's block types), "
                                                             "gguf:q2_k | gguf:q3_k | gguf:q4_k | gguf:q5_k | gguf:q6_k "
                                                             "(its K-quants: rows a multiple of 256), all exported "
                                                             "exactly by `export --format gguf`."),
    range_: Optional[str] = typer.Option(None, "--range", help="Range choice: minmax | mse | mse2 (each end searched on its own) | percentile. "
                                                                "Default: the method's (gptq: mse; others: minmax)."),
    gguf_mix: Optional[str] = typer.Option(None, "--gguf-mix", help="q4_k_m | q3_k_m | q2_k: llama.cpp's llama-quantize "
                                                                    "type for each linear (K-quants, its fallbacks for "
                                                                    "row widths not a multiple of 256), the chosen "
                                                                    "--method on each (excludes --grid/--bits/--recipe)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe (overrides method/bits/group options)."),
    calib: Optional[str] = CALIB_OPT,
    samples: int = SAMPLES_OPT,
    seq_len: int = SEQ_LEN_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    trial_blocks: Optional[int] = typer.Option(None, "--trial-blocks", show_default=False,
                                               help="gptq/awq: quantize only the first N blocks to time them and "
                                                    "write NOTHING to OUT; prints seconds per block and the whole "
                                                    "run's time extrapolated (to size a long run)."),
    rotate: bool = typer.Option(False, "--rotate", help="Rotate the residual stream (and each head's V→O path) by a "
                                                       "seeded randomized Hadamard fused into the weights first: "
                                                       "the same architecture, outliers spread before quantizing."),
    rotate_mlp: bool = typer.Option(False, "--rotate-mlp", help="--rotate, and the MLP's hidden width too: an online "
                                                               "randomized Hadamard before down_proj (it cannot be "
                                                               "fused). Recorded in llmpress.json; llmpress's loaders "
                                                               "and from_pretrained apply it, the dense export folds "
                                                               "it back, GGUF and compressed-tensors exports refuse it."),
    rotate_keep_head: bool = typer.Option(False, "--rotate-keep-head",
                                          help="--rotate, with the embedding, final norm and head as stored (a tied "
                                               "head stays tied: no extra bytes): the residual stream is rotated "
                                               "online after the embedding and back before the final norm. Stated, "
                                               "applied and exported like --rotate-mlp (combine the two freely)."),
    rotate_inputs: bool = typer.Option(False, "--rotate-inputs",
                                       help="Rotate without folding the norms: the residual stream and the norms stay "
                                            "as they are, and the linears reading each block norm's output (q/k/v, "
                                            "gate/up) read it rotated by an online randomized Hadamard (each head's "
                                            "V→O rotation still fused). Stated, applied and exported like "
                                            "--rotate-mlp (combine the two). Rotated weights are near Gaussian: "
                                            "at 2-3 bits they want --grid asym (no level spent on an exact zero) and, "
                                            "with gptq, --range mse2."),
    as_json: bool = JSON_OPT,
    workers: int = typer.Option(1, "--workers", help="A mixture of experts: encode its experts in Ray tasks, N CPUs "
                                                     "(the same output as one process)."),
    address: Optional[str] = typer.Option(None, "--address", help="An existing Ray cluster for --workers (host:port, "
                                                                  "ray://host:port or auto); default: a local one."),
) -> None:
    """Quantize the linear layers of MODEL (embeddings and head kept) into OUT."""
    from ..quant.api import quantize as run

    opts: dict[str, Any] = {k: v for k, v in (("sym", sym), ("grid", grid), ("range", range_)) if v is not None}
    res = run(model, out, method=method, bits=bits, group_size=group_size, recipe=recipe, calib=calib,
              samples=samples, seq_len=seq_len, force=force, trial_blocks=trial_blocks, device=device,
              workers=workers, address=address, gguf_mix=gguf_mix,
              rotate=rotate_option(rotate, rotate_mlp, rotate_keep_head, rotate_inputs), **opts)
    res.pop("layers", None)
    emit(res, as_json, _show)
