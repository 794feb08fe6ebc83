"""``llmpress factorize MODEL -o OUT``: low-rank factorization into a loadable folder."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .app import CALIB_OPT, DEVICE_OPT, FORCE_OPT, JSON_OPT, SAMPLES_OPT, SEQ_LEN_OPT, app, console, emit, fail, kv_table

_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "model.layers.3.mlp.down_proj" → ("model.layers", "3", "mlp.down_proj")


def rank_table(ranks: dict[str, int | None]) -> Table:
    """Ranks chosen per layer: one row per block, one column per linear of a block."""
    rows: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for name, k in ranks.items():
        mt = _BLOCK.match(name)
        row, col = (mt.group(2), mt.group(3).rsplit(".", 1)[-1]) if mt else (name, "rank")
        if col not in cols:
            cols.append(col)
        rows.setdefault(row, {})[col] = "dense" if k is None else str(k)
    t = Table(title="ranks per layer (dense = left as it was)")
    t.add_column("block")
    for c in cols:
        t.add_column(c, justify="right")
    for r, d in rows.items():
        t.add_row(r, *(d.get(c, "") for c in cols))
    return t


def _show(res: dict[str, Any]) -> None:
    if res.get("ranks"):
        console.print(rank_table(res["ranks"]))
    keys = ("params_kept", "linear_params_in", "linear_params_out", "bpw", "bytes_in", "bytes_out", "ratio", "seconds",
            "peak_rss_bytes", "out")
    console.print(kv_table("factorize", {k: res[k] for k in keys if k in res}))
    if res.get("dense_layers"):
        console.print(f"[yellow]left dense (the rank saved nothing):[/] {', '.join(res['dense_layers'])}")


@app.command()
def factorize(
    model: str = typer.Argument("smollm2-135m", help="Model: a folder, .safetensors, .gguf, hub id or embedded name."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    method: str = typer.Option("whiten", "--method", "-m",
                               help="svd | rsvd | whiten | asvd (or a combo: whiten+q, svd+q, lqer, …)."),
    ratio: Optional[float] = typer.Option(None, "--ratio",
                                          help="Fraction of linear-layer parameters KEPT, in (0, 1) (default 0.8 = 20 % removed)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Per layer, keep the smallest rank holding this fraction of Σσ² (overrides --ratio)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="One rank for every layer (overrides --ratio/--energy)."),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform | budget (spread --ratio by measured sensitivity)."),
    floor: float = typer.Option(0.1, "--floor", help="Budget allocation: each layer keeps at least this fraction."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe (overrides the options above)."),
    calib: Optional[str] = CALIB_OPT,
    samples: int = SAMPLES_OPT,
    seq_len: int = SEQ_LEN_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Factorize the linear layers of MODEL (embeddings and head kept) into OUT; prints the ranks chosen."""
    from ..lowrank.api import factorize as run

    if recipe is not None and not recipe.exists():
        fail(f"recipe file not found: {recipe}")
    res = run(model, out, method=method, ratio=ratio, energy=energy, rank=rank, allocation=allocation, floor=floor,
              recipe=recipe, calib=calib, samples=samples, seq_len=seq_len, force=force, device=device)
    res.pop("layers", None)
    emit(res, as_json, _show)
