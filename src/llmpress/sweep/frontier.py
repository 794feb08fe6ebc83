"""Pareto frontier, knee and near-lossless points of a rate–quality sweep."""
from __future__ import annotations

import math
from typing import Any

Row = dict[str, Any]


def pareto(rows: list[Row], x: str = "bpw", y: str = "kl_mean") -> list[Row]:
    """Rows not dominated by another (lower-or-equal x and y, one strictly), sorted by x."""
    pts = sorted((r for r in rows if r.get(x) is not None and r.get(y) is not None), key=lambda r: (r[x], r[y]))
    front: list[Row] = []
    best = math.inf
    for r in pts:
        if r[y] < best:
            front.append(r)
            best = r[y]
    return front


def knee(front: list[Row], x: str = "bpw", y: str = "kl_mean", floor: float = 1e-6) -> Row | None:
    """The knee by the Kneedle rule: with x and log10(y) scaled to [0, 1] between the
    frontier's ends, the point farthest below the straight line joining them."""
    pts = [r for r in front if r[y] is not None]
    if len(pts) < 3:
        return None
    xs = [r[x] for r in pts]
    ys = [math.log10(max(r[y], floor)) for r in pts]
    x0, x1, y0, y1 = xs[0], xs[-1], ys[0], ys[-1]
    if x1 == x0 or y1 == y0:
        return None
    best, best_d = None, 0.0
    for r, xv, yv in zip(pts, xs, ys):
        u, v = (xv - x0) / (x1 - x0), (yv - y0) / (y1 - y0)  # chord runs (0,0) → (1,1)
        d = v - u  # how far the point lies on the bend side of the chord (KL falls early)
        if d > best_d:
            best, best_d = r, d
    return best


def smallest(rows: list[Row], ok, y: str = "kl_mean") -> Row | None:
    """The row with the fewest bits per weight among those where ``ok(row)`` (of equal bits, the
    lower ``y``: the one :func:`pareto` keeps, so a smallest row meeting a threshold on ``y`` is on
    the frontier)."""
    cands = [r for r in rows if r.get("bpw") is not None and ok(r)]
    inf = float("inf")
    return min(cands, key=lambda r: (r["bpw"], inf if r.get(y) is None else r[y])) if cands else None


KNEE_METHOD = (
    "Kneedle: bits per weight and log10(mean KL) scaled to [0, 1] between the frontier's ends; "
    "the knee is the frontier point farthest from the chord joining them, on the bend side"
)
