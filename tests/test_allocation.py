"""Allocation over a menu: the exact knapsack, the menus and their costs, the Fisher proxy, the CLI."""
from __future__ import annotations

import itertools
import random

import pytest

from llmpress.sweep.knapsack import solve, units


def _brute(costs, values, cap):
    best, arg = None, None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        c = sum(costs[i][o] for i, o in enumerate(pick))
        v = sum(values[i][o] for i, o in enumerate(pick))
        if c <= cap and (best is None or v < best - 1e-12):
            best, arg = v, pick
    return best, arg


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_is_exact_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    costs = [[rng.randint(0, 12) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    values = [[rng.random() * 10 for _ in c] for c in costs]
    cap = rng.randint(0, 40)
    best, _ = _brute(costs, values, cap)
    pick = solve(costs, values, cap)
    if best is None:
        assert pick is None
        return
    assert sum(costs[i][o] for i, o in enumerate(pick)) <= cap
    assert sum(values[i][o] for i, o in enumerate(pick)) == pytest.approx(best, abs=1e-9)


def test_greedy_walk_is_not_exact_but_the_solver_is():
    # the greedy walk (best gain per bit first) takes b's cheap first step (1.5 per bit), after
    # which a's upgrade no longer fits and it ends at 10 + 0; the optimum upgrades a alone: 0 + 5
    costs = [[0, 10], [0, 1, 10]]
    values = [[10.0, 0.0], [5.0, 3.5, 0.0]]
    assert solve(costs, values, 10) == [1, 0]


def test_units_round_up_within_tolerance():
    costs = [[1000 * b + 7 for b in (2, 3, 4)] for _ in range(10)]
    budget = 3.5 * 1000 * 10
    c, cap, u = units(costs, budget)
    assert u == int(1e-3 * budget / 10)
    pick = solve(c, [[3.0, 2.0, 1.0]] * 10, cap)
    spent = sum(costs[i][o] for i, o in enumerate(pick))
    assert spent <= budget and spent >= budget - 10 * 1000 - 10 * u  # within one step + rounding
