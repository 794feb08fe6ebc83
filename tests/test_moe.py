"""Mixture-of-experts families end to end: experts quantized per expert, routers kept dense.

The models are built in-process from the real configs' structural values (Mixtral-8x7B-v0.1,
Qwen1.5-MoE-A2.7B), shrunk: hidden 64, 2 layers, 4 experts, top-2. The tokenizer is a small
byte-level BPE trained here, the calibration text a seeded word salad: no download, no packages.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import llmpress
from llmpress import moe
from llmpress.io.folder import read_manifest

WORDS = ("the model routes each token to two experts of eight while a router keeps its weights dense and "
         "every expert learns a small piece of language from calibration text such as this one with numbers "
         "like 12 and 345 and punctuation , ; : ! ? in between").split()


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(n_words // 60))


def _config(model_type: str, vocab: int):
    """The real configs' values, shrunk (hidden 64, 2 layers, 4 experts, top-2); every structural
    trait kept: Mixtral's GQA ratio 4 and no biases, Qwen-MoE's full-width kv heads, q/k/v biases,
    shared expert with its sigmoid gate and un-normalised top-k weights."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256,
                  hidden_act="silu", num_experts_per_tok=2, tie_word_embeddings=False, rope_theta=1e6)
    if model_type == "mixtral":  # mistralai/Mixtral-8x7B-v0.1: 4096/14336, 32 heads / 8 kv, 8 experts top-2
        return MixtralConfig(**common, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                             num_local_experts=4, rms_norm_eps=1e-5, router_jitter_noise=0.0, sliding_window=None)
    if model_type == "qwen2_moe":  # Qwen/Qwen1.5-MoE-A2.7B: 2048, experts 1408 wide, shared 5632, 16/16 heads
        return Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                              shared_expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                              num_experts=4, norm_topk_prob=False, rms_norm_eps=1e-6, decoder_sparse_step=1,
                              mlp_only_layers=[], qkv_bias=True)
    if model_type == "qwen3_moe":  # Qwen/Qwen3-30B-A3B: 2048, experts 768 wide, 128 top-8, 32/4 heads of 128, q/k norm
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_experts=4, norm_topk_prob=True,
                              rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[])
    raise KeyError(model_type)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("moe-text") / "calib.txt"
    p.write_text(_text(6000, 1))
    return p


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, calib_file) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train([str(calib_file)], trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("moe-tok")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>").save_pretrained(out)
    return out


def _build(model_type: str, out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(model_type, len(tok))).eval()
    model.save_pretrained(out)  # per-expert 2D tensors, as hub checkpoints hold them
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_dir(request, tmp_path_factory, tokenizer_dir) -> Path:
    return _build(request.param, tmp_path_factory.mktemp(request.param), tokenizer_dir)


# the clipping searches cost most of a tiny model's time and are not what these tests check
FAST = {"gptq": {"range": "minmax"}, "awq": {"n_grid": 5, "clip": False}}


def _ids(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(3))


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def test_unfused_forward_equals_transformers(moe_dir):
    """The skeleton's per-expert modules compute what transformers' fused experts compute."""
    from llmpress import skeleton as sk
    from llmpress.models import TensorStore, resolve

    ref = _hf(moe_dir)
    loaded = sk.build_meta(sk.folder_config(moe_dir))  # per-expert modules, filled from the hub names
    store = TensorStore(resolve(moe_dir))
    sk.fill(loaded, "", store.get, dtype=torch.float32)
    sk.tie(loaded)
    exp = [m for m in loaded.modules() if isinstance(m, moe.ExpertList)]
    assert len(exp) == 2 and all(len(e) == 4 for e in exp)
    assert not any(type(m).__name__.endswith("Experts") for m in loaded.modules())
    torch.testing.assert_close(_logits(loaded, _ids()), _logits(ref, _ids()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_per_expert_load_equals_dequantized(moe_dir, tmp_path, calib_file, method, caplog):
    out = tmp_path / "q"
    with caplog.at_level(logging.INFO, logger="llmpress.pipeline"):
        res = llmpress.quantize(moe_dir, out, method=method, bits=4, group_size=32, calib=str(calib_file),
                                samples=4, seq_len=64, progress=False, **FAST.get(method, {}))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "kept dense (MoE routers" in said and "mlp.gate" in said and "not linear" not in said
    man = read_manifest(out)
    # every expert matrix is its own compressed tensor with its own grid; routers and gates stay dense
    for layer in range(2):
        for e in range(4):
            for n in moe.family(json.loads((moe_dir / "config.json").read_text())).names:
                key = f"model.layers.{layer}.mlp.experts.{e}.{n}.weight"
                assert key in man["tensors"], key
                assert man["tensors"][key]["meta"]["shape"][0] in (32, 64, 96)
    assert not any(".gate.weight" in k or "shared_expert_gate" in k for k in man["tensors"])
    if method == "awq":  # per-expert scales: gate/up keep theirs (the norm also feeds the router), up → down folds
        g, u, d = moe.family(json.loads((moe_dir / "config.json").read_text())).names
        ex = "model.layers.1.mlp.experts.2."
        assert "in_scale" in man["tensors"][f"{ex}{g}.weight"]["keys"] and "in_scale" in man["tensors"][f"{ex}{u}.weight"]["keys"]
        assert "in_scale" not in man["tensors"][f"{ex}{d}.weight"]["keys"]
        shared = "model.layers.1.mlp.shared_expert.down_proj.weight"
        assert shared not in man["tensors"] or "in_scale" not in man["tensors"][shared]["keys"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert all(r["bpw"] < 7 for n, r in res["layers"].items() if ".experts." in n)  # tiny widths: scales weigh

    # loaded logits == the dense model with the dequantized expert weights
    loaded = llmpress.load(out)
    dense = tmp_path / "dense"
    llmpress.export(out, dense, format="dense")
    ref = _hf(dense)  # transformers itself fuses the per-expert dense tensors back
    assert type(ref.model.layers[0].mlp.experts).__name__.endswith("Experts")
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    orig = _logits(_hf(moe_dir), ids)
    assert (_logits(loaded, ids) - orig).abs().max() > 0  # it was really quantized

    if method != "gptq":
        return
    ev = llmpress.evaluate(out, moe_dir, text=str(calib_file), ctx=64, tokens=256)
    assert ev["kl_mean"] >= 0 and ev["bpw"] == pytest.approx(res["bpw"])


def test_expert_stats_come_from_routed_tokens(moe_dir, calib_file):
    """An expert's Gram matrix counts exactly the tokens its router chose (checked against routing
    computed from the gate), and two experts of one layer see different tokens."""
    from llmpress.pipeline import iter_stats

    stats = next(iter_stats(moe_dir, calib=str(calib_file), samples=2, seq_len=32, batch_size=2, progress=False))
    # routing of block 0, recomputed from the original model
    ref = _hf(moe_dir)
    seen: dict[str, torch.Tensor] = {}
    h = ref.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: seen.update(idx=o[2]) or None)
    from llmpress.models import load_tokenizer
    from llmpress.pipeline import calib_ids

    ids = calib_ids(load_tokenizer(moe_dir), calib_file.read_text(), 2, 32)
    with torch.inference_mode():
        ref(input_ids=ids)
    h.remove()
    idx = seen["idx"]  # (T, k)
    gate = moe.family(ref.config).names[0]
    counts = [int((idx == e).any(-1).sum()) for e in range(4)]
    for e in range(4):
        st = stats.get(f"model.layers.0.mlp.experts.{e}.{gate}")
        assert (st.n if st else 0) == counts[e]
    assert sum(counts) == 2 * 64  # top-2 of 64 tokens
    dense_mlp = stats["model.layers.0.self_attn.q_proj"]
    assert dense_mlp.n == 64


def test_expert_without_tokens_falls_back(tmp_path, tokenizer_dir, calib_file, caplog):
    """A router that never picks expert 3 of layer 0 (the residual's channel 0 is a constant +5,
    which expert 3's router row reads with weight −10): GPTQ encodes that expert with an identity
    Hessian and says so; the result still loads and stays close to the original weights."""
    from safetensors.torch import load_file, save_file

    src = _build("mixtral", tmp_path / "m", tokenizer_dir)
    sd = load_file(src / "model.safetensors")
    sd["model.embed_tokens.weight"][:, 0] = 5.0
    sd["model.layers.0.self_attn.o_proj.weight"][0] = 0.0
    g = sd["model.layers.0.block_sparse_moe.gate.weight"]  # (E, H)
    g[:, 0] = 0.0  # only expert 3 reads the constant channel
    g[3] = 0.0
    g[3, 0] = -10.0
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="llmpress.moe"):
        res = llmpress.quantize(src, tmp_path / "g", method="gptq", bits=4, group_size=32, calib=str(calib_file),
                                samples=2, seq_len=32, progress=False, **FAST["gptq"])
    warned = {r.getMessage().split(":")[0] for r in caplog.records if "no calibration token" in r.getMessage()}
    # exactly the experts of layer 0 that its router (run in transformers) gives no token
    from llmpress.models import load_tokenizer
    from llmpress.pipeline import calib_ids

    ref, seen = _hf(src), {}
    h = ref.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: seen.update(idx=o[2]) or None)
    with torch.inference_mode():
        ref(input_ids=calib_ids(load_tokenizer(src), calib_file.read_text(), 2, 32))
    h.remove()
    idle = [e for e in range(4) if not (seen["idx"] == e).any()]
    assert 3 in idle
    layer0 = {w for w in warned if w.startswith("model.layers.0.")}
    assert layer0 == {f"model.layers.0.mlp.experts.{e}.{n}" for e in idle for n in ("w1", "w2", "w3")}
    for n in ("w1", "w2", "w3"):
        rep = res["layers"][f"model.layers.0.mlp.experts.3.{n}"]
        assert rep["codec"] == "gptq" and rep["rel_err"] < 0.2
    assert torch.isfinite(_logits(llmpress.load(tmp_path / "g"), _ids())).all()


def test_from_pretrained_per_expert(moe_dir, tmp_path):
    """transformers' from_pretrained on an MoE folder (expert 1 kept dense by the recipe) gives
    llmpress.load's modules and logits, and save_pretrained writes a folder that loads the same."""
    from transformers import AutoModelForCausalLM

    from llmpress.quant.linear import QuantLinear

    out = tmp_path / "q"
    rules = [{"match": r"lm_head|embed|experts\.1\.", "method": "keep"},
             {"match": ".*", "method": "rtn", "bits": 4, "group_size": 32}]
    llmpress.quantize(moe_dir, out, recipe={"rules": rules}, progress=False)
    ids = _ids()
    want = _logits(llmpress.load(out), ids)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    experts = hf.model.layers[0].mlp.experts
    assert isinstance(experts, moe.ExpertList)
    assert isinstance(experts[0].down_proj if hasattr(experts[0], "down_proj") else experts[0].w2, QuantLinear)
    assert isinstance(experts[1].down_proj if hasattr(experts[1], "down_proj") else experts[1].w2, torch.nn.Linear)
    torch.testing.assert_close(_logits(hf, ids), want, rtol=0, atol=0)
    hf.save_pretrained(tmp_path / "re")
    torch.testing.assert_close(_logits(llmpress.load(tmp_path / "re"), ids), want, rtol=0, atol=0)


def test_exports_compressed_tensors_and_gguf(moe_dir, tmp_path):
    """compressed-tensors: per-expert packed layers that transformers decompresses and fuses into
    the same logits. GGUF: each layer's experts packed into llama.cpp's stacked ffn_*_exps tensors,
    block for block, read back by gguf-py equal to llmpress's decode; routers in F32."""
    import gguf
    from transformers import AutoModelForCausalLM

    from llmpress.targets.gguf_verify import verify

    out = tmp_path / "q"
    llmpress.quantize(moe_dir, out, method="rtn", grid="gguf:q4_0", progress=False)
    ct = tmp_path / "ct"
    rep = llmpress.export(out, ct, format="compressed-tensors")
    shared = "shared_expert" in (moe_dir / "config.json").read_text()
    assert rep["exact"] == 2 * (4 + 3 * 4 + (3 if shared else 0))
    ids = _ids()
    hf = AutoModelForCausalLM.from_pretrained(str(ct)).eval()
    torch.testing.assert_close(_logits(hf, ids), _logits(llmpress.load(out), ids), rtol=1e-5, atol=1e-5)

    g = tmp_path / "m.gguf"
    llmpress.export(out, g, format="gguf")
    reader = gguf.GGUFReader(str(g))
    v = verify(reader, out)
    assert v["max_abs_exact"] == 0.0 and not v["missing"] and not v["extra"]
    t = {x.name: x for x in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    assert arch == ("qwen2moe" if shared else "llama")
    assert reader.fields[f"{arch}.expert_count"].contents() == 4
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        assert t[f"blk.1.{name}.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
        assert v["layers"][f"blk.1.{name}.weight"]["exact_layer"] and v["layers"][f"blk.1.{name}.weight"]["bitwise"]
    inter = 32 if shared else 96
    assert list(t["blk.0.ffn_gate_exps.weight"].shape) == [64, inter, 4]  # ggml order: (in, out, experts)
    assert list(t["blk.0.ffn_down_exps.weight"].shape) == [inter, 64, 4]
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    known = gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)]
    names = {gguf.TENSOR_NAMES[k].format(bid=b) for k in known for b in range(2)}
    assert {n.rsplit(".", 1)[0] for n in t} <= names


def test_factorize_and_finetune(moe_dir, tmp_path, calib_file):
    """Whitened low-rank per expert (its whitening from its routed tokens), and recovery training
    of a 3-bit folder whose experts train through their own quantizers."""
    from llmpress.lowrank.linear import LowRankLinear

    f = tmp_path / "f"
    llmpress.factorize(moe_dir, f, method="whiten", ratio=0.5, calib=str(calib_file), samples=4, seq_len=64,
                       progress=False)
    lo = llmpress.load(f)
    assert any(isinstance(m, LowRankLinear) for n, m in lo.named_modules() if ".experts." in n)
    assert torch.isfinite(_logits(lo, _ids())).all()

    q, ft = tmp_path / "q", tmp_path / "ft"
    llmpress.quantize(moe_dir, q, method="rtn", bits=3, group_size=32, progress=False)
    res = llmpress.finetune(q, ft, reference=moe_dir, text=str(calib_file), steps=3, lr=1e-3, seq_len=32,
                            batch_size=2, progress=False, checkpoint_every=2, grad_ckpt=False)
    assert res["steps"] == 3 and res["loss_last"] < res["loss_first"]
    before, after = read_manifest(q)["tensors"], read_manifest(ft)["tensors"]
    assert before.keys() == after.keys() and any(".experts." in k for k in after)
    assert torch.isfinite(_logits(llmpress.load(ft), _ids())).all()


def test_fused_checkpoint_refused(tmp_path):
    """Fused expert tensors on disk (a raw state_dict dump) are refused by name before any work."""
    from safetensors.torch import save_file

    from llmpress.models import TensorStore, resolve

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 4, 3)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="fused expert tensors on disk"):
        TensorStore(resolve(tmp_path))


def test_qwen3_moe_rtn_and_generate(tmp_path, tokenizer_dir):
    """Qwen3-MoE (q/k norm, normalised top-k, no shared expert): split, quantized per expert
    without calibration (streamed), loaded equal to transformers' dense export, and generating."""
    src = _build("qwen3_moe", tmp_path / "src", tokenizer_dir)
    out = tmp_path / "q"
    llmpress.quantize(src, out, method="rtn", bits=4, group_size=32, progress=False)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in read_manifest(out)["tensors"]
    llmpress.export(out, tmp_path / "d", format="dense")
    ids = _ids()
    torch.testing.assert_close(_logits(llmpress.load(out), ids), _logits(_hf(tmp_path / "d"), ids), rtol=1e-4, atol=1e-4)
    res = llmpress.generate(out, "the model routes", max_new_tokens=5, ignore_eos=True)
    assert res["new_tokens"] == 5


def test_experts_fan_out_on_ray(tmp_path, tokenizer_dir, calib_file, caplog, monkeypatch):
    """GPTQ with the experts encoded in Ray tasks on a local cluster writes the same bytes as one process."""
    sent: list[int] = []
    fan_out = moe.fan_out
    monkeypatch.setattr(moe, "fan_out", lambda fn, jobs, cluster: sent.append(len(jobs)) or fan_out(fn, jobs, cluster))
    src = _build("mixtral", tmp_path / "m", tokenizer_dir)
    kw = dict(method="gptq", bits=4, group_size=32, calib=str(calib_file), samples=2, seq_len=32, progress=False,
              **FAST["gptq"])
    llmpress.quantize(src, tmp_path / "one", **kw)
    with caplog.at_level(logging.INFO, logger="llmpress.cluster"):
        llmpress.quantize(src, tmp_path / "ray", workers=2, **kw)
    assert sent == [12, 12] and any("started locally" in r.getMessage() for r in caplog.records)  # 4 experts × 3, per block
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "ray" / "model.safetensors").read_bytes()
