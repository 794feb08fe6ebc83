"""What every bench output records beside its figures: the command that made them, the commit and the date.

    from _record import record
    result = {**record(), "rows": rows}      # {"command", "commit", "date"}

``scripts/benchmarks_md.py`` prints these three beside every figure of docs/BENCHMARKS.md. The
commit is ``git rev-parse --short HEAD`` of the repository, marked ``+dirty`` when tracked files
differ from it (the figures then come from code no commit holds).
"""
from __future__ import annotations

import datetime as dt
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (c or "unknown") + ("+dirty" if dirty else "")


def command(argv: list[str] | None = None) -> str:
    """The command line as it can be typed again from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv[1:]])


def record(argv: list[str] | None = None) -> dict[str, str]:
    return {"command": command(argv), "commit": commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
