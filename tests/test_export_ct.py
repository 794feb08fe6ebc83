"""The compressed-tensors export, read back by the package itself and by plain transformers.

compressed-tensors is the independent reader: its ``unpack_from_int32`` and
``PackedQuantizationCompressor.decompress`` must give back llmpress's codes and decoded weights
bit for bit, and ``AutoModelForCausalLM.from_pretrained`` on the exported folder must give
llmpress's logits.
"""
from __future__ import annotations

import json

import pytest
import torch

import llmpress
from llmpress.targets.api import ExportRefused, export
from llmpress.tensor import decode, get_codec
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids

# transformers warns that the checkpoint's own quantization_config wins, only `dequantize` is taken
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

# Both sides run the same float32 weights through the same torch ops; the tolerance only leaves
# room for llmpress's QuantLinear taking a packed-kernel path (float rounding, not the weights).
ATOL = 1e-5


def _ct_load(path, dequantize: bool | None = True):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {} if dequantize is None else {"quantization_config": CompressedTensorsConfig(dequantize=dequantize)}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _ids(n: int = 12):
    return torch.randint(0, tinytok.VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


def _assert_weights_equal_decode(model, folder):
    """Every exported linear holds exactly llmpress's decoded weight."""
    from llmpress.targets import ExportSource

    with ExportSource(folder) as src:
        for name in src.compressed_names:
            w = model.get_parameter(name).detach()
            assert torch.equal(w, decode(src.compressed(name))), name


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_rows_is_what_compressed_tensors_unpacks(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from llmpress.targets.ct_layout import pack_rows

    g = torch.Generator().manual_seed(bits)
    for rows, cols in [(3, 20), (5, 64), (7, 33), (2, 1), (4, 160)]:
        codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
        p = pack_rows(codes, bits)
        assert p.dtype == torch.int32 and p.shape == (rows, -(-cols * bits // 32))
        signed = unpack_from_int32(p, bits, torch.Size([rows, cols]))
        assert torch.equal(signed.to(torch.int16) + 2 ** (bits - 1), codes.to(torch.int16))


@pytest.mark.parametrize("grid", ["sym", "asymz"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layer_decompresses_to_llmpress_decode(grid, bits):
    """Groups, per channel, per tensor, I·b aligned to words (the bytes are reused) or not."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from llmpress.targets.ct_layout import Scheme, layer_tensors, pack_rows, packed_codes, scheme_of
    from llmpress.quant.pack import unpack

    g = torch.Generator().manual_seed(bits)
    for inp, gs in [(80, 16), (80, -1), (80, 0), (40, 200), (64, 32)]:
        ct = get_codec("rtn").encode(torch.randn(24, inp, generator=g), bits=bits, group_size=gs, grid=grid)
        scheme = scheme_of(ct)
        assert isinstance(scheme, Scheme), scheme
        t = layer_tensors(ct, scheme, torch.float32)
        assert torch.equal(t["weight_packed"], pack_rows(unpack(ct.data["qweight"], bits, 24 * inp).reshape(24, inp), bits))
        assert torch.equal(packed_codes(ct), t["weight_packed"])
        args = QuantizationArgs(**scheme.weights_args())
        w = PackedQuantizationCompressor.decompress(t, QuantizationScheme(targets=["Linear"], weights=args))
        assert w["weight"].dtype == torch.float32 and torch.equal(w["weight"], decode(ct)), (inp, gs)


# ---------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("method,grid,bits,gs", [
    ("rtn", "asymz", 4, 32),
    ("rtn", "sym", 8, -1),
    ("rtn", "asymz", 2, 16),
    ("rtn", "asymz", 3, 32),
    ("gptq", "asymz", 4, 32),
    ("rtn", "gguf:q4_0", None, None),  # llama.cpp's signed-scale Q4_0 rule: one model for GGUF and here
    ("gptq", "gguf:q8_0", None, None),
])
def test_export_loads_in_transformers(tiny_llama_dir, tmp_path, method, grid, bits, gs):
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, method=method, bits=bits, group_size=gs, grid=grid, samples=4, seq_len=64,
                      progress=False)
    bits = json.loads((q / "llmpress.json").read_text())["tensors"]["model.layers.0.mlp.up_proj.weight"]["meta"]["bits"]
    sym = grid != "asymz"
    res = export(q, tmp_path / "ct", format="compressed-tensors")
    assert res["exact"] == 14 and not res["fallback"] and res["ignore"] == ["lm_head"]
    assert res["loads_packed"] == sym and res["loads_dequantize"]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and qc["format"] == "pack-quantized"
    assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"] == sym
    assert (tmp_path / "ct" / "tokenizer.json").exists()

    ids = _ids()
    ref = _logits(llmpress.load(q), ids)
    model = _ct_load(tmp_path / "ct", dequantize=True)
    _assert_weights_equal_decode(model, q)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=ATOL)
    if sym:  # plain from_pretrained keeps it packed until the first forward
        packed = _ct_load(tmp_path / "ct", dequantize=None)
        assert packed.model.layers[0].mlp.up_proj.weight_packed.dtype == torch.int32
        torch.testing.assert_close(_logits(packed, ids), ref, rtol=0, atol=ATOL)
        _assert_weights_equal_decode(packed, q)


def _by_ct_matcher(out, q):
    """Decompress each exported layer under the config group compressed-tensors' own matcher
    assigns it (``is_match`` on targets and ignore), and compare with llmpress's decode."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    from llmpress.targets import ExportSource

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    sd = load_file(str(out / "model.safetensors"))
    with ExportSource(q) as src:
        for name in src.compressed_names:
            mod = name.removesuffix(".weight")
            hits = [g for g in qc["config_groups"].values()
                    if is_match(mod, torch.nn.Linear(1, 1), g["targets"], qc["ignore"])]
            assert len(hits) == 1, (mod, hits)
            scheme = QuantizationScheme(targets=hits[0]["targets"], weights=hits[0]["weights"])
            t = {k.removeprefix(mod + "."): v for k, v in sd.items() if k.startswith(mod + ".weight_")}
            w = PackedQuantizationCompressor.decompress(t, scheme)["weight"]
            assert torch.equal(w, decode(src.compressed(name))), mod
        for kept in qc["ignore"]:
            assert not any(is_match(kept, torch.nn.Linear(1, 1), g["targets"], qc["ignore"])
                           for g in qc["config_groups"].values())


@pytest.mark.parametrize("attn_grid", ["sym", "asymz"])
def test_mixed_schemes_one_group_each(tiny_llama_dir, tmp_path, attn_grid):
    """Attention 4-bit g32, MLP sym 8-bit per channel, one down_proj kept: two config groups
    whose targets name their layers, the kept one ignored. transformers 5.25 loads mixed schemes
    only packed (all symmetric); its dequantize=True path decodes every layer with the first
    group's scheme (upstream), so the asymmetric mix is checked layer by layer with
    compressed-tensors' own matcher and decompressor."""
    rec = {"rules": [
        {"match": "embed|lm_head|layers\\.1\\.mlp\\.down_proj", "method": "keep"},
        {"match": "self_attn", "method": "rtn", "bits": 4, "group_size": 32, "grid": attn_grid},
        {"match": ".*", "method": "rtn", "bits": 8, "group_size": -1, "grid": "sym"},
    ]}
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, recipe=rec, progress=False)
    res = export(q, tmp_path / "ct", format="compressed-tensors")
    assert res["exact"] == 13 and not res["loads_dequantize"] and res["loads_packed"] == (attn_grid == "sym")
    assert res["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    g0, g1 = qc["config_groups"]["group_0"], qc["config_groups"]["group_1"]
    assert g0["weights"]["group_size"] == 32 and g0["targets"] == [
        "re:.*\\.\\d+\\.self_attn\\.k_proj$", "re:.*\\.\\d+\\.self_attn\\.o_proj$",
        "re:.*\\.\\d+\\.self_attn\\.q_proj$", "re:.*\\.\\d+\\.self_attn\\.v_proj$"]
    assert g1["weights"]["strategy"] == "channel" and "model.layers.0.mlp.down_proj" in g1["targets"]
    _by_ct_matcher(tmp_path / "ct", q)
    if attn_grid == "sym":
        ids = _ids()
        model = _ct_load(tmp_path / "ct", dequantize=None)
        torch.testing.assert_close(_logits(model, ids), _logits(llmpress.load(q), ids), rtol=0, atol=ATOL)
        _assert_weights_equal_decode(model, q)


@pytest.mark.parametrize("kw,reason", [
    ({"method": "rtn", "bits": 4, "group_size": 32}, "float zero point"),  # the float-offset asym grid
    ({"method": "rtn", "bits": 4, "group_size": 48, "grid": "asymz"}, "group size 48 does not divide in_features 64"),
    ({"method": "gptq", "bits": 4, "group_size": 32, "static_groups": False}, "act-order g_idx"),
    ({"method": "awq", "bits": 4, "group_size": 32, "grid": "asymz", "fold": False}, "AWQ input scale"),
])
def test_refusals_name_the_layers(tiny_llama_dir, tmp_path, kw, reason):
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, samples=4, seq_len=64, progress=False, **kw)
    with pytest.raises(ExportRefused, match="cannot be stored exactly") as e:
        export(q, tmp_path / "ct", format="compressed-tensors")
    assert "model.layers.1.self_attn.q_proj" in str(e.value) and reason in str(e.value)
    assert not (tmp_path / "ct").exists()


def test_nothing_quantized_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="no layer would be stored quantized"):
        export(tiny_llama_dir, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_fallback_dense_and_requantize(tiny_llama_dir, tmp_path):
    """MLP on the float-offset grid: --fallback dense stores those layers as their decoded
    weights and ignores them; --fallback requantize rounds them onto asymz (values change)."""
    rec = {"rules": [
        {"match": "embed|lm_head", "method": "keep"},
        {"match": "self_attn", "method": "rtn", "bits": 4, "group_size": 32, "grid": "asymz"},
        {"match": ".*", "method": "rtn", "bits": 4, "group_size": 32, "grid": "asym"},
    ]}
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, recipe=rec, progress=False)
    mlp = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("down_proj", "gate_proj", "up_proj")]
    ids = _ids()
    ref = _logits(llmpress.load(q), ids)

    res = export(q, tmp_path / "dense", format="compressed-tensors", fallback="dense")
    assert res["exact"] == 8 and sorted(res["dense"]) == mlp and res["ignore"] == ["lm_head", *mlp]
    assert all("float zero point" in f["reason"] for f in res["fallback"].values())
    model = _ct_load(tmp_path / "dense")
    _assert_weights_equal_decode(model, q)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=ATOL)

    res = export(q, tmp_path / "rq", format="compressed-tensors", fallback="requantize")
    assert res["ignore"] == ["lm_head"] and sorted(n.removesuffix(".weight") for n in res["requantized"]) == mlp
    assert all(r["scheme"] == "int4 asym g32" and r["max_abs_change"] > 0 for r in res["requantized"].values())
    model = _ct_load(tmp_path / "rq")
    lq = _logits(model, ids)
    kl = torch.nn.functional.kl_div(lq.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert 0 < float(kl) < 1e-2


def test_gpt2_conv1d_is_not_a_linear(tmp_path):
    """GPT-2's Conv1D stores (in, out): refused by name; requantize cannot help, it goes dense."""
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0)).save_pretrained(src)
    q = tmp_path / "q"
    llmpress.quantize(src, q, bits=4, group_size=32, grid="asymz", progress=False)
    with pytest.raises(ExportRefused, match="h.0.attn.c_attn.weight is not an nn.Linear weight \\(Conv1D\\)"):
        export(q, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ValueError, match="no layer would be stored quantized"):
        export(q, tmp_path / "ct", format="compressed-tensors", fallback="requantize")


def test_shards_and_index(tiny_llama_dir, tmp_path):
    """Past ``shard_bytes`` (2 GiB by default) the tensors go into numbered shards + an index."""
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, bits=4, group_size=32, grid="asymz", progress=False)
    res = export(q, tmp_path / "ct", format="compressed-tensors", shard_bytes=1 << 15)
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    assert len(res["files"]) > 3 and len(set(index["weight_map"].values())) > 1
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight_zero_point"] in res["files"]
    ids = _ids()
    torch.testing.assert_close(_logits(_ct_load(tmp_path / "ct"), ids), _logits(llmpress.load(q), ids), rtol=0, atol=ATOL)


def test_cli_export_compressed_tensors(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    _load_commands()
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, bits=4, group_size=32, grid="asymz", progress=False)
    r = CliRunner().invoke(app, ["export", str(q), "-o", str(tmp_path / "ct"), "--format", "compressed-tensors", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["format"] == "compressed-tensors" and res["exact"] == 14 and res["scale_dtype"] == "float32"
    assert (tmp_path / "ct" / "model.safetensors").exists()

    asym = tmp_path / "asym"
    llmpress.quantize(tiny_llama_dir, asym, bits=4, group_size=32, progress=False)
    r = CliRunner().invoke(app, ["export", str(asym), "-o", str(tmp_path / "no"), "--format", "compressed-tensors"])
    assert r.exit_code != 0 and "float zero point" in r.output and "model.layers.0.mlp.up_proj.weight" in r.output
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------- the real model
def test_smollm2_asymz_4bit_g64_in_transformers(smollm_dir, tmp_path):
    """SmolLM2-135M, RTN on the integer-zero-point grid at 4 bits g64 (GPTQ's default grid):
    exported, loaded by plain transformers, it says Paris and its logits are llmpress's."""
    from transformers import AutoTokenizer

    q = tmp_path / "q"
    llmpress.quantize(smollm_dir, q, method="rtn", bits=4, group_size=64, grid="asymz", progress=False)
    res = export(q, tmp_path / "ct", format="compressed-tensors")
    assert res["exact"] == 30 * 7 and res["ignore"] == ["lm_head"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ct"))
    model = _ct_load(tmp_path / "ct")
    ids = tok("The capital of France is", return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0])
    assert "Paris" in text

    text_ids = tok("Debian is a free operating system, developed and maintained by volunteers around the world. "
                   "It comes with thousands of packages.", return_tensors="pt").input_ids
    mine, ref = _logits(model, text_ids), _logits(llmpress.load(q), text_ids)
    kl = torch.nn.functional.kl_div(mine.log_softmax(-1)[0], ref.log_softmax(-1)[0], log_target=True,
                                    reduction="batchmean")
    assert float(kl) <= 1e-6
