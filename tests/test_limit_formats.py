"""``limit --formats gguf``: llama.cpp's K-quant mixes as llama-quantize makes them and as llmpress
makes them, on one frontier."""
from __future__ import annotations

import logging

import pytest

from llmpress.integrations import llama_cpp as lc
from llmpress.sweep.driver import limit, read_results
from llmpress.sweep.points import format_points, gguf_mix, llama_cpp

FAST = dict(ctx=64, tokens=256, samples=4, seq_len=32, threads=1, mixed_bpw=None)
HAVE_TOOLS = lc.find_tools() is not None


@pytest.fixture(scope="module")
def k_llama(tmp_path_factory):
    """4 layers, rows 256 wide (K-quants fit), ffn_down 512 wide, untied head."""
    from test_export_gguf import _small_model

    return _small_model(tmp_path_factory.mktemp("k-llama"), "llama", tie_word_embeddings=False, hidden_size=256,
                        intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128)


def test_gguf_points():
    quick = {p.label: p for p in format_points("gguf", "quick")}
    assert set(quick) == {"awq+gptq-q4_k_m", "llama.cpp-q4_k_m+imatrix", "awq+gptq-q3_k_m", "llama.cpp-q3_k_m+imatrix",
                          "awq+gptq-q2_k", "llama.cpp-q2_k+imatrix"}
    full = {p.label for p in format_points("gguf", "full")}
    assert {"awq-q2_k", "gptq-q2_k", "llama.cpp-q2_k"} <= full and set(quick) <= full
    cmd = quick["llama.cpp-q3_k_m+imatrix"].command
    assert "llama-imatrix" in cmd and "llama-quantize --imatrix {out}.imatrix {out}-f32.gguf {out}.gguf Q3_K_M" in cmd
    assert "llama-imatrix" not in llama_cpp("q2_k", imatrix=False).command
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        format_points("onnx", "quick")


def test_llama_cpp_points_left_out_without_the_tools(k_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(lc, "LOCATIONS", {"nowhere": lambda: None})
    with caplog.at_level(logging.WARNING):
        s = limit(str(k_llama), tmp_path, points=[gguf_mix("q4_k_m", "rtn"), llama_cpp("q4_k_m")], **FAST)
    assert "llama.cpp's tools not found" in caplog.text
    assert [r["label"] for r in read_results(tmp_path / "results.jsonl")] == ["rtn-q4_k_m"]
    assert s["frontier"] == ["rtn-q4_k_m"]


@pytest.mark.skipif(not HAVE_TOOLS, reason="llama.cpp's llama-quantize and llama-imatrix are not built")
def test_llama_cpp_and_llmpress_mixes_on_one_frontier(k_llama, tmp_path):
    pts = [gguf_mix("q4_k_m", "gptq"), llama_cpp("q4_k_m", imatrix=True), llama_cpp("q2_k", imatrix=False)]
    s = limit(str(k_llama), tmp_path, points=pts, **FAST)
    by = {r["label"]: r for r in read_results(tmp_path / "results.jsonl")}
    ours, theirs, q2 = by["gptq-q4_k_m"], by["llama.cpp-q4_k_m+imatrix"], by["llama.cpp-q2_k"]
    # the same type for every block linear; the head llama.cpp's Q6_K, llmpress's kept as it was (float32)
    import json

    vocab = json.loads((k_llama / "config.json").read_text())["vocab_size"]
    n_head = vocab * 256
    n_all = 4 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256) + n_head
    head = {"ours": 32 * n_head, "theirs": 6.5625 * n_head}
    assert (theirs["bpw"] * n_all - head["theirs"]) == pytest.approx(ours["bpw"] * n_all - head["ours"], rel=0.01)
    assert q2["bpw"] < theirs["bpw"]
    for r in (ours, theirs, q2):
        assert 0 < r["kl_mean"] < 5 and r["bpw_scope"] == "linear layers"
    assert q2["kl_mean"] > theirs["kl_mean"]
    calib = tmp_path / "recipes" / "calib-4x32.txt"
    assert calib.exists() and calib.read_text()
    assert f"-f {tmp_path / 'recipes'}/calib-4x32.txt -c 32 -b 32 --chunks 4" in theirs["command"]
    assert "--samples" not in theirs["command"] and "--samples 4" in ours["command"]
    assert set(s["frontier"]) <= set(by)
