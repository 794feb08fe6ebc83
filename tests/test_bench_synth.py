"""The scale benchmark's synthetic checkpoint (bench/synth.py) at a toy shape: a valid sharded
Hugging Face folder whose values follow the source model's distributions."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import synth  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory, smollm_dir) -> Path:
    out = tmp_path_factory.mktemp("synth") / "toy"
    synth.write_checkpoint(out, synth.SHAPES["toy"], smollm_dir)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_folder_is_a_sharded_checkpoint_transformers_loads(toy):
    shape = synth.SHAPES["toy"]
    index = json.loads((toy / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in toy.glob("*.safetensors"))
    assert len(files) == shape.shards and sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in toy.glob("*.safetensors")) - sum(
        8 + int.from_bytes(open(p, "rb").read(8), "little") for p in toy.glob("*.safetensors"))
    sd = _tensors(toy)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {n: s for n, s, _, _ in shape.tensors()}
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(toy), dtype=torch.float32)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].float())
    tok = AutoTokenizer.from_pretrained(str(toy))
    assert len(tok("hello world")["input_ids"]) > 0  # SmolLM2's tokenizer travels with the checkpoint
    ids = torch.arange(16).unsqueeze(0)  # the toy vocabulary is smaller than the tokenizer's
    assert torch.isfinite(model(ids).logits).all()


def test_values_follow_the_source_distributions(toy, smollm_dir):
    sd = _tensors(toy)
    src, _ = synth.source_getter(smollm_dir)
    # a norm (no scaling): the same quantiles as the source layer's norm
    for name, src_name in (("model.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weight"),
                           ("model.layers.1.post_attention_layernorm.weight", "model.layers.29.post_attention_layernorm.weight")):
        a, b = sd[name].float(), src(src_name).float()
        qs = torch.tensor([0.1, 0.5, 0.9])
        assert torch.allclose(torch.quantile(a, qs), torch.quantile(b, qs), rtol=0.1, atol=0.02)
    # a linear: the source's spread scaled by sqrt(fan-in ratio), and BF16 exponents spread like a real model's
    w, ws = sd["model.layers.0.mlp.down_proj.weight"].float(), src("model.layers.0.mlp.down_proj.weight").float()
    ratio = w.std() / ws.std()
    assert ratio == pytest.approx(math.sqrt(ws.shape[1] / w.shape[1]), rel=0.15)
    exps = torch.unique(sd["model.layers.0.mlp.down_proj.weight"].view(torch.int16).bitwise_right_shift(7) & 0xFF)
    assert len(exps) >= 8  # many binades, as trained weights have (not one value nor a narrow band)
    # two draws are different values (not one tensor repeated)
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.q_proj.weight"])
