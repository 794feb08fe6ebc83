"""GPTQ, AWQ and HQQ against RTN on a real SmolLM2 layer, QuantLinear against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmpress.quant.gptq import gptq_quantize
from llmpress.quant.grids import GridSpec
from llmpress.quant.linear import QuantLinear
from llmpress.tensor import Stats, get_codec

LAYERS = ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]


@pytest.fixture(scope="module")
def real_layers(smollm_dir):
    """Weights of two linears of SmolLM2's block 2 and the Stats of their inputs on 2048 tokens
    of the calibration mix and on 1024 held-out tokens of another domain (debian-handbook)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpress.text import CALIB_DEFAULT, load_text

    model = AutoModelForCausalLM.from_pretrained(str(smollm_dir), num_hidden_layers=3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm_dir))

    def stats(text: str, n: int) -> dict[str, Stats]:
        ids = torch.tensor(tok(text[: 20 * n], add_special_tokens=False)["input_ids"][:n]).reshape(-1, 256)
        out = {k: Stats() for k in LAYERS}
        hooks = [model.get_submodule(k).register_forward_pre_hook(lambda _m, a, s=out[k]: s.add(a[0])) for k in LAYERS]
        with torch.inference_mode():
            model.model(input_ids=ids)  # the blocks only: the 49k-wide head is not needed
        for h in hooks:
            h.remove()
        return out

    cal, held = stats(load_text(CALIB_DEFAULT), 2048), stats(load_text("debian-handbook")[200000:], 1024)
    weights = {k: model.get_submodule(k).weight.detach().float().clone() for k in LAYERS}
    return weights, cal, held


def rel_out_err(w: torch.Tensor, w_hat: torch.Tensor, st: Stats) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² through H = Σ x xᵀ."""
    d, w, h = (w - w_hat).double(), w.double(), st.gram
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


@pytest.mark.parametrize("layer,bits,gs", [(LAYERS[0], 4, 128), (LAYERS[0], 3, 128), (LAYERS[1], 3, 128)])
def test_gptq_and_awq_beat_rtn_in_and_out_of_domain(real_layers, layer, bits, gs):
    weights, cal, held = real_layers
    w = weights[layer]
    err = {}
    for method, opts in [("rtn", {}), ("gptq", {}), ("gptq", {"act_order": False, "damp": 0.01}), ("awq", {}), ("awq+gptq", {})]:
        codec = get_codec(method)
        w_hat = codec.decode(codec.encode(w, cal[layer], bits=bits, group_size=gs, **opts))
        err[method + "+" * bool(opts)] = (rel_out_err(w, w_hat, cal[layer]), rel_out_err(w, w_hat, held[layer]))
    rtn_cal, rtn_held = err["rtn"]
    for m in ("gptq", "gptq+", "awq", "awq+gptq"):
        assert err[m][0] < 0.6 * rtn_cal, (m, err)  # on the calibration tokens
        assert err[m][1] < 0.8 * rtn_held, (m, err)  # on held-out text of another domain
    assert err["awq+gptq"][0] < err["awq"][0]  # GPTQ's codes beat rounding under the same scales


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I no error can be compensated: GPTQ must return exactly the RTN codes."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 200, generator=g)
    spec = GridSpec(bits=3, group_size=64).validate()
    qw = gptq_quantize(w, torch.eye(200, dtype=torch.float64), spec)
    rtn = get_codec("rtn").encode(w, None, bits=3, group_size=64)
    assert torch.equal(qw.to_ct("gptq", spec).data["qweight"], rtn.data["qweight"])


def test_gptq_act_order_dynamic_groups_store_g_idx():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 150, generator=g) * torch.linspace(0.1, 3, 150)
    st = Stats()
    st.add(x)
    w = torch.randn(20, 150, generator=g)
    ct = get_codec("gptq").encode(w, st, bits=4, group_size=32, act_order=True, static_groups=False)
    assert ct.data["g_idx"].shape == (150,) and ct.data["scale"].shape == (20, 5)
    assert not torch.equal(ct.data["g_idx"].long(), torch.arange(150) // 32)  # groups follow the permutation
    e_gptq = rel_out_err(w, get_codec("gptq").decode(ct), st)
    e_rtn = rel_out_err(w, get_codec("rtn").decode(get_codec("rtn").encode(w, None, bits=4, group_size=32)), st)
    assert e_gptq < e_rtn


def test_hqq_lowers_lp_error_without_calibration(real_layers):
    w = real_layers[0][LAYERS[1]]
    lp = {}
    for m in ("rtn", "hqq"):
        d = w - get_codec(m).decode(get_codec(m).encode(w, None, bits=3, group_size=64))
        lp[m] = d.abs().pow(0.7).sum().item()
    assert lp["hqq"] < 0.99 * lp["rtn"]  # it optimises offsets only: a modest, real gain
    with pytest.raises(ValueError, match="asym"):
        get_codec("hqq").encode(w, None, bits=3, sym=True)


@pytest.mark.parametrize("method,opts", [
    ("rtn", {"bits": 4, "group_size": 48}),
    ("rtn", {"bits": 3, "group_size": -1, "sym": True}),
    ("rtn", {"bits": 4, "group_size": 32, "grid": "nf"}),
    ("rtn", {"bits": 5, "group_size": 0}),
    ("gptq", {"bits": 3, "group_size": 32, "static_groups": False}),
    ("awq", {"bits": 4, "group_size": 64}),
    ("awq+gptq", {"bits": 3, "group_size": 20}),
    ("hqq", {"bits": 2, "group_size": 16}),
])
def test_quantlinear_matches_decoded_linear(method, opts):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 100, generator=g)
    bias = torch.randn(24, generator=g)
    st = Stats()
    st.add(torch.randn(500, 100, generator=g) * torch.linspace(0.2, 2, 100))
    codec = get_codec(method)
    ct = codec.encode(w, st, **opts)
    mod = codec.module(ct, bias)
    assert isinstance(mod, QuantLinear) and (mod.in_features, mod.out_features) == (100, 24)
    x = torch.randn(2, 5, 100, generator=g)
    assert torch.allclose(mod(x), F.linear(x, codec.decode(ct), bias), atol=1e-5)
    # resident: the module holds the packed form, not a dense copy
    assert mod.packed_bytes() * 8 <= ct.nbits()
    assert all(b.numel() * b.element_size() < w.numel() for _, b in mod.named_buffers())


def test_awq_scale_is_stored_and_counted():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g)
    st = Stats()
    st.add(torch.randn(1000, 128, generator=g) * torch.linspace(0.05, 5, 128))
    awq = get_codec("awq").encode(w, st, bits=4, group_size=64)
    rtn = get_codec("rtn").encode(w, None, bits=4, group_size=64)
    assert awq.data["in_scale"].shape == (128,) and awq.data["in_scale"].dtype == torch.float16
    extra = awq.nbits() - rtn.nbits()
    assert extra >= 128 * 16  # the per-input-channel scale is paid for


@pytest.mark.parametrize("grid", ["asym", "asymz", "sym", "nf"])
@pytest.mark.parametrize("group_size,act_order,static_groups", [(64, True, True), (64, True, False), (64, False, False), (-1, True, False)])
def test_gptq_compiled_loop_gives_the_torch_loops_codes(grid, group_size, act_order, static_groups):
    """The numba column loop (affine grids) and the torch loop (the reference) agree code for code,
    with dynamic groups fitted mid-block (block 128, groups 64) and a ragged last group."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1500, 200, generator=g) * torch.rand(200, generator=g) * 3
    w = torch.randn(48, 200, generator=g) * 0.02
    h = (x.T @ x).double()
    spec = GridSpec(bits=3, group_size=group_size, grid=grid).validate()
    runs = [gptq_quantize(w, h, spec, damp=0.1, act_order=act_order, static_groups=static_groups, loop=k)
            for k in ("auto", "grid")]
    assert torch.equal(runs[0].codes, runs[1].codes)
    assert all(torch.equal(runs[0].params[k], runs[1].params[k]) for k in runs[0].params)


def test_gptq_grid_defaults_yield_to_the_users_grid():
    """GPTQ defaults to the integer-zero-point grid with a clipping search; a grid, sym or range
    the user gives wins; other methods keep GridSpec's defaults."""
    gptq = get_codec("gptq")
    spec, _, _ = gptq.parse({"bits": 4, "group_size": 64})
    assert (spec.grid_name, spec.range) == ("asymz", "mse")
    spec, _, _ = gptq.parse({"bits": 4, "group_size": 64, "sym": False})
    assert (spec.grid_name, spec.range) == ("asym", "mse")
    spec, _, _ = gptq.parse({"bits": 4, "sym": True, "range": "minmax"})
    assert (spec.grid_name, spec.range) == ("sym", "minmax")
    spec, _, _ = get_codec("rtn").parse({"bits": 4})
    assert (spec.grid_name, spec.range) == ("asym", "minmax")


def test_gptq_layers_fed_one_input_share_one_prepared_hessian():
    """Layers that share their input Stats (q/k/v, gate/up) reuse one inverse-Hessian factor per
    (damp, act_order); the codes are those of a run that prepares its own; more data drops it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 96, generator=g) * torch.rand(96, generator=g) * 3
    x[:, 7] = 0  # a dead input
    w1, w2 = (torch.randn(32, 96, generator=g) * 0.02 for _ in range(2))
    st = Stats()
    st.add(x)
    gptq = get_codec("gptq")
    a = gptq.encode(w1, st, bits=3, group_size=32)
    (key, hs), = st.derived.items()
    b = gptq.encode(w2, st, bits=3, group_size=32)
    assert list(st.derived.values()) == [hs]  # reused, not prepared again
    alone = Stats()
    alone.add(x)
    assert torch.equal(gptq.decode(b), gptq.decode(gptq.encode(w2, alone, bits=3, group_size=32)))
    assert not torch.equal(gptq.decode(a), gptq.decode(b))
    gptq.encode(w1, st, bits=3, group_size=32, act_order=False)
    assert len(st.derived) == 2  # another act_order, another factor
    st.add(x[:10])
    assert st.derived == {}


def test_awq_gptq_keeps_awqs_scale_and_chooses_codes_by_gptq():
    """awq+gptq stores AWQ's input scale (the same α search) and codes that lower the output error
    below AWQ's rounded ones; ``awq`` with ``gptq: true`` is the same codec."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=g)
    st = Stats()
    mix = torch.randn(24, 128, generator=g)  # correlated inputs (as a model's are): error feedback has work to do
    st.add((torch.randn(2000, 24, generator=g) @ mix + 0.1 * torch.randn(2000, 128, generator=g)) * torch.linspace(0.05, 5, 128))
    a = get_codec("awq").encode(w, st, bits=3, group_size=32)
    b = get_codec("awq+gptq").encode(w, st, bits=3, group_size=32)
    c = get_codec("awq").encode(w, st, bits=3, group_size=32, gptq=True)
    assert torch.equal(a.data["in_scale"], b.data["in_scale"]) and torch.equal(b.data["qweight"], c.data["qweight"])
    h = st.gram

    def err(ct, codec):
        d = (w - get_codec(codec).decode(ct)).double()
        return float(((d @ h) * d).sum())

    assert err(b, "awq+gptq") < 0.9 * err(a, "awq")
