"""Grids, the seed formula, NormalFloat, bit-packing and RTN round trips (fast, in-process)."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from llmpress.errors import InputError
from llmpress.quant import grids
from llmpress.quant.grids import GridSpec
from llmpress.quant.pack import pack, packed_bytes, unpack
from llmpress.tensor import CompressedTensor, get_codec

BITS = (2, 3, 4, 5, 6, 8)


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 5, 8, 13, 4096 + 3])
def test_pack_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8 and p.numel() == packed_bytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack(p, bits, n), codes)


def test_pack_layout_is_little_endian_bitstream():
    # 3-bit codes 1..8 (mod 8) → the bitstream 001 010 011 100 101 110 111 000 read LSB first
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == list(stream.to_bytes(3, "little"))
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]


def test_pack_rejects_bad_codes_and_bits():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="7-bit"):
        pack(torch.tensor([0]), 7)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(2, dtype=torch.uint8), 5, 8)


# ----------------------------------------------------------------------------- seed formula
def test_seed_formula_exact_values():
    x = torch.tensor([-1.0, -0.5, 0.0, 1 / 3, 0.99, 1.0])
    assert grids.seed_level(x, 4).tolist() == [1, 1, 2, 3, 3, 4]
    # grid points that floats represent exactly map to their own level (M = 5: step 0.5)
    pts = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert grids.seed_level(pts, 5).tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(grids.seed_value(torch.arange(1, 6), 5).float(), pts)
    m = 16
    # F(x) = floor((x+1)(M-1)/2) + 1 by hand, on random x
    xr = torch.rand(1000, dtype=torch.float64) * 2 - 1
    want = [math.floor((v + 1) * (m - 1) / 2) + 1 for v in xr.tolist()]
    assert grids.seed_level(xr, m).tolist() == want


def test_seed_grid_floor_bias_on_real_weights(smollm_dir):
    """The seed rule is biased low by half a step and costs ~4× the MSE of round-to-nearest."""
    from llmpress.models import TensorStore, resolve

    w = TensorStore(resolve(str(smollm_dir))).get("model.layers.3.mlp.down_proj.weight").float()
    for bits, gs in [(4, 128), (2, 64)]:
        r = grids.seed_bias(w, bits, gs)
        assert -1.02 < r["mean_err_half_steps_floor"] < -0.97
        assert abs(r["mean_err_half_steps_nearest"]) < 0.01
        assert 3.5 < r["mse_ratio"] < 4.5


# ----------------------------------------------------------------------------- codebooks
def test_nf4_matches_qlora_table():
    nf4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    assert torch.allclose(grids.normal_float_codebook(4), torch.tensor(nf4), atol=1e-6)
    for b in BITS:
        c = grids.normal_float_codebook(b)
        assert c.numel() == 2**b and c[0] == -1 and c[-1] == 1 and (c == 0).any()


# ----------------------------------------------------------------------------- round trips
SHAPES = [(8, 64), (7, 300), (16, 576), (3, 5)]
GROUPS = [128, 64, 32, 7, -1, 0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rtn_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits + shape[1])
    w = torch.randn(*shape, generator=g) * 0.05
    codec = get_codec("rtn")
    for gs in GROUPS:
        ct = codec.encode(w, None, bits=bits, group_size=gs)
        assert ct.meta["shape"] == list(shape) and ct.meta["bits"] == bits
        wh = codec.decode(ct)
        assert wh.shape == w.shape and wh.dtype == torch.float32
        # every value lies within half a step of its group's grid (min–max covers the range)
        wg = grids.group_weights(w, gs)
        lo, hi = grids._nan_min_max(wg)
        half = grids.ungroup(((hi - lo) / (2**bits - 1)).expand_as(wg), shape) / 2
        fp16 = grids.ungroup((lo.abs() + hi.abs()).expand_as(wg), shape) * 2.0**-10  # scale/offset rounding
        assert ((wh - w).abs() <= half + fp16 + 1e-7).all(), (bits, shape, gs)
        # storage survives the safetensors-style flattening
        tensors, meta = ct.to_state("p")
        back = CompressedTensor.from_state("p", tensors, meta["p"])
        assert torch.equal(codec.decode(back), wh)


def test_ragged_last_group_has_its_own_parameters():
    w = torch.randn(4, 576)
    w[:, 512:] *= 100  # the ragged last group (64 columns of 576 with g128) is much wider
    ct = get_codec("rtn").encode(w, None, bits=4, group_size=128)
    assert tuple(ct.data["scale"].shape) == (4, 5)
    err = (get_codec("rtn").decode(ct) - w).abs()
    assert err[:, :512].max() < err[:, 512:].max() / 20


@pytest.mark.parametrize("grid", ["asym", "asymz", "sym", "nf", "seed", "seed_rtn"])
@pytest.mark.parametrize("rng", ["minmax", "mse", "mse2", "percentile"])
def test_grids_and_ranges_decode_consistently(grid, rng):
    w = torch.randn(6, 200) * 0.1
    spec = GridSpec(bits=4, group_size=64, grid=grid, range=rng).validate()
    ct = get_codec("rtn").encode(w, None, **{k: v for k, v in spec.__dict__.items()})
    assert torch.allclose(get_codec("rtn").decode(ct), grids.fake_quantize(w, spec), atol=1e-6)
    rel = (get_codec("rtn").decode(ct) - w).norm() / w.norm()
    assert rel < (0.25 if grid == "seed" else 0.15)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymz_holds_zero_exactly(bits):
    """The integer zero point puts 0 on the grid: exact zeros stay zero (the float-offset grid's
    points are lo + k·s, anywhere relative to 0)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=g) * 0.02 + 0.004  # all groups shifted a little off centre
    w[:, ::7] = 0.0
    spec_z = GridSpec(bits=bits, group_size=128, grid="asymz").validate()
    codec = get_codec("rtn")
    ct = codec.encode(w, bits=bits, group_size=128, grid="asymz")
    assert sorted(ct.data) == ["qweight", "scale", "zero"]
    assert torch.equal(ct.data["zero"], ct.data["zero"].round()) and int(ct.data["zero"].max()) <= 2**bits - 1
    d = codec.decode(ct)
    assert torch.equal(d[:, ::7], torch.zeros_like(d[:, ::7]))
    assert torch.equal(d, grids.fake_quantize(w, spec_z))
    asym = grids.fake_quantize(w, GridSpec(bits=bits, group_size=128).validate())
    assert not torch.equal(asym[:, ::7], torch.zeros_like(asym[:, ::7]))  # the float-offset grid misses 0


def test_mse_range_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)  # StudentT samples from the global generator
    w = torch.distributions.StudentT(2.0).sample((64, 512))
    e = {r: (grids.fake_quantize(w, GridSpec(bits=3, group_size=128, range=r).validate()) - w).pow(2).mean()
         for r in ("minmax", "mse")}
    assert e["mse"] < 0.8 * e["minmax"]


@pytest.mark.parametrize("grid", ["asym", "asymz"])
def test_mse2_searches_each_end_on_its_own(grid):
    """With as many factors per end as mse has, mse2's candidates hold mse's (p = q), so no group's
    error is larger; on groups with one long tail it is smaller, the long side clipped harder."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g)
    w[:, ::64] = w[:, ::64].abs() * 4 + 3  # one large positive weight a group: a long upper tail
    wg = grids.group_weights(w, 64)
    err = {}
    for r in ("mse", "mse2"):
        spec = GridSpec(bits=2, group_size=64, grid=grid, range=r, mse_steps=12, mse2_steps=12).validate()
        p = grids.fit(wg, spec)
        err[r] = (grids.dequantize(grids.quantize(wg, p, spec), p, spec) - wg).pow(2).sum(-1)  # (R, G)
    assert bool((err["mse2"] <= err["mse"] * (1 + 1e-5) + 1e-6).all())
    # the float-offset grid gains most (asymz's range is widened to hold 0 whatever the search says)
    assert float(err["mse2"].sum()) < (0.97 if grid == "asym" else 1.0) * float(err["mse"].sum())
    with pytest.raises(InputError, match="mse2_steps"):
        GridSpec(range="mse2", mse2_steps=0).validate()


def test_gptq_takes_mse2_with_static_and_dynamic_groups():
    """GPTQ weighs mse2's search by the Hessian as it does mse's, static groups or dynamic: its
    output error on the calibration inputs is no worse than with mse (2-bit, one long tail a group)."""
    from llmpress.tensor import Stats

    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(32, 128, generator=g)
    w[:, ::32] = w[:, ::32].abs() * 4 + 3
    st = Stats(gram=(x.T @ x).double(), n=512)
    codec = get_codec("gptq")
    for static in (True, False):
        out_err = {}
        for r in ("mse", "mse2"):
            ct = codec.encode(w, st, bits=2, group_size=32, grid="asym", range=r, static_groups=static)
            out_err[r] = float(((codec.decode(ct) - w) @ x.T).pow(2).sum())
        assert out_err["mse2"] < out_err["mse"], (static, out_err)


def test_sym_stores_no_offset_and_bpw_counts_everything():
    w = torch.randn(64, 256)
    asym = get_codec("rtn").encode(w, None, bits=4, group_size=128)
    sym = get_codec("rtn").encode(w, None, bits=4, group_size=128, sym=True)
    assert "offset" in asym.data and "offset" not in sym.data
    n = w.numel()
    # 4 bits of codes + 16-bit scale (+16-bit offset) per 128 weights + the JSON meta
    assert asym.nbits() == n * 4 + 2 * 16 * n // 128 + 8 * len(asym.meta_json().encode())
    assert sym.nbits() == n * 4 + 16 * n // 128 + 8 * len(sym.meta_json().encode())
    assert 4.25 < asym.bpw() < 4.35 and 4.12 < sym.bpw() < 4.2


def test_q4_1_weights_come_back_exactly(smollm_dir):
    """SmolLM2's weights were dequantized from Q4_1 (blocks of 32): asym min–max g32 is exact."""
    from llmpress.models import TensorStore, resolve

    w = TensorStore(resolve(str(smollm_dir))).get("model.layers.0.self_attn.k_proj.weight").float()
    codec = get_codec("rtn")
    assert torch.allclose(codec.decode(codec.encode(w, None, bits=4, group_size=32)), w, atol=1e-6, rtol=0)
    assert not torch.allclose(codec.decode(codec.encode(w, None, bits=4, group_size=64)), w, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("params,msg", [
    ({"bits": 7}, "bits must be one of"),
    ({"bits": 1}, "bits must be one of"),
    ({"bits": 4.5}, "bits must be one of"),
    ({"group_size": -2}, "group_size"),
    ({"range": "best"}, "unknown range"),
    ({"grid": "fp4"}, "unknown grid"),
    ({"percentile": 20}, "percentile"),
    ({"bogus": 1}, "unknown parameter"),
])
def test_bad_params(params, msg):
    with pytest.raises(ValueError, match=msg):
        get_codec("rtn").encode(torch.randn(4, 8), None, **params)


def test_bad_weights_named():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj'.*NaN/Inf"):
        get_codec("rtn").encode(w, None, name="model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="2-D"):
        get_codec("rtn").encode(torch.randn(8), None)
    with pytest.raises(ValueError, match="needs calibration"):
        get_codec("gptq").encode(torch.randn(4, 8), None)


@pytest.mark.parametrize("grid", ["asym", "asymz", "sym"])
def test_compiled_search_error_is_the_grids_own(grid):
    """The clipping search's one-pass error (search_kernel) equals ŵ − w of the grid's torch
    quantize/dequantize, bit for bit, with 0 on a ragged group's padding."""
    from llmpress.quant.search_kernel import affine_error

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 100, generator=g) * torch.rand(100, generator=g) * 4
    wg = grids.group_weights(w, 32)  # (24, 4, 32), the last group padded with NaN
    gr = grids.GRIDS[grid]
    lo, hi = grids._nan_min_max(wg)
    p = gr.params(lo * 0.9, hi * 0.8, 3, torch.float16)
    ref = gr.dequantize(gr.quantize(wg, p, 3), p, 3).sub_(wg).nan_to_num_(0.0)
    out = torch.empty(4, 24, 32)
    a, s, z = (t[..., 0].contiguous().numpy() for t in gr.affine(p, 3))
    affine_error(wg.contiguous().numpy(), a, s, z, np.float32(7), out.numpy())
    assert torch.equal(out.transpose(0, 1), ref)
    assert (out[3, :, 4:] == 0).all()  # 100 = 3·32 + 4: the padding
