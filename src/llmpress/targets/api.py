"""``llmpress.export``: write a model in a format another engine runs.

    import llmpress
    llmpress.export("out/q4", "out/q4-gguf.gguf", format="gguf")
    llmpress.export("out/q4", "out/q4-ct", format="compressed-tensors")
    llmpress.export("out/q4", "out/q4-dense", format="dense")

An export is exact: the codes and group parameters llmpress chose are the ones stored. Before any
work, every compressed layer is checked against the target (``Target.why_not``); the layers that
cannot be stored exactly are named, and ``fallback`` says what happens to them:

* ``refuse`` (the default): nothing is written, the error lists them with the reason;
* ``dense``: they are stored as float weights (their decoded values, so still what llmpress runs);
* ``requantize``: the target quantizes their decoded weights onto its own grid (changes them).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..errors import InputError, UnsupportedModelError
from ..io.atomic import atomic_dir, atomic_file
from . import FALLBACKS, ExportSource, get_target

log = logging.getLogger(__name__)


class ExportRefused(UnsupportedModelError):
    """Some layers cannot be stored exactly in the target format and the fallback is ``refuse``."""


def plan_actions(src: ExportSource, target: Any, fallback: str, **opts: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Each compressed parameter's action (``exact`` or the fallback) and, for the inexact ones,
    the reason."""
    if fallback not in FALLBACKS:
        raise InputError(f"unknown fallback {fallback!r}; known: {', '.join(FALLBACKS)}")
    if fallback != "refuse" and fallback not in target.fallbacks:
        raise InputError(f"the {target.name} export cannot carry out the fallback {fallback!r} "
                         f"(it can: {', '.join(('refuse',) + tuple(target.fallbacks))})")
    actions: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for name in src.compressed_names:
        why = target.why_not_layer(src, name, **opts)
        actions[name] = "exact" if why is None else fallback
        if why is not None:
            reasons[name] = why
    if reasons and fallback == "refuse":
        lines = [f"  {n}: {r}" for n, r in list(reasons.items())[:20]]
        more = f"\n  ... and {len(reasons) - 20} more" if len(reasons) > 20 else ""
        raise ExportRefused(f"{len(reasons)} of {len(actions)} compressed layers cannot be stored exactly as "
                            f"{target.name}:\n" + "\n".join(lines) + more +
                            f"\nchoose a fallback: {', '.join(target.fallbacks)}")
    return actions, reasons


def export(model: str | Path, out: str | Path, *, format: str = "dense", fallback: str = "refuse",
           force: bool = False, verify: bool = True, **opts: Any) -> dict[str, Any]:
    """Export ``model`` (an llmpress folder, a ``.llmp`` container or an original model) to ``out``
    in ``format``; returns a report (``format``, ``out``, ``exact`` / ``fallback`` layer counts,
    the fallback layers with their reasons, ``bytes_out``, ``seconds``, and what the target adds)."""
    t0 = time.perf_counter()
    target = get_target(format)
    out = Path(out)
    with ExportSource(model, verify=verify) as src:
        if (src.online or src.stream) and not target.folds_online:
            from ..quant.rotate import ONLINE_NOTE, online_where

            raise ExportRefused(f"{model}: its weights were made for "
                                + ONLINE_NOTE.format(where=online_where(src.online, src.stream))
                                + f" as {target.name}; export it dense (the rotation folded back into the weights), "
                                "or quantize again with the fused rotation alone (no online rotation)")
        actions, reasons = plan_actions(src, target, fallback, **opts)
        dest = target.output_path(out)
        opener = atomic_dir if target.output_is_dir else atomic_file
        with opener(dest, force=force) as tmp:
            extra = target.write(src, tmp, actions, **opts)
    files = [dest] if dest.is_file() else [p for p in dest.rglob("*") if p.is_file()]
    report = {
        "format": target.name,
        "source": str(model),
        "source_kind": src.kind,
        "out": str(dest),
        "exact": sum(a == "exact" for a in actions.values()),
        "fallback": {n: {"action": actions[n], "reason": r} for n, r in reasons.items()},
        "bytes_out": sum(f.stat().st_size for f in files),
        "seconds": time.perf_counter() - t0,
        **extra,
    }
    log.info("exported %s as %s: %d exact layers, %d by fallback", model, target.name, report["exact"], len(reasons))
    return report
