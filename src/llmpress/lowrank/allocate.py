"""Rank choice: a parameter ratio, an energy threshold, and a budgeted allocation.

What "ratio" means everywhere in llmpress.lowrank: the fraction of a linear layer's parameters
that is *kept*. A layer W (m, n) factorized at rank k stores k(m + n) numbers instead of m·n, so
ratio = k(m + n) / (m·n) and ``--ratio 0.8`` keeps 80 % of the linear-layer parameters (20 %
removed). Uniform allocation gives every layer k = ⌊ratio · mn / (m + n)⌋; a layer saves
anything only while k(m + n) < m·n, i.e. k < mn / (m + n).

Energy threshold (the seed's "A_k ≈ A"): the smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ_i σ_i².

Budgeted allocation: the same total parameter budget, ratio · Σ_l m_l n_l, spent where it buys
the most. The measured sensitivity of layer l is its whitened spectrum: with S Sᵀ = X Xᵀ
(calibration activations), ‖(W − W_k)X‖²_F = Σ_{i>k} σ_i(W S)², so adding rank i to layer l
removes σ_i² / ‖W S‖²_F of that layer's relative output error at a cost of m_l + n_l parameters.
These gains fall within each layer, so spending greedily on the best gain per parameter is the
optimal prefix choice for this separable objective. Every layer keeps at least ``floor`` of its
parameters.

The spectrum is a layer's whole error-vs-rank curve, so it is all the allocation needs: it is taken
while the layer's Gram matrix is in hand, one block at a time, and the Gram matrix is freed before
the next block's is built (``api.layer_spectra``): the live Gram matrices are one block's, not
the model's.
"""
from __future__ import annotations

import heapq
import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError

log = logging.getLogger(__name__)


def check_ratio(ratio: float) -> float:
    r = float(ratio)
    if not 0.0 < r < 1.0 or math.isnan(r):
        raise InputError(f"ratio must be in (0, 1): the fraction of linear-layer parameters kept; got {ratio}")
    return r


def check_energy(energy: float) -> float:
    e = float(energy)
    if not 0.0 < e <= 1.0 or math.isnan(e):
        raise InputError(f"energy must be in (0, 1]: the fraction of Σσ² kept; got {energy}")
    return e


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """k = ⌊ratio · mn / (m + n)⌋, at least 1: the rank that keeps ``ratio`` of m·n parameters."""
    return max(1, int(check_ratio(ratio) * m * n / (m + n)))


def max_useful_rank(m: int, n: int) -> int:
    """The largest k with k(m + n) < m·n: beyond it a factorization saves nothing."""
    return (m * n - 1) // (m + n)


def saves(m: int, n: int, k: int) -> bool:
    return k * (m + n) < m * n


def rank_for_energy(s: Tensor, energy: float, total: float | None = None) -> int:
    """The smallest k with Σ_{i≤k} s_i² ≥ energy · total (total defaults to Σ s_i²)."""
    e = check_energy(energy)
    s2 = s.double() ** 2
    total = float(s2.sum()) if total is None else float(total)
    if total <= 0.0:
        return 1
    cum = torch.cumsum(s2, 0)
    # A relative slack of 1e-12 so that energy = 1 means "all of it" despite rounding.
    k = int(torch.searchsorted(cum, torch.tensor(e * total * (1 - 1e-12), dtype=cum.dtype))) + 1
    return max(1, min(k, s.numel()))


@dataclass
class LayerSpectrum:
    """One layer's measured sensitivity: σ_i² of W·S (descending) and ‖W·S‖²_F."""

    name: str
    m: int  # out features
    n: int  # in features
    sigma2: Tensor  # (min(m, n),) float64, descending
    total: float


def allocate_budget(
    spectra: list[LayerSpectrum],
    ratio: float,
    *,
    floor: float = 0.1,
    weights: dict[str, float] | None = None,
) -> dict[str, int | None]:
    """Ranks under a total budget of ``ratio`` · Σ m·n parameters; ``None`` = left dense.

    Greedy on gain per parameter, gain = weight_l · σ_{l,i}² / ‖W_l S_l‖²_F, cost = m_l + n_l.
    Every layer starts at its ``floor`` rank (keeps at least ``floor`` of its parameters); a layer
    that reaches its largest useful rank is left dense when the budget still covers it.
    """
    check_ratio(ratio)
    if not 0.0 < floor < ratio:
        raise InputError(f"floor must be in (0, ratio={ratio}); got {floor}")
    weights = weights or {}
    budget = ratio * sum(sp.m * sp.n for sp in spectra)
    ranks = {sp.name: min(rank_for_ratio(sp.m, sp.n, floor), max_useful_rank(sp.m, sp.n)) for sp in spectra}
    spent = sum(ranks[sp.name] * (sp.m + sp.n) for sp in spectra)
    if spent > budget:
        raise InputError(f"the floor alone ({spent} parameters) exceeds the budget ({budget:.0f})")
    # One frontier item per layer: the gain of its next rank. A heap keeps the best on top.
    heap: list[tuple[float, str]] = []
    by_name = {sp.name: sp for sp in spectra}

    def push(sp: LayerSpectrum) -> None:
        k = ranks[sp.name]
        if k < max_useful_rank(sp.m, sp.n) and k < sp.sigma2.numel() and sp.total > 0:
            gain = weights.get(sp.name, 1.0) * float(sp.sigma2[k]) / sp.total / (sp.m + sp.n)
            heapq.heappush(heap, (-gain, sp.name))

    for sp in spectra:
        push(sp)
    while heap:
        _, name = heapq.heappop(heap)
        sp = by_name[name]
        cost = sp.m + sp.n
        if spent + cost > budget:
            continue  # the same cost never fits later: this layer is done
        ranks[name] += 1
        spent += cost
        push(sp)
    out: dict[str, int | None] = dict(ranks)
    for sp in spectra:  # a layer at its cap goes dense if the rest of the budget pays for it
        k = ranks[sp.name]
        extra = sp.m * sp.n - k * (sp.m + sp.n)
        if k >= max_useful_rank(sp.m, sp.n) and spent + extra <= budget:
            out[sp.name] = None
            spent += extra
    log.info("budgeted allocation: %d of %.0f parameters (%.4f of the dense layers)", spent, budget,
             spent / max(1.0, budget / ratio))
    return out


def allocated_params(spectra: list[LayerSpectrum], ranks: dict[str, int | None]) -> int:
    """Parameters stored under an allocation (dense layers count m·n)."""
    tot = 0
    for sp in spectra:
        k = ranks[sp.name]
        tot += sp.m * sp.n if k is None else k * (sp.m + sp.n)
    return tot


def exact_rule(name: str) -> str:
    """A recipe regex that matches one module name and nothing else."""
    return "^" + re.escape(name) + "$"
