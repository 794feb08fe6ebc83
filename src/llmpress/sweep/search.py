"""The near-lossless search: the smallest configuration whose mean KL stays within ``max_kl``.

A budget's fixed points leave gaps (the quick budget jumps from RTN 6-bit to RTN 8-bit), so the
smallest point meeting the threshold is often far above the smallest configuration that would.
The search fills the gaps where it matters. Each *ladder* is one method and group size over its
bit widths; along a ladder mean KL falls as bits rise, so the fewest bits meeting the threshold are
found by bisection (points the sweep already measured are reused, not run again). The winner of
each ladder is then packed losslessly (codes and scales entropy-coded): the same weights, so the
same KL, at fewer bits. Ladders are tried in order until the time allowed is spent; a ladder
whose fewest bits cannot beat the best found so far (its raw bits per weight only, before any
scale) is skipped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..tensor import get_codec
from .points import Point, quant, quant_pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ladder:
    method: str
    group: int
    bits: tuple[int, ...]  # ascending

    @property
    def calib(self) -> bool:
        return get_codec(self.method).needs_stats

    def point(self, bits: int) -> Point:
        return quant(self.method, bits, self.group, calib=self.calib)

    def packed(self, bits: int) -> Point:
        return quant_pack(self.method, bits, self.group, calib=self.calib)


# in the order they are tried: GPTQ first (fewest bits for a given KL), RTN as the fallback
LADDERS: tuple[Ladder, ...] = (
    Ladder("gptq", 128, (4, 5, 6, 8)),
    Ladder("gptq", 64, (4, 5, 6)),
    Ladder("rtn", 128, (5, 6, 8)),
)
# seconds the search may spend (on top of the budget's own points)
SEARCH_SECONDS = {"quick": 15 * 60, "full": 60 * 60}

Run = Callable[[list[Point]], list[dict[str, Any]]]  # runs (or reuses) points, returns their rows


def _ok(row: dict[str, Any], max_kl: float) -> bool:
    return row.get("kl_mean") is not None and row["kl_mean"] <= max_kl


def fewest_bits(ladder: Ladder, run: Run, max_kl: float, deadline: float) -> tuple[int, dict[str, Any]] | None:
    """Bisection along ``ladder`` for the fewest bits with mean KL ≤ ``max_kl``: (bits, that point's
    row), or None (no width meets it, or time ran out before one was found)."""
    lo, hi = 0, len(ladder.bits) - 1
    best = None
    while lo <= hi and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        row = run([ladder.point(ladder.bits[mid])])[0]
        if _ok(row, max_kl):
            best, hi = (ladder.bits[mid], row), mid - 1
        else:
            lo = mid + 1
    return best


def near_lossless(run: Run, max_kl: float, seconds: float, known: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Search the ladders for the smallest configuration with mean KL ≤ ``max_kl`` within ``seconds``;
    ``known`` rows (the sweep's) bound the search. Returns the rows it produced or reused."""
    deadline = time.monotonic() + seconds
    rows: list[dict[str, Any]] = []
    ok = [r for r in known if r["family"] != "lossless" and _ok(r, max_kl)]
    bound = min((r["bpw"] for r in ok), default=float("inf"))
    for ladder in LADDERS:
        if time.monotonic() >= deadline:
            log.info("near-lossless search: time is up before the %s g%d ladder", ladder.method, ladder.group)
            break
        if ladder.bits[0] >= bound:
            continue
        hit = fewest_bits(ladder, run, max_kl, deadline)
        if hit is None:
            continue
        bits, found = hit
        rows.append(found)
        if time.monotonic() < deadline and bits < bound:
            packed = run([ladder.packed(bits)])[0]
            rows.append(packed)
            found = packed if packed["bpw"] < found["bpw"] else found
        bound = min(bound, found["bpw"])
        log.info("near-lossless search: %s at %.3f bpw (KL %.4g)", found["label"], found["bpw"], found["kl_mean"])
    return rows
