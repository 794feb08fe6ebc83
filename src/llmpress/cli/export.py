"""``llmpress export MODEL -o OUT --format gguf|compressed-tensors|dense``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .app import FORCE_OPT, JSON_OPT, app, console, emit, kv_table


def _show(res: dict[str, Any]) -> None:
    rows = {k: res[k] for k in ("format", "out", "exact", "bytes_out", "seconds") if k in res}
    rows["fallback layers"] = len(res.get("fallback", {}))
    console.print(kv_table("export", rows))
    for name, f in list(res.get("fallback", {}).items())[:20]:
        console.print(f"  {name}: {f['action']} ({f['reason']})")


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="An llmpress folder, a .llmp container, or an original model."),
    out: Path = typer.Option(..., "-o", "--out", help="Output: a folder (dense, compressed-tensors) or a .gguf file."),
    format: str = typer.Option("dense", "--format", "-f", help="gguf | compressed-tensors | dense"),
    fallback: str = typer.Option("refuse", "--fallback",
                                 help="Layers the format cannot store exactly: refuse (default), dense, requantize."),
    type_: Optional[str] = typer.Option(None, "--type", help="GGUF: the type of the 2-D tensors kept as they were (an "
                                                               "original model's linears, embeddings, an untied head): "
                                                               "f32 (exact, default) | f16 | bf16 | q8_0 | q4_0 | q4_1 | "
                                                               "q5_0 | q5_1 (re-quantized by gguf-py)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="dense, and GGUF's dense fallback: the decoded weights' type, "
                                                             "float32 (exact, default) | bfloat16 | float16; "
                                                             "compressed-tensors: the scales' and other float tensors' type "
                                                             "(default float32 scales, exact)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the sha256 check of the input's shards."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Write MODEL in a format another engine runs: llama.cpp (gguf), transformers/vLLM
    (compressed-tensors), or plain float weights (dense). Exact, or it says which layers are not."""
    from ..targets.api import export

    opts: dict[str, Any] = {k: v for k, v in (("type", type_), ("dtype", dtype)) if v is not None}
    res = export(model, out, format=format, fallback=fallback, force=force, verify=not no_verify, **opts)
    emit(res, as_json, _show)
