"""The Typer app, shared options and the output conventions of every command.

``--json`` prints one JSON object as the last line of stdout; everything else a command
shows (tables, progress) goes to stderr or before that line.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any, Callable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(
    name="llmpress",
    help="Compress large language models and find how far each one can be compressed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Human output goes to stderr so that stdout stays clean for --json.
console = Console(stderr=True)

JSON_OPT = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout.")
FORCE_OPT = typer.Option(False, "--force", help="Overwrite an existing output.")
# Calibration options shared by every command that runs the sequential pipeline.
CALIB_OPT = typer.Option(None, "--calib", help="Calibration text: corpus name or file (default: the calibration mix).")
SAMPLES_OPT = typer.Option(128, "--samples", help="Calibration windows.")
SEQ_LEN_OPT = typer.Option(512, "--seq-len", help="Tokens per calibration window.")
# Where every command that computes runs (llmpress.device.resolve_device checks it before any work).
DEVICE_OPT = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto (cuda when available, else cpu).")


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-v, -vv).")) -> None:
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


def emit(result: dict[str, Any], as_json: bool, show: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Print a command's result: a rich view to stderr, and with --json one JSON line on stdout."""
    if show is not None:
        show(result)
    if as_json:
        sys.stdout.write(json.dumps(_jsonable(result), separators=(",", ":")) + "\n")
        sys.stdout.flush()


def kv_table(title: str, rows: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in rows.items():
        t.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    return t


def fail(msg: str, code: int = 2) -> None:
    """Stop with a clear one-line error (no traceback)."""
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)
