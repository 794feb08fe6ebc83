"""QuantLinear's packed forwards (quant/kernels.py) against dequantize() + F.linear, layout by layout."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmpress.quant import kernels
from llmpress.quant.codec import QWeight, rtn_qweight
from llmpress.quant.grids import GridSpec, group_index
from llmpress.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(kernels.int4_layout() is None, reason="torch's int4 CPU kernel is not available here")

# (bits, group_size, grid) -> the forward QuantLinear must choose
LAYOUTS = [
    (4, 32, "asymz", "int4"),
    (4, 64, "asym", "int4"),
    (4, 128, "sym", "int4"),
    (4, 256, "asymz", "int4"),
    (4, -1, "asymz", "int4"),  # per channel: one group repeated over kernel groups
    (4, 0, "asym", "int4"),  # per tensor
    (8, -1, "asymz", "int8"),
    (8, -1, "asym", "int8"),
    (8, -1, "sym", "int8"),
    (8, 0, "asymz", "int8"),
]
FALLBACKS = [
    (4, 96, "asymz", "group size 96"),
    (4, 64, "nf", "no affine form"),
    (3, 64, "asymz", "3-bit"),
    (8, 64, "asymz", "grouped 8-bit"),
]


def _ct(bits: int, gs: int, grid: str, out: int = 96, inp: int = 256, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)  # rows of different scales
    w[:, 5] += 3.0  # an outlier column: asymmetric groups
    spec = GridSpec(bits=bits, group_size=gs, grid=grid).validate()
    return rtn_qweight(w, spec).to_ct("rtn", spec), (torch.randn(out, generator=g) if bias else None)


def _layer(*args, **kwargs) -> QuantLinear:
    return QuantLinear(*_ct(*args, **kwargs))


def _emulate(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the bf16 kernels compute, written out: x, scales and t rounded to bf16, a float32
    product, the output rounded to bf16 (int8's leftover term added in float32)."""
    q = m.codes().to(torch.float32)  # (out, in)
    x2 = x.reshape(-1, m.in_features).to(torch.float32)
    if m._path == "int4":
        sz = m._ksz.to(torch.float32)  # (G, out, 2)
        cols = group_index(m.in_features, m._kinfo["gs"])
        w = (q - 8) * sz[:, :, 0].T[:, cols] + sz[:, :, 1].T[:, cols]
        y = (x2.to(torch.bfloat16).to(torch.float32) @ w.T).to(torch.bfloat16).to(torch.float32)
    else:
        w = (q - m._kc[:, None].to(torch.float32)) * m._ks.to(torch.float32)[:, None]
        y = (x2.to(torch.bfloat16).to(torch.float32) @ w.T).to(torch.bfloat16).to(torch.float32)
        if m._kt is not None:
            y = y + x2.sum(-1, keepdim=True) * m._kt
    return y.reshape(*x.shape[:-1], m.out_features)


@pytest.mark.parametrize("bits,gs,grid,path", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_dequantize(bits, gs, grid, path, shape, bias):
    m = _layer(bits, gs, grid, bias=bias)
    W = m.dequantize()
    assert m.prepare() == path
    assert torch.equal(m.dequantize(), W)  # the kernel's codes give the same weight back
    x = torch.randn(*shape, m.in_features, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x, W, m.bias)
    # float32 activations by default: within float32 rounding of the dequantized product
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    # through the kernel (bf16 compute): the kernel does exactly what its emulation does, up to
    # float32 summation order and one bf16 rounding of the output ...
    m.bf16_compute = True
    y = m(x)
    b = 0.0 if m.bias is None else m.bias
    emu = _emulate(m, x) + b
    torch.testing.assert_close(y, emu, rtol=2**-7, atol=1e-4 * float(ref.abs().max()))
    # ... and that is within bf16's tolerance of the exact product
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    # bf16 activations take the kernel natively, close to the dequantize path in bf16
    xb = x.to(torch.bfloat16)
    m.bf16_compute = False
    yb = m(xb)
    assert yb.dtype == torch.bfloat16
    refb = F.linear(xb, W.to(torch.bfloat16), None if m.bias is None else m.bias.to(torch.bfloat16))
    assert float((yb.float() - refb.float()).norm() / refb.float().norm()) < 2e-2


@pytest.mark.parametrize("bits,gs,grid,why", FALLBACKS)
def test_layouts_without_kernel_dequantize(bits, gs, grid, why):
    m = _layer(bits, gs, grid)
    kern, reason = kernels.choose(m)
    assert kern is None and why in reason
    assert m.prepare() == "dequant" and m.qweight is not None
    x = torch.randn(2, 7, m.in_features)
    torch.testing.assert_close(m(x), F.linear(x, m.dequantize(), m.bias))


def test_refusals_by_shape(monkeypatch):
    assert "ragged" in kernels.choose(_layer(4, 64, "asymz", inp=160))[1]  # 160 = 2·64 + 32
    assert "multiple of 16" in kernels.choose(_layer(4, 64, "asymz", out=40))[1]
    monkeypatch.setenv(kernels.ENV, "dequant")
    m = _layer(4, 64, "asymz")
    assert m.prepare() == "dequant"


@pytest.mark.parametrize("bits,gs,grid,path", LAYOUTS)
def test_state_dict_rebuilt_bit_for_bit(bits, gs, grid, path):
    ct, bias = _ct(bits, gs, grid)
    before = {"bias": bias, **{k: v.clone() for k, v in ct.data.items()}}  # the order nn.Module saves in
    m = QuantLinear(ct, bias)
    assert m._path == path  # chosen and packed when built
    assert m.qweight is None  # one copy of the codes: the kernel's
    assert "qweight" not in dict(m.named_buffers())
    after = m.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert m.packed_bytes() == sum(v.numel() * v.element_size() for k, v in before.items() if k != "bias")


def test_load_state_dict_into_a_packed_layer():
    a, b = _layer(4, 64, "asymz", seed=0), _layer(4, 64, "asymz", seed=1)
    a.prepare()
    b.prepare()
    a.load_state_dict(b.state_dict())
    x = torch.randn(3, a.in_features)
    torch.testing.assert_close(a(x), F.linear(x, b.dequantize(), b.bias))
    assert a._path == "int4" and torch.equal(a.dequantize(), b.dequantize())


def test_cast_and_move_drop_back_to_the_stored_form():
    ct, bias = _ct(4, 64, "asymz")
    m = QuantLinear(ct, bias)
    assert m._path == "int4"
    m.float()  # casts the kernel's bf16 parameters: they no longer fit it
    assert m._kernel is None and torch.equal(m.qweight, ct.data["qweight"])
    x = torch.randn(2, m.in_features)
    torch.testing.assert_close(m(x), F.linear(x, m.dequantize(), m.bias))
    assert m._path == "int4"  # packed again at the call
    m.to_stored()  # for writers of the stored buffers
    assert m._kernel is None and torch.equal(m.qweight, ct.data["qweight"]) and m.prepare() == "int4"


def test_act_order_groups_permute_the_input():
    g = torch.Generator().manual_seed(3)
    out, inp, gs = 64, 256, 64
    w = torch.randn(out, inp, generator=g)
    perm = torch.randperm(inp, generator=g)
    g_idx = torch.empty(inp, dtype=torch.long)
    g_idx[perm] = torch.arange(inp) // gs  # every group gs columns wide, scattered
    spec = GridSpec(bits=4, group_size=gs, grid="asymz").validate()
    wp = w[:, perm]  # groups consecutive in this order
    qw = rtn_qweight(wp, spec)
    codes = torch.empty_like(qw.codes)
    codes[:, perm] = qw.codes
    ct = QWeight(codes=codes, params=qw.params, g_idx=g_idx).to_ct("gptq", spec)
    m = QuantLinear(ct)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    W = m.dequantize()
    torch.testing.assert_close(W[:, perm], grids_dequant(wp, qw, spec))
    assert m.prepare() == "int4" and m._kperm is not None
    x = torch.randn(2, 7, inp, generator=g)
    m.bf16_compute = True
    y, ref = m(x), F.linear(x, W)
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # groups of unequal width cannot be made consecutive: dequantize
    ct.data["g_idx"] = torch.cat([torch.zeros(gs + 1), torch.arange(1, inp - gs) // gs + 1]).to(torch.int16)[:inp]
    assert "unequal" in kernels.choose(QuantLinear(ct))[1]


def grids_dequant(w: torch.Tensor, qw: QWeight, spec: GridSpec) -> torch.Tensor:
    from llmpress.quant import grids

    wg = grids.group_weights(qw.codes.to(torch.float32), spec.group_size)
    return grids.ungroup(grids.dequantize(wg, qw.params, spec), w.shape)


def test_awq_input_scale_divides_the_activations():
    g = torch.Generator().manual_seed(4)
    spec = GridSpec(bits=4, group_size=64, grid="asymz").validate()
    qw = rtn_qweight(torch.randn(32, 128, generator=g), spec)
    qw.in_scale = torch.rand(128, generator=g) + 0.5
    m = QuantLinear(qw.to_ct("awq", spec))
    assert m.prepare() == "int4"
    x = torch.randn(5, 128, generator=g)
    ref = F.linear(x, m.dequantize())
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    m.bf16_compute = True
    assert float((m(x) - ref).norm() / ref.norm()) < 1e-2


def test_gradients_take_the_dequantize_path():
    m = _layer(4, 64, "asymz")
    m.bf16_compute = True
    x = torch.randn(2, m.in_features, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, m.dequantize().sum(0).expand(2, -1))


def test_int4_layout_inverts_torchs_packing():
    lay = kernels.int4_layout()
    g = torch.Generator().manual_seed(5)
    for n, k in [(16, 2), (80, 64), (208, 130), (592, 64)]:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(lay.codes(packed, n, k).to(torch.int32), q)
        # row blocks are independent: packing kernels.ROWS rows at a time gives the same bytes
        chunks = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r:r + kernels.ROWS].contiguous(), 1)
                  for r in range(0, n, kernels.ROWS)]
        assert torch.equal(torch.cat(chunks), packed)


def test_resident_bytes_counts_one_copy(monkeypatch):
    ct, _ = _ct(4, 64, "asymz", out=256, inp=512)
    packed = kernels.resident_bytes(QuantLinear(ct))
    monkeypatch.setenv(kernels.ENV, "dequant")
    stored = kernels.resident_bytes(QuantLinear(ct))
    codes = 256 * 512 // 2
    assert packed - stored == 256 * (512 // 64) * 2 * 2  # the kernel's bf16 (scale, t) pairs; codes not doubled
    assert packed < 1.2 * stored and stored > codes


# ---------------------------------------------------------------------------- models and generate
@pytest.fixture(scope="module")
def tiny_q4(tiny_llama_dir, tmp_path_factory):
    import llmpress

    out = tmp_path_factory.mktemp("q4") / "q4"
    llmpress.quantize(str(tiny_llama_dir), out, method="rtn", bits=4, group_size=32, grid="asymz")
    return out


def test_loaded_model_logits(tiny_q4, monkeypatch):
    import llmpress

    ids = torch.tensor([[1, 50, 200, 7, 9, 300]])
    from safetensors.torch import load_file

    m = llmpress.load(tiny_q4)
    counts = kernels.prepare(m)
    assert counts == {"int4": 14}  # 2 blocks × 7 linears; the tied head stays dense
    stored = load_file(str(tiny_q4 / "model.safetensors"))
    sd = m.state_dict()
    keys = [k for k in stored if k.endswith((".qweight", ".scale", ".zero"))]  # <module>.weight.<key>
    assert len(keys) == 3 * 14
    for k in keys:
        mk = k.replace(".weight.", ".")
        assert sd[mk].dtype == stored[k].dtype and torch.equal(sd[mk], stored[k]), k
    with torch.inference_mode():
        fast_exact = m(ids).logits
        kernels.set_bf16_compute(m)
        fast = m(ids).logits
    monkeypatch.setenv(kernels.ENV, "dequant")
    ref_model = llmpress.load(tiny_q4)
    assert kernels.prepare(ref_model) == {"dequant": 14}
    with torch.inference_mode():
        ref = ref_model(ids).logits
    torch.testing.assert_close(fast_exact, ref, rtol=1e-5, atol=1e-5)
    assert float((fast - ref).norm() / ref.norm()) < 1e-2


def test_generate_api_streams_and_repeats(tiny_q4):
    import llmpress

    pieces: list[str] = []
    r = llmpress.generate(tiny_q4, "Once upon a time", max_new_tokens=6, ignore_eos=True, threads=1, stream=pieces.append)
    assert r["new_tokens"] == len(r["tokens"]) == 6 and "".join(pieces) == r["text"]
    assert r["forwards"] == {"int4": 14} and r["weight_bytes"] > 0 and r["peak_rss_bytes"] > r["weight_bytes"]
    assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0
    again = llmpress.generate(tiny_q4, "Once upon a time", max_new_tokens=6, ignore_eos=True, threads=1)
    assert again["tokens"] == r["tokens"]  # greedy
    s1 = llmpress.generate(tiny_q4, "Hello", max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    s2 = llmpress.generate(tiny_q4, "Hello", max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    assert s1["tokens"] == s2["tokens"]
    with pytest.raises(ValueError, match="top_p"):
        llmpress.generate(tiny_q4, "Hello", top_p=0.0)


def test_generate_cli(tiny_llama_dir, tiny_q4):
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["generate", str(tiny_q4), "The sky is", "-n", "4", "--ignore-eos", "--threads", "1",
                                 "--chat", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout.strip().splitlines()[-1])
    assert j["new_tokens"] == 4 and j["text"] in r.stdout and j["forwards"] == {"int4": 14}
    assert {"tokens_per_s", "prefill_s", "decode_s", "peak_rss_bytes", "weight_bytes", "tokens"} <= set(j)
    dense = CliRunner().invoke(app, ["generate", str(tiny_llama_dir), "The sky is", "-n", "3", "--ignore-eos", "--json"])
    assert dense.exit_code == 0, dense.output
    jd = json.loads(dense.stdout.strip().splitlines()[-1])
    assert jd["forwards"] == {} and jd["weight_bytes"] > j["weight_bytes"]
    bad = CliRunner().invoke(app, ["generate", str(tiny_q4), "x", "--top-p", "2"])
    assert bad.exit_code == 2 and "top_p" in bad.output
