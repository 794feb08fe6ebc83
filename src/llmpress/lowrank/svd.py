"""Truncated SVD, exact and randomized, and the plain low-rank codecs ``svd`` and ``rsvd``.

Eckart–Young: for A (m, n) with singular values σ₁ ≥ σ₂ ≥ …, the best rank-k approximation in
Frobenius norm is A_k = U_k Σ_k V_kᵀ and ‖A − A_k‖²_F = Σ_{i>k} σ_i². This is the seed's method
(A = UΣVᵀ, keep rank k). It minimises the error on the *weights*; LLM weight matrices are not
low-rank, so at a rank that saves memory it loses most of the model (see ``whiten.py`` for the
error that matters, ‖(W − W')X‖).

Randomized SVD (Halko, Martinsson & Tropp 2011, via ``torch.svd_lowrank``): project onto
k + p random directions (p = oversampling), sharpen the subspace with q power iterations
(A Aᵀ)^q A Ω, then an exact SVD of the small projected matrix.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from llmpress.tensor import register

from ..errors import InputError
from .allocate import rank_for_energy, rank_for_ratio
from .base import LowRankCodec

log = logging.getLogger(__name__)

Factors = tuple[Tensor, Tensor, Tensor]  # U (m, q), s (q,), Vh (q, n)


# Randomized defaults, chosen from ``bench/lowrank.py``'s SVD table (SmolLM2-135M's weight shapes,
# CPU time, 1 thread). Oversampling by half the rank (at least 10) with 2 power iterations keeps
# the truncation error close to exact SVD's, where a fixed oversampling of 10 fell visibly short at
# larger ranks. The sketch's cost grows with l = k + p (≈ (2·niter + 2)·m·n·l flops plus QRs of l
# columns) while LAPACK's full SVD does not, so past a fraction CROSSOVER of min(m, n) the sketch
# stops paying and its small extra error shows in the model's KL: there the rsvd codec runs the
# exact SVD. Ranks that remove 10–40 % of a layer's parameters lie past the crossover; rsvd pays
# at small ranks.
OVERSAMPLE_MIN = 10
OVERSAMPLE_FRACTION = 0.5
NITER = 2
CROSSOVER = 0.4


def sketch_size(m: int, n: int, k: int, oversample: int | None = None) -> int:
    """l = k + p directions for a rank-k sketch: p = ``oversample``, or max(10, ⌈k/2⌉) by default."""
    p = max(OVERSAMPLE_MIN, math.ceil(OVERSAMPLE_FRACTION * k)) if oversample is None else int(oversample)
    if p < 0:
        raise InputError(f"oversample must be ≥ 0; got {oversample}")
    return min(k + p, m, n)


def _exact(a: Tensor, q: int, oversample: int | None, niter: int) -> Factors:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :q], s[:q], vh[:q]


def _randomized(a: Tensor, q: int, oversample: int | None, niter: int) -> Factors:
    m, n = a.shape
    with torch.random.fork_rng(devices=[]):  # a fixed sketch: the codec is deterministic
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(a, q=sketch_size(m, n, q, oversample), niter=niter)  # u (m, l), s (l,), v (n, l)
    return u[:, :q], s[:q], v[:, :q].T


# solver name -> f(A, q, oversample, niter) -> the q leading singular triplets
SOLVERS: dict[str, Callable[[Tensor, int, int | None, int], Factors]] = {"exact": _exact, "randomized": _randomized}


@dataclass
class Truncation:
    """The result of a truncated SVD: A ≈ u diag(s) vh, and how much of ‖A‖²_F it keeps."""

    u: Tensor  # (m, k)
    s: Tensor  # (k,)
    vh: Tensor  # (k, n)
    energy_total: float  # ‖A‖²_F
    energy_kept: float  # Σ_{i≤k} σ_i²
    solver: str = "exact"  # the solver that ran (a randomized request past the crossover runs exact)

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def tail(self) -> float:
        """Σ_{i>k} σ_i² = ‖A − A_k‖²_F (Eckart–Young)."""
        return max(0.0, self.energy_total - self.energy_kept)


def truncated_svd(
    a: Tensor,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    solver: str = "exact",
    oversample: int | None = None,
    niter: int = NITER,
    crossover: float = CROSSOVER,
) -> Truncation:
    """Rank-k SVD of ``a`` (m, n), k given directly, by a parameter ratio or by an energy fraction.

    ``ratio``: keep ``ratio`` of the m·n parameters, k = ⌊ratio·mn/(m+n)⌋ (see ``allocate``).
    ``energy``: the smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ σ_i². With the randomized solver
    the spectrum is not known in full, so the sketch size doubles until it holds enough energy.
    Randomized: ``oversample`` p (default max(10, ⌈k/2⌉)), ``niter`` power iterations; where the
    sketch k + p exceeds ``crossover`` · min(m, n) the exact SVD is faster, and it runs instead
    (logged; ``crossover`` ≥ 1 never hands over).
    """
    if solver not in SOLVERS:
        raise InputError(f"unknown SVD solver {solver!r}; known: {', '.join(SOLVERS)}")
    if not crossover > 0.0:
        raise InputError(f"crossover must be > 0 (a fraction of min(m, n)); got {crossover}")
    m, n = a.shape
    total = float((a * a).sum())

    def run(q: int) -> tuple[Factors, str]:
        name = solver
        if solver == "randomized" and sketch_size(m, n, q, oversample) > crossover * min(m, n):
            log.debug("rsvd: a %d-direction sketch of a (%d, %d) matrix is past the crossover (%.2f · %d): "
                      "exact SVD is faster here", sketch_size(m, n, q, oversample), m, n, crossover, min(m, n))
            name = "exact"
        if name == "exact" and energy is not None:
            q = min(m, n)  # the full SVD costs the same: keep the whole spectrum for the energy rule
        return SOLVERS[name](a, q, oversample, niter), name

    if energy is None:
        k = rank if rank is not None else rank_for_ratio(m, n, ratio if ratio is not None else 0.8)
        if not 1 <= k <= min(m, n):
            raise InputError(f"rank {k} is outside 1..min(m, n) = {min(m, n)} for a ({m}, {n}) matrix")
        (u, s, vh), used = run(k)
    else:
        q = min(m, n) if solver == "exact" else min(32, m, n)
        while True:
            (u, s, vh), used = run(q)
            got = float((s.double() ** 2).sum())
            if q >= min(m, n) or used == "exact" or got >= energy * total:
                break
            q = min(2 * q, min(m, n))
            log.debug("randomized SVD held %.4f of the energy; sketching %d directions", got / max(total, 1e-300), q)
        k = rank_for_energy(s, energy, total=total)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    return Truncation(u, s, vh, total, float((s.double() ** 2).sum()), used)


@register("svd")
class SVD(LowRankCodec):
    """Plain truncated SVD of W (exact, ``torch.linalg.svd``): minimises ‖W − W'‖_F.

    Params: one of ``rank``, ``ratio`` (fraction of the layer's m·n parameters kept, default 0.8),
    ``energy`` (fraction of Σσ² kept); ``factor_dtype`` (storage dtype of the factors).
    """

    solver = "exact"


@register("rsvd")
class RSVD(LowRankCodec):
    """Plain truncated SVD by randomized sketching (``torch.svd_lowrank``).

    Extra params: ``oversample`` p (default max(10, ⌈k/2⌉)), ``niter`` power iterations (default 2)
    and ``crossover`` (default 0.4): where the sketch k + p exceeds crossover · min(m, n), exact SVD
    is faster and runs instead (``meta["solver"]`` says which ran; ``crossover: 1`` never hands over).
    """

    solver = "randomized"
