"""llama.cpp's K-quant grids (gguf:q2_k..q6_k): llmpress's decode equals gguf-py's dequantization of
the packed Q*_K blocks bit for bit, for RTN, GPTQ and AWQ; bits counted as llama.cpp stores them;
rows not a multiple of 256 refused before any work; a 256-wide Llama through GPTQ to a GGUF."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from typer.testing import CliRunner

import llmpress
from llmpress.quant.kquant import LAYOUTS, QK_K, kquant_bpw
from llmpress.quant.linear import QuantLinear
from llmpress.targets.api import export
from llmpress.targets.gguf_blocks import pack_blocks
from llmpress.targets.gguf_verify import verify
from llmpress.tensor import CompressedTensor, Stats, get_codec

KINDS = list(LAYOUTS)
BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}  # llama.cpp's own figures
QTYPE = {k: getattr(gguf.GGMLQuantizationType, k.upper()) for k in KINDS}


def _weights(out: int = 24, inp: int = 2 * QK_K, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.1
    w[0, :40] *= 8  # an outlier sub-block: the other sub-blocks' scales quantize against it
    w[1, QK_K:] = 0.0  # an all-zero super-block
    w[2, :] = w[2, :].abs()  # a row without negative weights (mins of 0)
    return w


def _stats(inp: int, seed: int = 1) -> Stats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, inp, generator=g) @ (torch.eye(inp) + 0.1 * torch.randn(inp, inp, generator=g))
    st = Stats()
    st.add(x * torch.linspace(0.2, 2.0, inp))
    return st


def _gguf_dequant(ct: CompressedTensor) -> torch.Tensor:
    raw, qtype = pack_blocks(ct)
    assert qtype == QTYPE[ct.meta["grid"]]
    assert raw.shape[1] == ct.numel() // ct.meta["shape"][0] // QK_K * gguf.GGML_QUANT_SIZES[qtype][1]
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype))


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _out_err(w: torch.Tensor, wh: torch.Tensor, st: Stats) -> float:
    d, H = w - wh, st.gram.float()
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum())


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("kind", KINDS)
def test_scale_packing_round_trips(kind):
    L = LAYOUTS[kind]
    g = torch.Generator().manual_seed(3)
    sc = torch.randint(0, L.sc_max + 1, (5, 3, L.per_super), generator=g, dtype=torch.uint8)
    mn = torch.randint(0, L.sc_max + 1, sc.shape, generator=g, dtype=torch.uint8) if L.mins else None
    b = L.pack(sc, mn)
    assert b.shape == (5, 3, L.scale_bytes) and b.dtype == torch.uint8
    sc2, mn2 = L.unpack(b)
    assert torch.equal(sc2, sc) and (mn is None or torch.equal(mn2, mn))


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_decode_is_gguf_py_dequantize(kind):
    """Random weights (two super-blocks a row, an outlier, a zero super-block, a positive row)."""
    w = _weights()
    rtn = get_codec("rtn")
    ct = rtn.encode(w, grid=f"gguf:{kind}")
    ours = rtn.decode(ct)
    assert _bitwise(ours, _gguf_dequant(ct))
    assert _bitwise(QuantLinear.from_ct(ct).dequantize(), ours)  # the inference module decodes the same
    assert torch.equal(ours[1, QK_K:], torch.zeros(QK_K))  # zeros stay zeros
    # counted bits: llama.cpp's bytes exactly (codes, d, dmin, packed scales), plus the JSON meta
    data_bits = sum(t.numel() * t.element_size() * 8 for t in ct.data.values())
    assert data_bits / w.numel() == BPW[kind] == kquant_bpw(kind)
    assert ct.nbits() == data_bits + 8 * len(ct.meta_json().encode())
    rel = float((ours - w).pow(2).sum() / w.pow(2).sum())
    assert rel < {"q2_k": 0.15, "q3_k": 0.05, "q4_k": 0.012, "q5_k": 0.003, "q6_k": 0.001}[kind]
    # the stored form survives the safetensors state round trip
    tensors, meta = ct.to_state("l")
    back = CompressedTensor.from_state("l", tensors, meta["l"])
    assert _bitwise(rtn.decode(back), ours)


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_decode_is_gguf_py_dequantize_and_beats_rtn(kind):
    """GPTQ fits the super-blocks first, then codes column by column (act-order, compiled loop)."""
    w, st = _weights(16, seed=5), _stats(2 * QK_K)
    ct = get_codec("gptq").encode(w, st, grid=f"gguf:{kind}")
    ours = get_codec("gptq").decode(ct)
    assert "g_idx" not in ct.data and _bitwise(ours, _gguf_dequant(ct))
    rtn = get_codec("rtn").decode(get_codec("rtn").encode(w, grid=f"gguf:{kind}"))
    assert _out_err(w, ours, st) < 0.8 * _out_err(w, rtn, st)


def test_gptq_torch_loop_matches_compiled():
    from llmpress.quant.gptq import gptq_quantize
    from llmpress.quant.grids import GridSpec

    w, st = _weights(8, seed=6), _stats(2 * QK_K)
    spec, _ = GridSpec.parse({"grid": "gguf:q3_k", "range": "mse"})
    runs = [gptq_quantize(w, st.gram, spec, loop=k) for k in ("numba", "torch", "grid")]
    assert all(torch.equal(runs[0].codes, r.codes) for r in runs[1:])


def test_awq_scale_search_on_k_grid():
    """AWQ alone stores its input scale (not a GGUF form); folded in the runner it is exact (below)."""
    w, st = _weights(16, seed=7), _stats(2 * QK_K)
    ct = get_codec("awq").encode(w, st, grid="gguf:q4_k")
    assert ct.data["scales"].shape == (16, 2, 12) and "in_scale" in ct.data
    ct.data.pop("in_scale")  # the codes and two-level scales themselves pack exactly
    assert _bitwise(get_codec("awq").decode(ct), _gguf_dequant(ct))


# ----------------------------------------------------------------------------- refusal
def test_rows_not_multiple_of_256_refused():
    with pytest.raises(ValueError, match=r"576 weights are not a multiple of 256.*Q5_0/Q5_1/Q8_0"):
        get_codec("rtn").encode(torch.randn(8, 576), grid="gguf:q4_k")
    with pytest.raises(ValueError, match="range 'percentile'"):
        get_codec("rtn").encode(torch.randn(8, 256), grid="gguf:q6_k", range="percentile")


def test_quant_linear_int4_kernel_on_q4_k():
    """Q4_K's effective (scale, offset) per 32 is an affine 4-bit layout: torch's int4 kernel runs it."""
    w = _weights(32)
    ct = get_codec("rtn").encode(w, grid="gguf:q4_k")
    m = QuantLinear.from_ct(ct)
    assert m.prepare() == "int4"
    x = torch.randn(3, w.shape[1])
    ref = x @ get_codec("rtn").decode(ct).T
    assert torch.allclose(m(x), ref, atol=1e-5)  # float32 activations: the exact path
    m.bf16_compute = True
    assert float((m(x) - ref).norm() / ref.norm()) < 0.01  # the kernel, in bf16
    assert torch.equal(m.state_dict()["qweight"], ct.data["qweight"]) and m.state_dict()["scales"].shape == (32, 2, 12)


def test_runner_refuses_before_any_work(tiny_llama_dir, tmp_path):
    """hidden 64: every linear refused by name, nothing written."""
    with pytest.raises(ValueError, match=r"14 layer\(s\).*q_proj \(64, 64\).*not a multiple of 256"):
        llmpress.quantize(tiny_llama_dir, tmp_path / "q", method="gptq", grid="gguf:q4_k", samples=2, seq_len=32,
                          progress=False)
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def llama256(tmp_path_factory) -> Path:
    """A 2-layer Llama 256 wide (MLP 512), small tokenizer, as ``test_export_gguf``'s models."""
    from test_export_gguf import _small_model

    return _small_model(tmp_path_factory.mktemp("llama256"), "llama", hidden_size=256, intermediate_size=512)


def test_gptq_q4_k_llama_exports_exactly(llama256, tmp_path):
    """CLI quantize (GPTQ on gguf:q4_k) → export --format gguf → gguf-py reads back every layer bit for
    bit; the GGUF's weights, run in the model, give llmpress's own logits."""
    from llmpress.cli import _load_commands, app

    _load_commands()
    q = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(llama256), "-o", str(q), "-m", "gptq", "--grid", "gguf:q4_k",
                                 "--samples", "2", "--seq-len", "48", "--json"])
    assert r.exit_code == 0, r.output
    assert 4.5 <= json.loads(r.output.strip().splitlines()[-1])["bpw"] < 4.6
    rep = export(q, tmp_path / "m.gguf", format="gguf")
    assert rep["exact"] == 14 and not rep["fallback"] and rep["types"]["Q4_K"] == 14
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    v = verify(reader, q)
    ex = [x for x in v["layers"].values() if x["exact_layer"]]
    assert len(ex) == 14 and all(x["bitwise"] and x["type"] == "Q4_K" for x in ex) and v["max_abs_exact"] == 0.0
    assert reader.fields["general.file_type"].parts[-1][0] == int(gguf.LlamaFileType.MOSTLY_Q4_K_S)
    with pytest.raises(Exception, match="K-quant grid"):  # compressed-tensors has no two-level scales
        export(q, tmp_path / "ct", format="compressed-tensors")

    # the GGUF's dequantized weights in the original model ≡ llmpress's quantized model
    import transformers as tf
    from llmpress.targets.gguf_arch import arch_of
    from llmpress.targets import ExportSource

    model = llmpress.load(q)
    ref = tf.AutoModelForCausalLM.from_pretrained(llama256).eval()
    got = {t.name: t for t in reader.tensors}
    with ExportSource(q) as src:
        arch = arch_of(src.config)
        for name in src.compressed_names:
            t = got[arch.gguf_name(name)]
            wq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1, 256 if "down" not in name else 512)
            perm = arch.row_perm(arch.gguf_name(name), src.config)
            if perm is not None:
                wq = wq[torch.argsort(perm)]
            ref.get_submodule(name.removesuffix(".weight")).weight.data.copy_(wq)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert float((a - b).abs().max()) < 1e-4
