"""``llmpress compress MODEL -o OUT --recipe FILE | --target-bpw B | --target-bytes N``: any recipe,
any mix of codecs, or the mix an allocation over a menu chooses for a size."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .app import CALIB_OPT, DEVICE_OPT, FORCE_OPT, JSON_OPT, SAMPLES_OPT, SEQ_LEN_OPT, app, console, emit, rotate_option, fail, kv_table


@app.command()
def compress(
    model: str = typer.Argument("smollm2-135m", help="Model: a folder, .safetensors, .gguf, hub id or embedded name."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe: ordered rules {match, method, params}, first match wins."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Allocate the menu's options per layer to this many stored bits per linear weight."),
    target_bytes: Optional[int] = typer.Option(None, "--target-bytes", help="Allocate to this output size in bytes (gguf menu: the file `export --format gguf --type KEPT` writes)."),
    menu: str = typer.Option("gptq", "--menu", help="Options per layer for --target-*: gptq | awq | rtn | best (GPTQ, AWQ, AWQ+GPTQ and RTN: each layer chooses its method too) | best-quick | gguf."),
    method: Optional[str] = typer.Option(None, "--method", help="gguf menu: the method choosing codes on llama.cpp's types (default gptq)."),
    kept_type: str = typer.Option("q8_0", "--kept-type", help="gguf menu with --target-bytes: the export's --type for the kept embeddings."),
    calib: Optional[str] = CALIB_OPT,
    samples: int = SAMPLES_OPT,
    seq_len: int = SEQ_LEN_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
    rotate: bool = typer.Option(False, "--rotate", help="Rotate the residual stream by a fused orthogonal matrix first."),
    rotate_mlp: bool = typer.Option(False, "--rotate-mlp", help="--rotate, and an online Hadamard before down_proj "
                                                               "(see quantize --rotate-mlp)."),
    rotate_keep_head: bool = typer.Option(False, "--rotate-keep-head", help="--rotate, the embedding and head as "
                                                                           "stored (see quantize --rotate-keep-head)."),
    rotate_inputs: bool = typer.Option(False, "--rotate-inputs", help="Rotate without folding the norms: each block "
                                                                     "norm's readers read its output rotated online "
                                                                     "(see quantize --rotate-inputs)."),
) -> None:
    """Compress MODEL by a recipe, or by the per-layer allocation that fits a target size, into OUT."""
    from ..pipeline import compress as run
    from ..recipe import Recipe

    given = [x for x in (recipe, target_bpw, target_bytes) if x is not None]
    if len(given) != 1:
        fail("give exactly one of --recipe, --target-bpw, --target-bytes")
    rotate = rotate_option(rotate, rotate_mlp, rotate_keep_head, rotate_inputs)  # type: ignore[assignment]
    if rotate and recipe is None:
        fail("--rotate goes with --recipe (the allocation measures its sensitivities on the model as stored)")
    if recipe is not None:
        res = run(model, Recipe.from_yaml(recipe), out, calib=calib, samples=samples, seq_len=seq_len, force=force,
                  device=device, rotate=rotate)
    else:
        from ..sweep.mixed import compress_to_target

        res = compress_to_target(model, out, target_bpw=target_bpw, target_bytes=target_bytes, menu=menu,
                                 method=method, kept_type=kept_type, calib=calib, samples=samples, seq_len=seq_len,
                                 force=force, device=device)
    res.pop("layers", None)

    def show(res: dict[str, Any]) -> None:
        console.print(kv_table("compress", {k: res[k] for k in ("bpw", "bytes_in", "bytes_out", "ratio", "seconds", "out")}))
        if "allocation" in res:
            a = res["allocation"]
            console.print(kv_table("allocation", {"menu": a["menu"], "predicted ΔKL": a["predicted_dkl"],
                                                  "options": a["options"], "recipe": res["recipe_file"],
                                                  **({"predicted bytes": a["predicted_bytes"]} if "predicted_bytes" in a else {})}))

    emit(res, as_json, show)
