"""The exact solver of an allocation: a multiple-choice knapsack by dynamic programming.

Each item (a linear layer) takes exactly one of its options; option o of item l costs c[l][o]
(integer units) and loses v[l][o] (predicted ΔKL). :func:`solve` returns the choice that minimizes
Σ v under Σ c ≤ capacity, exactly: dp[c] = the least loss of the items so far at a total cost of
at most c, one pass per item and option over the capacity axis (numpy), with each item's argmin
kept for the walk back. Time O(Σ options · capacity), memory O(items · capacity) bytes.

:func:`units` turns costs in bits into integer units fine enough for a budget: each item's cost
above its cheapest option is rounded up to a unit u = ⌊tol · budget / items⌋ bits, so a choice
the solver returns never exceeds the budget and the rounding gives up at most items · u ≤
tol · budget of it (tol = 0.1 % by default).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InputError

TOL = 1e-3  # budget fraction the cost rounding may give up


def solve(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int) -> list[int] | None:
    """Index of the chosen option per item minimizing the summed value with Σ cost ≤ capacity,
    or None when even the cheapest choice does not fit. Costs are non-negative integers."""
    if capacity < 0:
        return None
    inf = np.inf
    dp = np.zeros(capacity + 1)  # no items: loss 0 at any capacity
    picks: list[np.ndarray] = []
    for c_l, v_l in zip(costs, values):
        if len(c_l) == 0 or len(c_l) != len(v_l):
            raise InputError("every item needs at least one option, with as many costs as values")
        if len(c_l) > 32767:
            raise InputError("too many options for one item")
        new = np.full(capacity + 1, inf)
        arg = np.zeros(capacity + 1, dtype=np.int16)
        for o, (c, v) in enumerate(zip(c_l, v_l)):
            c = int(c)
            if c < 0:
                raise InputError(f"negative cost {c}")
            if c > capacity:
                continue
            cand = dp[: capacity + 1 - c] + float(v)  # (capacity + 1 − c,)
            better = cand < new[c:]
            new[c:] = np.where(better, cand, new[c:])
            arg[c:] = np.where(better, o, arg[c:])
        dp = new
        picks.append(arg)
    if not np.isfinite(dp[capacity]):
        return None
    choice = [0] * len(picks)
    c = capacity
    for i in range(len(picks) - 1, -1, -1):
        o = int(picks[i][c])
        choice[i] = o
        c -= int(costs[i][o])
    return choice


def units(costs_bits: Sequence[Sequence[int]], budget_bits: float, tol: float = TOL,
          unit: int | None = None) -> tuple[list[list[int]], int, int]:
    """(costs in units above each item's cheapest option, the capacity left for them, the unit in
    bits). Rounding the extra costs up keeps every solution within the budget; the unit is
    ⌊tol · budget / items⌋ bits (at least 1) unless given."""
    n = max(1, len(costs_bits))
    u = unit if unit is not None else max(1, math.floor(tol * budget_bits / n))
    base = [min(c) for c in costs_bits]
    cap = math.floor((budget_bits - sum(base)) / u)
    return [[-(-(int(c) - b) // u) for c in cs] for cs, b in zip(costs_bits, base)], cap, u
