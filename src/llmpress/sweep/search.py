"""The near-lossless search: the smallest configuration whose mean KL stays within ``max_kl``.

A budget's fixed points leave gaps (the quick budget jumps from RTN 6-bit to RTN 8-bit), so the
smallest point meeting the threshold is often far above the smallest configuration that would.
The search fills the gaps where it matters. Each *ladder* is a sequence of configurations of
rising size along which mean KL falls: one method and group size over its bit widths
(:class:`Uniform`), or the allocation of a menu over target bits per weight (:class:`Mixed`,
:mod:`.mixed`: the sensitive layers get more bits than the rest). The first rung meeting the
threshold is found by bisection. Every rung the search runs is packed losslessly (codes one
symbol each, scales entropy-coded: the same weights, so the same KL, at fewer bits), so one run
answers both questions, whether it meets the threshold and what it costs; a rung whose plain
form the sweep already measured and found over the threshold is not run again. Rungs that could
not beat the best found so far even if packing saved ``1 - PACK_FLOOR`` of their bits are not
tried, and ladders are tried in order within an allowance of CPU seconds (the points' own CPU time,
so a busy machine does not shorten the search). A point is never interrupted, so the allowance is
kept by not starting one: before each run its duration is predicted from the points this sweep has
measured (:class:`Estimate`) and a rung predicted to end past the allowance is not started.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..tensor import get_codec
from .points import Point, mixed, mixed_pack, quant, quant_pack

log = logging.getLogger(__name__)

Row = dict[str, Any]
Run = Callable[[list[Point]], list[Row]]  # runs (or reuses) points, returns their rows

# a rung is tried only where its bits per weight before packing, times this, is below the best
# found: a guess at the most packing saves (8-bit codes of a trained model lose ~6 %, 6-bit ~8 %)
PACK_FLOOR = 0.85


class Ladder(Protocol):
    @property
    def name(self) -> str: ...

    def __len__(self) -> int: ...

    def estimate(self, i: int) -> float:
        """Rung ``i``'s bits per weight before packing (what deciding to try it needs, before any run)."""
        ...

    def plain(self, i: int) -> Point: ...

    def packed(self, i: int) -> Point: ...


@dataclass(frozen=True)
class Uniform:
    """One method and group size at each of ``bits`` (ascending)."""

    method: str
    group: int
    bits: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.method} g{self.group}"

    @property
    def calib(self) -> bool:
        return get_codec(self.method).needs_stats

    def __len__(self) -> int:
        return len(self.bits)

    def estimate(self, i: int) -> float:
        return self.bits[i] + 32 / self.group  # a float16 scale and offset per group

    def plain(self, i: int) -> Point:
        return quant(self.method, self.bits[i], self.group, calib=self.calib)

    def packed(self, i: int) -> Point:
        return quant_pack(self.method, self.bits[i], self.group, calib=self.calib)


@dataclass(frozen=True)
class Mixed:
    """``menu``'s options allocated to each of ``targets`` bits per weight (ascending); the
    sensitivity table is measured once, at the first rung run, and serves the others."""

    menu: str
    targets: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"mixed {self.menu}"

    def __len__(self) -> int:
        return len(self.targets)

    def estimate(self, i: int) -> float:
        return self.targets[i]

    def plain(self, i: int) -> Point:
        return mixed(self.targets[i], self.menu)

    def packed(self, i: int) -> Point:
        return mixed_pack(self.targets[i], self.menu)


# in the order they are tried: AWQ's scales with GPTQ's codes at g128 first (the least scale
# overhead; on SmolLM2-135M it beat GPTQ at 6 bits and on every K-quant mix: bench/out), 6 bits
# (bisection's first rung) being where a mean KL of ~0.01 is usually crossed; then the allocation
# between GPTQ's widths, GPTQ g128 and g64, RTN as the fallback
LADDERS: tuple[Ladder, ...] = (
    Uniform("awq+gptq", 128, (5, 6, 8)),
    Mixed("near-lossless", tuple(4.5 + 0.25 * k for k in range(15))),  # 4.5 … 8.0
    Uniform("gptq", 128, (5, 6, 8)),
    Uniform("gptq", 64, (4, 5, 6)),
    Uniform("rtn", 128, (5, 6, 8)),
)
# the quick budget's: RTN only (a calibrated rung takes several CPU-minutes on a 135M model)
QUICK_LADDERS: tuple[Ladder, ...] = (
    Uniform("rtn", 128, (5, 6, 8)),
    Uniform("rtn", 64, (4, 5, 6)),
)
BUDGET_LADDERS: dict[str, tuple[Ladder, ...]] = {"quick": QUICK_LADDERS, "full": LADDERS}
# CPU seconds the search may spend (on top of the budget's own points)
SEARCH_SECONDS = {"quick": 240, "full": 60 * 60}
# CPU seconds a whole sweep of the budget may take (its points, then the search in what is left)
SWEEP_CPU_SECONDS: dict[str, float] = {"quick": 345}
# a calibrated point predicted with no calibrated row to go by: this many times the dearest row
CALIB_FACTOR = 5.0
# packing a quantized folder predicted with no point measured both ways: this share of the plain point
PACK_SHARE = 0.3

# a family no row of the sweep measured is predicted from another's rows: AWQ's scales with GPTQ's
# codes cost GPTQ's run and AWQ's scale search (each a pass over the calibration windows)
PROXY: dict[str, tuple[str, float]] = {"awq+gptq": ("gptq", 1.5), "awq": ("gptq", 1.2)}


def _ok(row: Row, max_kl: float) -> bool:
    return row.get("kl_mean") is not None and row["kl_mean"] <= max_kl


def cost(row: Row) -> float | None:
    """CPU seconds a row's point took (its wall seconds for a row measured before rows had them)."""
    return row.get("cpu_seconds", row.get("seconds"))


def _family(point: Point) -> str:
    return point.family.removesuffix("+pack")


@dataclass
class Estimate:
    """A point's duration predicted from the rows this sweep measured (all on one model, so a
    family's cost per parameter is its cost per point): the median of the same family's packed
    rows for a packed point, else of its plain rows plus what packing added to a point measured
    both ways; a family not measured is predicted from :data:`PROXY`'s family, scaled; with nothing
    to go by, the dearest calibrated row (or the dearest row), so a guess errs long."""

    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        if cost(row) is not None and row.get("family") != "lossless":
            self.rows.append(row)

    def _median(self, family: str) -> float | None:
        xs = [cost(r) for r in self.rows if r["family"] == family]
        return statistics.median(xs) if xs else None

    def pack_extra(self) -> float:
        """CPU seconds packing added: the largest of (packed − plain) over points measured both ways."""
        plain = {r["label"]: cost(r) for r in self.rows if not r["family"].endswith("+pack")}
        extra = [cost(r) - plain[r["label"].removesuffix("+pack")] for r in self.rows
                 if r["family"].endswith("+pack") and r["label"].removesuffix("+pack") in plain]
        return max([0.0, *extra])

    def _pack(self, plain: float) -> float:
        pairs = any(r["family"].endswith("+pack") for r in self.rows)
        return self.pack_extra() if pairs else PACK_SHARE * plain

    def seconds(self, point: Point) -> float:
        fam, packed = _family(point), point.family.endswith("+pack")
        scale = 1.0
        if self._median(fam) is None and self._median(fam + "+pack") is None and fam in PROXY:
            fam, scale = PROXY[fam]
        if packed and self._median(fam + "+pack") is not None:
            return scale * self._median(fam + "+pack")
        plain = self._median(fam)
        if plain is None:
            calib = [cost(r) for r in self.rows if r.get("calib", r["family"] not in ("rtn", "rtn+pack"))]
            every = [cost(r) for r in self.rows]
            plain = max(calib) if calib else max(every, default=0.0) * (CALIB_FACTOR if point.calib else 1.0)
            scale = 1.0
        return scale * plain + (self._pack(scale * plain) if packed else 0.0)


@dataclass
class Search:
    """One search: what it ran (``rows``, in order), what it skipped and why, its time."""

    max_kl: float
    allowance: float  # CPU seconds the runs may take together
    known: dict[str, Row]  # label → a row the sweep already has
    rows: list[Row]
    skipped: list[str]
    estimate: Estimate
    cut: bool = False  # a bisection stopped because the next run would overrun the allowance
    spent: float = 0.0  # CPU seconds of the runs so far (0 for a row reused)

    def fits(self, point: Point) -> bool:
        """Whether ``point`` is predicted to end within the allowance (a row reused costs nothing)."""
        if point.label in self.known:
            return True
        predicted = self.estimate.seconds(point)
        ok = self.spent < self.allowance and self.spent + predicted <= self.allowance
        if not ok:
            log.info("near-lossless search: %s predicted at %.0f s, %.0f s left: not started", point.label,
                     predicted, self.allowance - self.spent)
        return ok

    def decided(self, ladder: Ladder, i: int) -> Row | None:
        """Rung ``i``'s plain row when the sweep has it and it misses the threshold (no run needed)."""
        plain = self.known.get(ladder.plain(i).label)
        return plain if plain is not None and not _ok(plain, self.max_kl) else None

    def out_of_time(self, ladder: Ladder, i: int) -> bool:
        """Rung ``i`` needs a run (:meth:`decided` has no row for it) predicted to overrun the allowance."""
        return self.decided(ladder, i) is None and not self.fits(ladder.packed(i))

    def judge(self, ladder: Ladder, i: int, run: Run) -> Row:
        """Rung ``i``'s row: :meth:`decided`'s, else its packed point, run (or reused)."""
        plain = self.decided(ladder, i)
        if plain is not None:
            return plain
        point = ladder.packed(i)
        reused = point.label in self.known
        t0 = time.process_time()
        row = run([point])[0]
        if not reused:
            spent = cost(row)
            self.spent += spent if spent is not None else time.process_time() - t0
            self.estimate.add(row)
        self.known[row["label"]] = row
        self.rows.append(row)
        return row

    def first(self, ladder: Ladder, rungs: list[int], run: Run) -> Row | None:
        """Bisection over ``rungs`` (ascending) for the first whose mean KL ≤ ``max_kl``: its row,
        or None (none does, or the next run would overrun the allowance before one was found)."""
        lo, hi, best = 0, len(rungs) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.out_of_time(ladder, rungs[mid]):
                break
            row = self.judge(ladder, rungs[mid], run)
            if _ok(row, self.max_kl):
                best, hi = row, mid - 1
            else:
                lo = mid + 1
        self.cut |= lo <= hi
        return best


def near_lossless(run: Run, max_kl: float, seconds: float, known: list[Row],
                  ladders: tuple[Ladder, ...] | None = None) -> dict[str, Any]:
    """Search ``ladders`` (default :data:`LADDERS`) for the smallest configuration with mean KL ≤
    ``max_kl`` within ``seconds`` of CPU time; ``known`` rows (the sweep's) bound the search, decide
    rungs they measured and predict how long a rung takes (:class:`Estimate`). Returns ``rows``
    (every row it ran or reused, in order), ``best`` (the smallest row meeting the threshold, the
    sweep's included; None if none), ``skipped`` (ladders and why), ``seconds`` (CPU seconds its runs
    took) and ``complete`` (False where a run it needed was predicted to overrun the allowance)."""
    estimate = Estimate()
    for r in known:
        estimate.add(r)
    s = Search(max_kl, seconds, {r["label"]: r for r in known}, [], [], estimate)
    ok = [r for r in known if _ok(r, max_kl)]  # the lossless point included: a rung must beat it too
    best = min(ok, key=lambda r: (r["bpw"], r["kl_mean"]), default=None)
    complete = True
    for ladder in LADDERS if ladders is None else ladders:
        bound = best["bpw"] if best else float("inf")
        rungs = [i for i in range(len(ladder)) if ladder.estimate(i) * PACK_FLOOR < bound]
        if not rungs:
            s.skipped.append(f"{ladder.name}: cannot beat {bound:.3f} bpw")
            continue
        mid = rungs[(len(rungs) - 1) // 2]
        if s.out_of_time(ladder, mid):
            complete = False
            s.skipped.append(f"{ladder.name}: time is up (a rung is predicted at "
                             f"{s.estimate.seconds(ladder.packed(mid)):.0f} s, {max(0.0, seconds - s.spent):.0f} s left)")
            continue
        hit = s.first(ladder, rungs, run)
        if hit is not None and (best is None or (hit["bpw"], hit["kl_mean"]) < (best["bpw"], best["kl_mean"])):
            best = hit
            log.info("near-lossless search: %s at %.3f bpw (KL %.4g)", hit["label"], hit["bpw"], hit["kl_mean"])
    complete = complete and not s.cut
    return {"rows": s.rows, "best": best, "skipped": s.skipped, "seconds": s.spent, "complete": complete}
