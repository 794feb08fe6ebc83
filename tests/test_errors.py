"""One error family: every refusal is an LlmpressError, the CLI turns it into one line and an exit code."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import llmpress
from llmpress import errors
from llmpress.cli.app import _App, _verbosity

SRC = Path(llmpress.__file__).parent

# the classes that existed before errors.py, with the builtin base their callers catch
KEPT_BASES = {
    "llmpress.lossless.reader:CorruptError": (errors.CorruptFileError, ValueError),
    "llmpress.lossless.segments:HeaderError": (errors.CorruptFileError, ValueError),
    "llmpress.targets.api:ExportRefused": (errors.UnsupportedModelError, ValueError),
    "llmpress.io.atomic:OutputExistsError": (errors.OutputExistsError, FileExistsError),
    "llmpress.device:DeviceError": (errors.InputError, ValueError),
    "llmpress.recovery.data:TextOverlapError": (errors.InputError, ValueError),
    "llmpress.cluster:ClusterError": (errors.ResourceLimitError, RuntimeError),
    "llmpress.integrations.lm_eval:TaskError": (errors.InputError, ValueError),
}


@pytest.mark.parametrize("where", sorted(KEPT_BASES))
def test_existing_errors_join_the_family_and_keep_their_builtin_base(where):
    import importlib

    mod, name = where.split(":")
    cls = getattr(importlib.import_module(mod), name)
    for base in KEPT_BASES[where]:
        assert issubclass(cls, base), (cls, base)
    assert issubclass(cls, errors.LlmpressError)


def test_every_error_class_in_the_library_is_in_the_family():
    """A new `class XError(ValueError)` outside errors.py would escape the CLI's one handler."""
    import builtins

    stray = []
    for p in SRC.rglob("*.py"):
        if p.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Refused")):
                bases = [ast.unparse(b) for b in node.bases]
                if all(isinstance(getattr(builtins, b, None), type) for b in bases):
                    stray.append(f"{p.relative_to(SRC)}:{node.name}({', '.join(bases)})")
    assert not stray, stray


FLAG = re.compile(r"(?:^|[\s(`'\"/])--[a-z][a-z-]+")


def test_library_messages_name_no_cli_flag():
    """The library's refusals speak of arguments; flags are the CLI's wording (cli/app.py HINTS)."""
    found = []
    for p in SRC.rglob("*.py"):
        if p.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for c in ast.walk(node.exc):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and FLAG.search(c.value):
                        found.append(f"{p.relative_to(SRC)}:{node.lineno}: {c.value!r}")
    assert not found, found


def _app_raising(exc: BaseException) -> typer.Typer:
    app = _App(pretty_exceptions_enable=False)

    @app.callback()
    def root(verbose: int = typer.Option(0, "--verbose", "-v", count=True)) -> None:
        _verbosity["level"] = verbose

    @app.command()
    def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize("exc, code", [
    (errors.InputError("model.layers.0.weight: bits must be in 2..8"), 2),
    (errors.CorruptFileError("/x/llmpress.json: shard 'a.safetensors' is not inside the folder"), 2),
    (errors.NotFoundError("w.llmp: no tensor 'b'"), 2),
    (errors.MissingInputError("/x: no such model"), 2),
    (errors.OutputExistsError("/x/out exists"), 2),
    (errors.UnsupportedModelError("GPT2: no rule for Conv1D"), 2),
    (errors.ResourceLimitError("llama.cpp's tools not found"), 1),
    (errors.DivergedError("the loss became nan at step 3"), 1),
    (FileNotFoundError(2, "No such file or directory", "/x/y"), 2),
    (OSError(28, "No space left on device", "/x/out.tmp"), 1),
])
def test_cli_prints_one_line_and_the_exit_code(exc, code):
    r = CliRunner().invoke(_app_raising(exc), ["boom"])
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    if isinstance(exc, errors.LlmpressError):
        assert str(exc) in lines[0]
    if isinstance(exc, errors.OutputExistsError):
        assert "--force" in lines[0]  # the CLI's hint, not the library's words


def test_cli_shows_the_traceback_only_with_vv():
    app = _app_raising(errors.InputError("bad [value]"))
    r = CliRunner().invoke(app, ["-v", "boom"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "bad [value]" in r.output
    r = CliRunner().invoke(app, ["-vv", "boom"])
    assert r.exit_code == 2 and "Traceback" in r.output and "bad [value]" in r.output


def test_cli_lets_a_bug_through():
    """Only the family is caught: a programming error keeps its traceback (and a non-zero exit)."""
    r = CliRunner().invoke(_app_raising(ZeroDivisionError("x")), ["boom"])
    assert r.exit_code == 1 and isinstance(r.exception, ZeroDivisionError)


def test_real_commands_go_through_the_one_handler(tmp_path):
    from llmpress.cli import _load_commands, app

    _load_commands()
    (tmp_path / "junk.llmp").write_bytes(b"hello world" * 9)
    r = CliRunner().invoke(app, ["verify", str(tmp_path / "junk.llmp")])
    assert r.exit_code == 2 and "not an llmpress container" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["-vv", "verify", str(tmp_path / "junk.llmp")])
    assert r.exit_code == 2 and "Traceback" in r.output
    r = CliRunner().invoke(app, ["verify", str(tmp_path / "missing.llmp")])
    assert r.exit_code == 2 and "missing.llmp" in r.output and "Traceback" not in r.output
