"""Low-rank math: SVD truncation, whitening, ASVD scaling, rank rules, codec round trips."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmpress.lowrank import allocate
from llmpress.lowrank.linear import LowRankLinear
from llmpress.lowrank import svd as svd_mod
from llmpress.lowrank.svd import truncated_svd
from llmpress.lowrank.whiten import whitening
from llmpress.tensor import Stats, get_codec


def _w(m=48, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g)


def _stats(x: torch.Tensor) -> Stats:
    s = Stats()
    s.add(x, gram=True)
    return s


def _correlated_x(n=32, t=400, seed=1):
    """Activations with a few heavy channels and correlations, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[None, :]
    x = torch.randn(t, n, generator=g) @ mix.T
    x[:, :3] *= 20.0
    return x  # (T, n)


@pytest.mark.parametrize("name", ["svd", "rsvd", "whiten", "asvd"])
def test_full_rank_reconstructs_exactly(name):
    w = _w()
    ct = get_codec(name).encode(w, _stats(_correlated_x()), rank=32)
    # Full rank saves nothing on a 48×32 matrix: stored dense, and said so.
    assert ct.meta["dense"] is True
    assert torch.equal(get_codec(name).decode(ct), w)


@pytest.mark.parametrize("name", ["svd", "whiten", "asvd"])
def test_full_rank_factors_reconstruct(name):
    # The factorization itself is exact at full rank (checked on the factors, not the dense fallback).
    w = _w(200, 8)
    st = _stats(_correlated_x(8, 100))
    ct = get_codec(name).encode(w, st, rank=7)  # 7·208 < 1600: saved
    assert "U" in ct.data
    full = truncated_svd(w.double(), rank=8)
    rec = (full.u * full.s) @ full.vh
    assert torch.allclose(rec, w.double(), atol=1e-10)


def test_eckart_young_tail():
    w = _w(64, 40)
    s_all = torch.linalg.svdvals(w.double())
    for k in (1, 5, 17, 24):
        ct = get_codec("svd").encode(w, rank=k)
        err = float(((w.double() - get_codec("svd").decode(ct).double()) ** 2).sum())
        assert math.isclose(err, float((s_all[k:] ** 2).sum()), rel_tol=1e-4)
        assert ct.data["U"].shape == (64, k) and ct.data["V"].shape == (k, 40)


def test_whitened_output_error_is_the_whitened_tail():
    w, x = _w(), _correlated_x()
    st = _stats(x)
    ct = get_codec("whiten").encode(w, st, rank=8, damp=1e-12)
    err = float((((w - get_codec("whiten").decode(ct)).double() @ x.double().T) ** 2).sum())
    s = torch.linalg.svdvals(w.double() @ torch.linalg.cholesky(st.gram))
    assert math.isclose(err, float((s[8:] ** 2).sum()), rel_tol=1e-3)


def _decaying(m=300, n=200, r=120, seed=3):
    """A matrix with a decaying spectrum, as randomized SVD expects."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    return (q1 * torch.logspace(0, -3, r)) @ q2.T


def test_randomized_close_to_exact():
    a = _decaying()
    ex = truncated_svd(a, rank=20)
    rs = truncated_svd(a, rank=20, solver="randomized", oversample=10, niter=2, crossover=1.0)
    assert rs.solver == "randomized"
    assert rs.tail <= ex.tail * 1.02 + 1e-12
    assert torch.allclose(rs.s, ex.s, rtol=1e-2)
    again = truncated_svd(a, rank=20, solver="randomized", oversample=10, niter=2, crossover=1.0)
    assert torch.equal(again.s, rs.s)  # deterministic


def test_randomized_default_oversampling_is_closer_than_p10():
    # A slowly decaying spectrum, where oversampling matters.
    g = torch.Generator().manual_seed(4)
    a = torch.randn(400, 200, generator=g) * torch.linspace(1.0, 0.2, 200)
    ex = truncated_svd(a, rank=40)
    old = truncated_svd(a, rank=40, solver="randomized", oversample=10, crossover=1.0)
    new = truncated_svd(a, rank=40, solver="randomized", crossover=1.0)
    assert svd_mod.sketch_size(400, 200, 40) == 60 and svd_mod.sketch_size(400, 200, 4) == 14
    assert ex.tail <= new.tail < old.tail


def test_randomized_hands_over_to_exact_past_the_crossover():
    a = _decaying()
    small = truncated_svd(a, rank=20, solver="randomized")  # sketch 30 of 200: randomized
    assert small.solver == "randomized"
    big = truncated_svd(a, rank=80, solver="randomized")  # sketch 120 > 0.4 · 200: exact
    ex = truncated_svd(a, rank=80)
    assert big.solver == "exact" and torch.equal(big.s, ex.s)
    assert truncated_svd(a, rank=80, solver="randomized", crossover=1.0).solver == "randomized"
    ct = get_codec("rsvd").encode(a, rank=80)
    assert ct.meta["solver"] == "exact"
    assert get_codec("rsvd").encode(a, rank=20).meta["solver"] == "randomized"
    # The energy rule hands over too, and then takes the whole spectrum at once.
    en = truncated_svd(a, energy=0.999999, solver="randomized")
    assert en.solver == "exact" and en.rank == truncated_svd(a, energy=0.999999).rank
    with pytest.raises(ValueError, match="crossover"):
        truncated_svd(a, rank=4, solver="randomized", crossover=0.0)
    with pytest.raises(ValueError, match="oversample"):
        truncated_svd(a, rank=4, solver="randomized", oversample=-1)


def test_energy_threshold_rank():
    w = _w(64, 40)
    s2 = torch.linalg.svdvals(w.double()) ** 2
    for e in (0.5, 0.9, 0.99, 1.0):
        k = allocate.rank_for_energy(s2.sqrt(), e)
        assert float(s2[:k].sum()) >= e * float(s2.sum()) * (1 - 1e-12)
        assert k == 1 or float(s2[: k - 1].sum()) < e * float(s2.sum())
    ex = truncated_svd(w, energy=0.9)
    rs = truncated_svd(w, energy=0.9, solver="randomized", niter=4)
    assert ex.energy_kept >= 0.9 * ex.energy_total and abs(ex.rank - rs.rank) <= 1


def test_ratio_rank_and_accounting():
    m, n = 576, 1536
    k = allocate.rank_for_ratio(m, n, 0.8)
    assert k * (m + n) <= 0.8 * m * n < (k + 1) * (m + n)
    assert allocate.saves(m, n, allocate.max_useful_rank(m, n))
    assert not allocate.saves(m, n, allocate.max_useful_rank(m, n) + 1)


def test_lowrank_linear_matches_decode_and_counts():
    w, b = _w(), torch.randn(48)
    codec = get_codec("svd")
    ct = codec.encode(w, rank=6)
    mod = codec.module(ct, b)
    assert isinstance(mod, LowRankLinear)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(mod(x), F.linear(x, codec.decode(ct), b), atol=1e-5)
    assert mod.stored_weights() == 6 * (48 + 32) == sum(p.numel() for p in mod.parameters()) - 48
    assert ct.nbits() >= 32 * 6 * (48 + 32)


def test_half_factors_forward_in_input_dtype():
    w = _w()
    codec = get_codec("svd")
    ct = codec.encode(w, rank=6, factor_dtype="float16")
    assert ct.data["U"].dtype == torch.float16
    x = torch.randn(4, 32)
    y = codec.module(ct, None)(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, F.linear(x, codec.decode(ct)), atol=1e-2)


def test_dense_fallback_when_rank_saves_nothing():
    w = _w(64, 40)
    k = allocate.max_useful_rank(64, 40) + 1
    ct = get_codec("svd").encode(w, rank=k)
    assert ct.meta["dense"] and ct.meta["rank"] == k
    mod = get_codec("svd").module(ct, None)
    assert isinstance(mod, torch.nn.Linear) and torch.equal(mod.weight, w)


def test_whitening_few_tokens_warns_and_stays_finite(caplog):
    x = _correlated_x(32, 5)  # 5 tokens for a 32-wide Gram: singular
    st = _stats(x)
    with caplog.at_level("WARNING"):
        ct = get_codec("whiten").encode(_w(), st, rank=4)
    assert "calibration tokens" in caplog.text
    assert torch.isfinite(get_codec("whiten").decode(ct)).all()
    # Not positive definite even after damping → eigendecomposition fallback, still finite.
    h = -torch.eye(4, dtype=torch.float64)
    t = whitening(h, n_tokens=100, damp=0.0)
    assert t.kind in ("eigh", "diag") and torch.isfinite(t.unapply(torch.ones(2, 4, dtype=torch.float64))).all()


@pytest.mark.parametrize("params, msg", [
    ({"ratio": 1.0}, "ratio must be in"),
    ({"ratio": 0.0}, "ratio must be in"),
    ({"ratio": -0.2}, "ratio must be in"),
    ({"energy": 0.0}, "energy must be in"),
    ({"energy": 1.5}, "energy must be in"),
    ({"rank": 41}, "rank 41"),
    ({"rank": 0}, "rank 0"),
    ({"rank": 4, "ratio": 0.5}, "one of rank, ratio, energy"),
    ({"bits": 4}, "unknown parameter"),
    ({"solver": "magic"}, "unknown SVD solver"),
])
def test_bad_params(params, msg):
    with pytest.raises(ValueError, match=msg):
        get_codec("svd").encode(_w(64, 40), **params)


def test_stats_required():
    with pytest.raises(ValueError, match="needs calibration"):
        get_codec("whiten").encode(_w(), None, rank=4)
    with pytest.raises(ValueError, match="needs calibration"):
        get_codec("asvd").encode(_w(), None, rank=4)
    bad = _stats(_correlated_x())
    bad.gram[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="inf/NaN"):
        get_codec("whiten").encode(_w(), bad, rank=4)


def test_budget_allocation_hits_budget_and_floor():
    shapes = {"a": (64, 64), "b": (128, 64), "c": (64, 128), "d": (32, 64)}
    spectra = []
    for i, (name, (m, n)) in enumerate(shapes.items()):
        # layer "a" has a flat spectrum (sensitive); "d" a steep one (compressible)
        decay = [0.2, 1.0, 2.0, 6.0][i]
        s2 = torch.exp(-decay * torch.linspace(0, 5, min(m, n), dtype=torch.float64)).sort(descending=True).values
        spectra.append(allocate.LayerSpectrum(name, m, n, s2, float(s2.sum())))
    total = sum(m * n for m, n in shapes.values())
    ranks = allocate.allocate_budget(spectra, 0.5, floor=0.1)
    used = allocate.allocated_params(spectra, ranks)
    assert used <= 0.5 * total
    assert used > 0.5 * total - max(m + n for m, n in shapes.values())  # nothing left that would fit
    for sp in spectra:
        k = ranks[sp.name]
        assert k is None or k >= allocate.rank_for_ratio(sp.m, sp.n, 0.1)
    assert (ranks["a"] or 10**9) > ranks["d"]  # the flat spectrum gets more rank
    with pytest.raises(ValueError, match="floor"):
        allocate.allocate_budget(spectra, 0.5, floor=0.6)
