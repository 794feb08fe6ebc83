"""``--gguf-mix``: llama.cpp's per-tensor type choice, by table and against llama-quantize itself."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmpress.quant.gguf_mix import Site, fallback, mix_recipe, mix_types, pick, use_more_bits

LLAMA_BIN = Path.home() / ".cache/llmpress/llama.cpp/build/bin"


def _llama_shapes(n_layer: int, hidden: int, inter: int, heads: int, kv: int, vocab: int = 300,
                  tied: bool = False) -> tuple[dict, dict]:
    hd = hidden // heads
    cfg = {"model_type": "llama", "num_hidden_layers": n_layer, "hidden_size": hidden, "intermediate_size": inter,
           "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tied}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)})
    return cfg, shapes


def test_use_more_bits_32_layers():
    # llama.cpp's rule on a 32-layer model: layers 0-3, 28-31 and every third from 6
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_on_32_layers():
    cfg, shapes = _llama_shapes(32, 4096, 11008, 32, 8)
    t = {n: ty for n, (_, ty) in mix_types("q4_k_m", cfg, shapes).items()}
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        want = "q6_k" if i in more else "q4_k"
        assert t[f"model.layers.{i}.self_attn.v_proj.weight"] == want
        assert t[f"model.layers.{i}.mlp.down_proj.weight"] == want
        assert t[f"model.layers.{i}.self_attn.q_proj.weight"] == "q4_k"
        assert t[f"model.layers.{i}.self_attn.o_proj.weight"] == "q4_k"
        assert t[f"model.layers.{i}.mlp.up_proj.weight"] == "q4_k"
    assert t["lm_head.weight"] == "q6_k" and t["model.embed_tokens.weight"] == "q4_k"


def test_fallback_table():
    assert [fallback(x, 576) for x in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")] == ["q4_0", "q4_0", "q5_0", "q5_1", "q8_0"]
    assert fallback("q4_k", 512) == "q4_k" and fallback("q6_k", 100) == "f16"


def test_q3_k_m_and_q2_k_picks():
    s = dict(n_layer=32, n_gqa=1, cols=4096)
    assert pick("q3_k_m", Site("attn_v", 1, **s)) == "q5_k" and pick("q3_k_m", Site("attn_v", 2, **s)) == "q4_k"
    assert pick("q3_k_m", Site("ffn_down", 1, **s)) == "q5_k" and pick("q3_k_m", Site("ffn_down", 2, **s)) == "q4_k"
    assert pick("q3_k_m", Site("attn_output", 5, **s)) == "q4_k" and pick("q3_k_m", Site("ffn_up", 5, **s)) == "q3_k"
    assert pick("q2_k", Site("attn_v", 5, **s)) == "q3_k"
    assert pick("q2_k", Site("attn_v", 5, **{**s, "n_gqa": 4})) == "q4_k"
    assert pick("q2_k", Site("attn_q", 5, **s)) == "q2_k" and pick("q2_k", Site("ffn_down", 5, **s)) == "q3_k"
    assert pick("q2_k", Site("output", -1, **{**s, "cols": 576})) == "q8_0"
    assert pick("q4_k_m", Site("attn_v", 5, **s, is_70b=True)) == "q5_k"


def test_recipe_has_one_rule_per_linear_and_keeps_embeddings():
    cfg, shapes = _llama_shapes(8, 256, 640, 8, 2)
    r = mix_recipe("q4_k_m", cfg, shapes, method="gptq")
    assert r.rule_for("model.embed_tokens").method == "keep" and r.rule_for("lm_head").method == "keep"
    assert r.rule_for("model.layers.0.self_attn.v_proj").params == {"grid": "gguf:q6_k"}
    # 8 layers: use_more_bits picks 0, 3, 6, 7
    assert r.rule_for("model.layers.3.self_attn.v_proj").params == {"grid": "gguf:q6_k"}
    assert r.rule_for("model.layers.2.self_attn.v_proj").params == {"grid": "gguf:q4_k"}
    assert r.rule_for("model.layers.1.mlp.down_proj").params == {"grid": "gguf:q5_0"}  # Q4_K, 640 wide
    assert r.rule_for("model.layers.3.mlp.down_proj").params == {"grid": "gguf:q8_0"}  # Q6_K, 640 wide
    assert r.rule_for("model.layers.11.mlp.down_proj") is None  # exact names: no layer 11, no layer 1 prefix match
    assert len(r.rules) == 1 + 8 * 7
    with pytest.raises(ValueError, match="unknown GGUF mix"):
        mix_types("q4_k_s", cfg, shapes)


# ----------------------------------------------------------------------------- against llama.cpp
def quantize_with_llama_cpp(f32_gguf: Path, out: Path, mix: str) -> dict[str, str]:
    """llama-quantize's type for each tensor of ``f32_gguf`` under ``mix`` (GGUF name → type, lower case)."""
    from gguf import GGUFReader

    subprocess.run([str(LLAMA_BIN / "llama-quantize"), str(f32_gguf), str(out), mix.upper(), "1"],
                   check=True, capture_output=True)
    return {t.name: t.tensor_type.name.lower() for t in GGUFReader(out).tensors}


@pytest.fixture(scope="module")
def mix_llama(tmp_path_factory) -> Path:
    """8 layers (use_more_bits picks some), hidden 256 (K-quants fit), intermediate 640 (ffn_down
    falls back), 8 heads over 2 KV heads (n_gqa 4), untied head."""
    from test_export_gguf import _small_model

    return _small_model(tmp_path_factory.mktemp("mix-llama"), "llama", tie_word_embeddings=False, hidden_size=256,
                        intermediate_size=640, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                        max_position_embeddings=128)


@pytest.mark.skipif(not (LLAMA_BIN / "llama-quantize").exists(), reason="llama.cpp's llama-quantize is not built")
@pytest.mark.parametrize("mix", ["q4_k_m", "q3_k_m", "q2_k"])
def test_same_types_as_llama_quantize(mix_llama, tmp_path, mix):
    import llmpress
    from llmpress.quant.gguf_mix import model_shapes

    f32 = tmp_path / "f32.gguf"
    llmpress.export(str(mix_llama), str(f32), format="gguf", type="f32")
    theirs = quantize_with_llama_cpp(f32, tmp_path / f"{mix}.gguf", mix)
    ours = mix_types(mix, *model_shapes(str(mix_llama)))
    assert len(ours) == 8 * 7 + 2
    diff = {g: (t, theirs.get(g)) for g, t in ours.values() if theirs.get(g) != t}
    assert not diff, diff
    assert len({t for _, t in ours.values()}) >= 3  # the rules are visible, not one type everywhere


@pytest.mark.skipif(not (LLAMA_BIN / "llama-quantize").exists(), reason="llama.cpp's llama-quantize is not built")
@pytest.mark.parametrize("kind", ["gpt2", "phi3"])
def test_fused_qkv_and_conv1d_same_types_as_llama_quantize(tmp_path, kind):
    """attn_qkv (counted as attn_v by llama.cpp), GPT-2's Conv1D (rows stored transposed), tied head."""
    import llmpress
    from llmpress.quant.gguf_mix import model_shapes
    from test_export_gguf import _small_model

    sizes = {"gpt2": dict(n_embd=256, n_layer=8, n_inner=640),
             "phi3": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=8, max_position_embeddings=128)}[kind]
    src = _small_model(tmp_path / kind, kind, **sizes)
    f32 = tmp_path / "f32.gguf"
    llmpress.export(str(src), str(f32), format="gguf", type="f32")
    theirs = quantize_with_llama_cpp(f32, tmp_path / "q.gguf", "q4_k_m")
    ours = mix_types("q4_k_m", *model_shapes(str(src)))
    diff = {g: (t, theirs.get(g)) for g, t in ours.values() if theirs.get(g) != t}
    assert not diff, diff
    assert {t for g, t in ours.values() if g.endswith("attn_qkv.weight")} == {"q4_k", "q6_k"}


def test_cli_quantize_mix_then_export_has_the_mix_types(mix_llama, tmp_path):
    """``quantize --gguf-mix`` then ``export --format gguf``: every linear stored exactly, as the type
    the mix names (so, where llama.cpp is built, as llama-quantize's)."""
    import json

    from gguf import GGUFReader
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app
    from llmpress.quant.gguf_mix import model_shapes

    _load_commands()
    run = CliRunner().invoke
    q, g = tmp_path / "q", tmp_path / "m.gguf"
    r = run(app, ["quantize", str(mix_llama), "-o", str(q), "--gguf-mix", "q4_k_m", "--json"])
    assert r.exit_code == 0, r.output
    r = run(app, ["export", str(q), "-o", str(g), "--format", "gguf", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["exact"] == 8 * 7
    got = {t.name: t.tensor_type.name.lower() for t in GGUFReader(g).tensors}
    want = mix_types("q4_k_m", *model_shapes(str(mix_llama)))
    assert {gn: got[gn] for gn, t in want.values() if gn.startswith("blk.")} == \
        {gn: t for gn, t in want.values() if gn.startswith("blk.")}
    assert got["output.weight"] == got["token_embd.weight"] == "f32"  # kept (llama.cpp: Q6_K and Q4_K)
    r = run(app, ["quantize", str(mix_llama), "-o", str(tmp_path / "x"), "--gguf-mix", "q4_k_m", "--grid", "gguf:q4_0"])
    assert r.exit_code != 0 and "drop grid" in r.output and not (tmp_path / "x").exists()


def test_api_refuses_clashes_and_unknown_mix(mix_llama, tmp_path):
    import llmpress

    with pytest.raises(ValueError, match="drop bits"):
        llmpress.quantize(str(mix_llama), str(tmp_path / "o"), gguf_mix="q4_k_m", bits=4)
    with pytest.raises(ValueError, match="unknown GGUF mix"):
        llmpress.quantize(str(mix_llama), str(tmp_path / "o"), gguf_mix="q5_k_m")
    assert not (tmp_path / "o").exists()
