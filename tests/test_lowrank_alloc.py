"""Budgeted allocation measured block by block: the same spectra and ranks as measuring every
layer at once, while holding at most one block's Gram matrices."""
from __future__ import annotations

import re
import weakref

import pytest
import torch

from llmpress import pipeline
from llmpress.lowrank import allocate, api
from llmpress.tensor import Stats, get_codec

KW = {"samples": 4, "seq_len": 64, "progress": False}  # 256 calibration tokens ≥ the widest input (160)
GRAMS_PER_BLOCK = 4  # Llama block inputs: q/k/v (shared), o, gate/up (shared), down


class GramProbe:
    """Counts the live Stats that hold a Gram matrix, at every Stats.add and every svdvals."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.live: list[weakref.ref] = []  # Stats is an unhashable dataclass: no WeakSet
        self.peak = 0
        init, add, svdvals = Stats.__init__, Stats.add, torch.linalg.svdvals

        def init_(st, *a, **k):
            init(st, *a, **k)
            self.live.append(weakref.ref(st))

        def add_(st, *a, **k):
            add(st, *a, **k)
            self.look()

        def svdvals_(*a, **k):
            self.look()
            return svdvals(*a, **k)

        monkeypatch.setattr(Stats, "__init__", init_)
        monkeypatch.setattr(Stats, "add", add_)
        monkeypatch.setattr(torch.linalg, "svdvals", svdvals_)

    def look(self) -> None:
        self.peak = max(self.peak, sum(1 for r in self.live if (st := r()) is not None and st.gram is not None))


def _spectra_all_at_once(model, method="whiten"):
    """The former measurement: every layer's Stats collected first, then each spectrum."""
    from llmpress import skeleton as sk
    from llmpress.models import TensorStore, resolve

    src = resolve(model)
    store, skel = TensorStore(src), sk.build_meta(sk.folder_config(src.folder))
    names = [n for n in sk.linear_names(skel) if not re.search(api.KEEP_DEFAULT, n)]
    stats = pipeline.collect_stats(model, match="|".join(allocate.exact_rule(n) for n in names), **KW)
    codec, out = get_codec(method), []
    for n in names:
        w = store.get(f"{n}.weight").float()
        a = codec.transform(w, stats[n], **codec.extra).apply(w.double())
        out.append(allocate.LayerSpectrum(n, *w.shape, torch.linalg.svdvals(a) ** 2, float((a * a).sum())))
    return out


def test_blockwise_spectra_equal_all_at_once_and_same_allocation(tiny_llama_dir, monkeypatch):
    old = _spectra_all_at_once(tiny_llama_dir)
    new = api.layer_spectra(tiny_llama_dir, "whiten", **KW)
    assert [s.name for s in new] == [s.name for s in old] and len(new) == 14
    for a, b in zip(old, new):
        assert (a.m, a.n) == (b.m, b.n)
        torch.testing.assert_close(b.sigma2, a.sigma2, rtol=1e-9, atol=0)
        assert b.total == pytest.approx(a.total, rel=1e-12)
    for ratio in (0.3, 0.5, 0.8):
        assert allocate.allocate_budget(new, ratio, floor=0.1) == allocate.allocate_budget(old, ratio, floor=0.1)


def test_blockwise_spectra_hold_one_block_of_grams(tiny_llama_dir, monkeypatch):
    probe = GramProbe(monkeypatch)
    api.layer_spectra(tiny_llama_dir, "whiten", **KW)
    assert 1 <= probe.peak <= GRAMS_PER_BLOCK
    # The control: measuring all layers at once holds both blocks' Gram matrices.
    probe.peak = 0
    keep = _spectra_all_at_once(tiny_llama_dir)
    assert probe.peak == 2 * GRAMS_PER_BLOCK and keep


def test_spectra_without_stats_are_the_weight_spectra(tiny_llama_dir):
    from llmpress.models import TensorStore, resolve

    sp = api.layer_spectra(tiny_llama_dir, "svd", progress=False)
    w = TensorStore(resolve(tiny_llama_dir)).get(f"{sp[3].name}.weight").double()
    torch.testing.assert_close(sp[3].sigma2, torch.linalg.svdvals(w) ** 2)
