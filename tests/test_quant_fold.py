"""AWQ scale folding: the fold leaves a block's function unchanged; folded AWQ stores no scale."""
from __future__ import annotations

import pytest
import torch

import llmpress
from llmpress.quant.fold import PATTERNS, FoldedStats, _gqa_expand, apply_fold, fold_block
from llmpress.tensor import Stats, get_codec
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids


@pytest.fixture()
def tiny_block(tiny_llama_dir):
    """Block 0 of the tiny GQA Llama (4 heads, 2 kv heads), its inputs and its rotary embeddings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, tinytok.VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        h = h * torch.linspace(0.2, 5.0, h.shape[-1])  # uneven channels, as real activations
        pos = model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
    return model.model.layers[0], h, pos


def _run(block, h, pos):
    with torch.no_grad():
        out = block(h, position_embeddings=pos, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def test_every_fold_pattern_keeps_the_block_function(tiny_block):
    block, h, pos = tiny_block
    ref = _run(block, h, pos)
    mods = dict(block.named_modules())
    g = torch.Generator().manual_seed(0)
    for pat in PATTERNS:
        width = mods[pat.consumers[0]].in_features
        expand = None
        if pat.kind == "attn_v":
            expand = _gqa_expand(mods["self_attn"], mods[pat.producer].out_features, width)
            assert expand is not None and expand.shape == (width,) and int(expand.max()) < mods[pat.producer].out_features
            s = (torch.rand(mods[pat.producer].out_features, generator=g) * 3 + 0.3)[expand]  # tied across heads
        else:
            s = torch.rand(width, generator=g) * 3 + 0.3
        apply_fold(mods, "model.layers.0.", pat, s, expand)
    got = _run(block, h, pos)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(mods["input_layernorm"].weight, torch.ones_like(mods["input_layernorm"].weight))


def test_fold_block_searches_shares_and_rewrites_stats(tiny_block):
    block, h, pos = tiny_block
    ref = _run(block, h, pos)
    mods = dict(block.named_modules())
    stats: dict[str, Stats] = {}
    shared: dict[int, tuple[torch.Tensor, Stats]] = {}  # id(input) -> (input, its Stats)

    def hook(name):
        def f(_m, args):
            x = args[0]
            _, st = shared.setdefault(id(x), (x, Stats()))  # holding x keeps its id from being reused
            if stats.get(name) is not st:
                st.add(x)
            stats[name] = st
        return f

    names = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear)]
    hs = [mods[n].register_forward_pre_hook(hook("model.layers.0." + n)) for n in names]
    _run(block, h, pos)
    for x in hs:
        x.remove()
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.v_proj"]
    codec = get_codec("awq")
    params = {"model.layers.0." + n: {"bits": 3, "group_size": 16} for n in names}
    params["model.layers.0.mlp.down_proj"]["fold"] = False  # up → down stays a stored scale
    changed = fold_block(codec, block, "model.layers.0.", params, stats)
    assert set(changed) == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj"):
        assert isinstance(stats["model.layers.0." + n], FoldedStats), n
    assert not isinstance(stats["model.layers.0.mlp.down_proj"], FoldedStats)
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.k_proj"]
    assert torch.allclose(_run(block, h, pos), ref, rtol=1e-4, atol=1e-4)
    # the uneven channels make the search pick a real scale, not s = 1
    assert not torch.allclose(changed["model.layers.0.input_layernorm.weight"], torch.ones(64))
    # a folded layer stores no in_scale; an unfolded one does
    q = codec.encode(mods["self_attn.q_proj"].weight.detach(), stats["model.layers.0.self_attn.q_proj"], bits=3, group_size=16)
    d = codec.encode(mods["mlp.down_proj"].weight.detach(), stats["model.layers.0.mlp.down_proj"], bits=3, group_size=16)
    assert "in_scale" not in q.data and "in_scale" in d.data


def _stored_keys(folder) -> set[str]:
    from safetensors import safe_open

    return {k for f in folder.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}


def test_folded_awq_end_to_end_stores_no_scale(tiny_llama_dir, tmp_path):
    kw = {"method": "awq", "bits": 4, "group_size": 16, "samples": 2, "seq_len": 32, "progress": False}
    awq = llmpress.quantize(tiny_llama_dir, tmp_path / "awq", **kw)
    awq_s = llmpress.quantize(tiny_llama_dir, tmp_path / "awq-s", fold=False, **kw)
    assert not any(k.endswith(".in_scale") for k in _stored_keys(tmp_path / "awq"))  # every scale folded
    assert sum(k.endswith(".in_scale") for k in _stored_keys(tmp_path / "awq-s")) == 2 * 7
    assert awq_s["bpw"] > awq["bpw"] + 0.1  # fp16 in_scale per input channel on 64–160-wide layers
    model, model_s, ref = (llmpress.load(p) for p in (tmp_path / "awq", tmp_path / "awq-s", tiny_llama_dir))
    assert not torch.allclose(model.model.layers[1].input_layernorm.weight, ref.model.layers[1].input_layernorm.weight)
    ids = torch.randint(0, tinytok.VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lr, lf, ls = (m(input_ids=ids).logits.log_softmax(-1) for m in (ref, model, model_s))
    kl = lambda a: torch.nn.functional.kl_div(a, lr, log_target=True, reduction="batchmean").item()
    assert kl(lf) < 0.5 and kl(ls) < 0.5


def test_family_patterns_follow_the_config():
    """Patterns are chosen by model_type and kept only where the config allows them."""
    from types import SimpleNamespace

    from llmpress.quant.fold import FOLDS, patterns_for

    opt = dict(model_type="opt", do_layer_norm_before=True, activation_function="relu")
    assert patterns_for(SimpleNamespace(**opt)) == FOLDS["opt"]
    post = patterns_for(SimpleNamespace(**{**opt, "do_layer_norm_before": False}))  # OPT-350m: post-norm
    assert [p.producer for p in post] == ["self_attn.v_proj", "fc1"]
    gelu = patterns_for(SimpleNamespace(**{**opt, "activation_function": "gelu"}))  # gelu(x/s) ≠ gelu(x)/s
    assert "fc1" not in [p.producer for p in gelu]
    assert patterns_for(SimpleNamespace(model_type="something-new")) == PATTERNS
    assert all(p.offset == 1.0 for p in patterns_for(SimpleNamespace(model_type="gemma2")) if p.kind == "norm")
