"""``llmpress compress MODEL -o OUT --recipe FILE``: any recipe, any mix of codecs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .app import CALIB_OPT, DEVICE_OPT, FORCE_OPT, JSON_OPT, SAMPLES_OPT, SEQ_LEN_OPT, app, console, emit, kv_table


@app.command()
def compress(
    model: str = typer.Argument("smollm2-135m", help="Model: a folder, .safetensors, .gguf, hub id or embedded name."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    recipe: Path = typer.Option(..., "--recipe", help="YAML recipe: ordered rules {match, method, params}, first match wins."),
    calib: Optional[str] = CALIB_OPT,
    samples: int = SAMPLES_OPT,
    seq_len: int = SEQ_LEN_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Compress MODEL by a recipe (quantization, factorization or both, per layer) into OUT."""
    from ..pipeline import compress as run
    from ..recipe import Recipe

    r = Recipe.from_yaml(recipe)
    res = run(model, r, out, calib=calib, samples=samples, seq_len=seq_len, force=force, device=device)
    res.pop("layers", None)

    def show(res: dict[str, Any]) -> None:
        console.print(kv_table("compress", {k: res[k] for k in ("bpw", "bytes_in", "bytes_out", "ratio", "seconds", "out")}))

    emit(res, as_json, show)
