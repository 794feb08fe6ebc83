"""The Typer app, shared options and the output conventions of every command.

``--json`` prints one JSON object as the last line of stdout; everything else a command
shows (tables, progress) goes to stderr or before that line.

Errors: every command runs inside :func:`_one_line_errors` (attached by ``app.command``), which
catches the library's :class:`~llmpress.errors.LlmpressError` family, and the OS's own refusals
(``OSError``: a missing file, a full disk), and prints one line: exit code 2 for bad input, 1
otherwise; the traceback only with ``-vv``. The library names no flag; :data:`HINTS` adds the
flag a user can reach for.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from ..errors import BaseModelError, LlmpressError, OutputExistsError

F = TypeVar("F", bound=Callable[..., Any])
# Human output goes to stderr so that stdout stays clean for --json.
console = Console(stderr=True)
_verbosity = {"level": 0}  # set by the root callback: -v count
# The CLI's own wording added to a library error of this type (the library never names flags).
HINTS: dict[type[BaseException], str] = {OutputExistsError: "--force overwrites it",
                                         BaseModelError: "--base names the base model"}
# OS errors that mean the user's input is bad (exit 2); any other OSError (a full disk) exits 1.
_BAD_INPUT_OS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def exit_code(e: BaseException) -> int:
    """2 for bad input (an argument, a missing or corrupt file, an existing output), 1 otherwise."""
    if isinstance(e, LlmpressError):
        return e.exit_code
    return 2 if isinstance(e, _BAD_INPUT_OS) else 1


def error_line(e: BaseException) -> str:
    """The one line shown for ``e``: its message plus the CLI's hint for its type."""
    msg = str(e) if isinstance(e, LlmpressError) else (f"{e.filename}: {e.strerror}" if getattr(e, "filename", None)
                                                       and getattr(e, "strerror", None) else str(e))
    hint = next((h for t, h in HINTS.items() if isinstance(e, t)), None)
    return f"{msg} ({hint})" if hint else msg


def _one_line_errors(f: F) -> F:
    """Run a command; an LlmpressError or OSError becomes one line on stderr and an exit code."""

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (LlmpressError, OSError) as e:
            if _verbosity["level"] >= 2:
                console.print_exception()
            console.print(f"[bold red]error:[/] {escape(error_line(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code(e)) from None

    return run  # type: ignore[return-value]


class _App(typer.Typer):
    """A Typer app whose every command runs inside :func:`_one_line_errors`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(*args, **kwargs)
        return lambda f: register(_one_line_errors(f))


app = _App(
    name="llmpress",
    help="Compress large language models and find how far each one can be compressed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JSON_OPT = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout.")
FORCE_OPT = typer.Option(False, "--force", help="Overwrite an existing output.")
# Calibration options shared by every command that runs the sequential pipeline.
CALIB_OPT = typer.Option(None, "--calib", help="Calibration text: corpus name or file (default: the calibration mix).")
SAMPLES_OPT = typer.Option(128, "--samples", help="Calibration windows.")
SEQ_LEN_OPT = typer.Option(512, "--seq-len", help="Tokens per calibration window.")
# Where every command that computes runs (llmpress.device.resolve_device checks it before any work).
DEVICE_OPT = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto (cuda when available, else cpu).")


def rotate_option(rotate: bool, mlp: bool, keep_head: bool, inputs: bool = False) -> bool | dict[str, bool]:
    """``rotate=`` of compress from --rotate, --rotate-mlp, --rotate-keep-head and --rotate-inputs
    (each of the last three implies --rotate)."""
    spec = {k: True for k, on in (("mlp", mlp), ("keep_head", keep_head), ("inputs", inputs)) if on}
    return spec or rotate


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-v, -vv).")) -> None:
    _verbosity["level"] = verbose
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
