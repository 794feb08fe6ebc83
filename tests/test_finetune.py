"""Recovery training: the quantizer's straight-through math, factor phases, the loop, the folder."""
from __future__ import annotations

import pytest
import torch

from llmpress.recovery.data import TextOverlapError, check_overlap, train_windows
from llmpress.recovery.distill import kl_loss
from llmpress.recovery.factors import FactorLinear
from llmpress.recovery.qat import QATLinear
from llmpress.tensor import get_codec


def _w(out=24, inp=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


@pytest.mark.parametrize("params", [
    dict(bits=3, group_size=16),                 # asym, ragged last group
    dict(bits=2, group_size=-1, sym=True),       # per channel, sym
    dict(bits=4, group_size=0),                  # per tensor
    dict(bits=4, group_size=8, grid="nf"),
    dict(bits=3, group_size=8, grid="seed"),     # floor rounding
    dict(bits=3, group_size=16, grid="asymz"),   # integer zero point, held
])
def test_qat_starts_at_the_stored_weight_and_repacks_on_grid(params):
    codec = get_codec("rtn")
    ct = codec.encode(_w(), **params)
    q = QATLinear(ct)
    with torch.no_grad():
        assert torch.equal(q.fake_weight(), codec.decode(ct))
        assert torch.equal(q.to_ct().data["qweight"], ct.data["qweight"])
        q.latent.add_(torch.randn_like(q.latent) * 0.6)  # move the weights across bins (grid units)
        q.scale.mul_(1.1)
        fw = q.fake_weight()
    ct2 = q.to_ct()
    assert ct2.meta == ct.meta and ct2.nbits() == ct.nbits()
    assert {k: (v.dtype, v.shape) for k, v in ct2.data.items()} == {k: (v.dtype, v.shape) for k, v in ct.data.items()}
    assert not torch.equal(ct2.data["qweight"], ct.data["qweight"])
    assert torch.equal(codec.decode(ct2), fw)  # what trained is what is stored
    again = QATLinear(ct2).to_ct()  # decode → encode with the same grid is a fixed point
    assert all(torch.equal(again.data[k], ct2.data[k]) for k in ct2.data)


def test_qat_gradients_ste_and_exact_qparams():
    ct = get_codec("rtn").encode(_w(4, 32), bits=3, group_size=16)
    q = QATLinear(ct)
    with torch.no_grad():
        q.latent.add_(torch.randn_like(q.latent) * 0.3)
        q.latent[0, 0] = -2.0  # below the grid's range [0, 7]: clipped
    g = torch.randn(4, 32)
    (q.fake_weight() * g).sum().backward()
    s = q.scale.detach().half().float().repeat_interleave(16, 1)  # (4, 32) per column
    u = q.latent.detach()
    codes = u.round().clamp(0, 7)
    inside = (u >= 0) & (u <= 7)
    assert torch.allclose(q.latent.grad, g * s * inside)  # straight through, in grid units
    assert torch.allclose(q.scale.grad, (g * codes).reshape(4, 2, 16).sum(-1), atol=1e-5)  # ∂ŵ/∂s = q
    assert torch.allclose(q.offset.grad, g.reshape(4, 2, 16).sum(-1), atol=1e-5)  # ∂ŵ/∂m = 1


@pytest.mark.parametrize("params", [dict(bits=3, group_size=16), dict(bits=4, group_size=8, sym=True)])
def test_fused_kernels_match_the_torch_quantizer(params):
    """The one-pass numba kernels give the torch path's weight bit for bit and its gradients."""
    ct = get_codec("rtn").encode(_w(8, 48), **params)
    runs = []
    for fused in (True, False):
        q = QATLinear(ct)
        assert q.fused  # whole groups on a closed-form grid
        q.fused = fused
        with torch.no_grad():
            q.latent.add_(torch.randn(q.latent.shape, generator=torch.Generator().manual_seed(1)) * 0.8)
            q.latent[0, :4] = torch.tensor([0.5, 1.5, 2.5, -9.0])  # ties round to even; one clipped
        g = torch.randn(8, 48, generator=torch.Generator().manual_seed(2))
        w = q.fake_weight()
        (w * g).sum().backward()
        runs.append((w.detach(), q.latent.grad, q.scale.grad, None if q.offset is None else q.offset.grad))
    (w1, *g1), (w0, *g0) = runs
    assert torch.equal(w1, w0)
    for a, b in zip(g1, g0):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


def test_asymz_trains_its_scale_and_holds_the_integer_zero():
    """ŵ = (q − z)·s: ∂ŵ/∂s = q − z; z is stored back unchanged and stays an integer."""
    ct = get_codec("rtn").encode(_w(4, 32), bits=3, group_size=16, grid="asymz")
    q = QATLinear(ct)
    assert QATLinear.supports(ct) and q.fused
    with torch.no_grad():
        q.latent.add_(torch.randn_like(q.latent) * 0.3)
    g = torch.randn(4, 32)
    (q.fake_weight() * g).sum().backward()
    z = ct.data["zero"].float().repeat_interleave(16, 1)  # (4, 32) per column
    codes = q.latent.detach().round().clamp(0, 7)
    assert torch.allclose(q.scale.grad, (g * (codes - z)).reshape(4, 2, 16).sum(-1), atol=1e-5)
    with torch.no_grad():
        q.scale.mul_(1.2)
    ct2 = q.to_ct()
    assert torch.equal(ct2.data["zero"], ct.data["zero"]) and ct2.nbits() == ct.nbits()
    assert not torch.equal(ct2.data["scale"], ct.data["scale"])


def test_awq_in_scale_and_gptq_gidx_are_kept():
    w = _w(16, 32)
    h = torch.eye(32, dtype=torch.float64) * 4 + 0.1
    from llmpress.tensor import Stats

    st = Stats()
    st.add(torch.randn(256, 32))
    for name, params in (("gptq", dict(bits=2, group_size=8, act_order=True)), ("awq", dict(bits=3, group_size=8))):
        codec = get_codec(name)
        ct = codec.encode(w, st, **params)
        q = QATLinear(ct)
        with torch.no_grad():
            assert torch.allclose(q.fake_weight(), codec.decode(ct), atol=1e-6)
        ct2 = q.to_ct()
        for k in ("g_idx", "in_scale"):
            if k in ct.data:
                assert torch.equal(ct2.data[k], ct.data[k])
    del h


def test_factor_phases_train_u_then_v():
    ct = get_codec("svd").encode(_w(24, 40), rank=4)
    f = FactorLinear(ct)
    assert torch.equal(f.U @ f.V, get_codec("svd").decode(ct))
    x = torch.randn(8, 40)
    opt = torch.optim.SGD([f.U, f.V], lr=0.1)
    u0, v0 = f.U.detach().clone(), f.V.detach().clone()
    f.phase(0.2)
    f(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(f.U, u0) and torch.equal(f.V, v0)
    opt.zero_grad(set_to_none=True)
    u1 = f.U.detach().clone()
    f.phase(0.7)
    f(x).pow(2).sum().backward()
    opt.step()
    assert torch.equal(f.U, u1) and not torch.equal(f.V, v0)
    ct2 = f.to_ct()
    assert ct2.nbits() == ct.nbits() and ct2.meta == ct.meta


def test_kl_loss_zero_at_identity_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert float(kl_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_loss(a, torch.randn(2, 5, 11))) > 0.01


def test_overlap_refused_and_windows_deterministic(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    para = " ".join(f"word{i}" for i in range(60))
    with pytest.raises(TextOverlapError, match="overlaps"):
        check_overlap("intro text here. " + para, {"eval": "other things. " + para})
    assert check_overlap("a b c " * 20, {"eval": "d e f " * 20}) == {"eval": 0.0}
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    text = "The quick brown fox jumps over the lazy dog. " * 200
    a, b = train_windows(tok, text, 16, 10, seed=3), train_windows(tok, text, 16, 10, seed=3)
    assert torch.equal(a.batch(2, 4), b.batch(2, 4)) and a.batch(2, 4).shape == (4, 16)
