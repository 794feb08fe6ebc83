"""The generated docs: docs/CLI.md is what scripts/cli_docs.py writes from the commands' own help."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cli_md_is_not_stale():
    text = _script("cli_docs").render()
    assert (REPO / "docs" / "CLI.md").read_text() == text, "docs/CLI.md is stale: run `make docs`"
    for name in ("limit", "pack", "quantize", "eval", "export"):  # every command has its section
        assert f"## `llmpress {name}`" in text
