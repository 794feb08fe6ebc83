"""The ``llmpress`` command line: thin, parses, calls the API, prints.

Each module of this package adds its commands to the one Typer ``app`` (see ``app.py``);
``main`` imports them all, so a new command is a new module here and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil

from .app import app

__all__ = ["app", "main"]


def _load_commands() -> None:
    for m in pkgutil.iter_modules(__path__):
        if m.name != "app" and not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


def main() -> None:
    _load_commands()
    app()
