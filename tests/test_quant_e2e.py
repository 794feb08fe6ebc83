"""End to end: quantize → folder → llmpress.load → generate; the CLI; bad input before work."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import llmpress
from llmpress.quant.linear import QuantLinear
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method,bits,gs", [("rtn", 8, 32), ("gptq", 4, 32), ("awq", 3, 16), ("awq+gptq", 3, 16), ("hqq", 4, -1)])
def test_quantize_load_generate_tiny(tiny_llama_dir, tmp_path, method, bits, gs):
    out = tmp_path / method
    res = llmpress.quantize(tiny_llama_dir, out, method=method, bits=bits, group_size=gs, samples=4, seq_len=64,
                            progress=False)
    assert abs(res["bpw"] - res["layers"]["model.layers.0.mlp.up_proj"]["bpw"]) < 0.5
    assert res["bytes_out"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["recipe"]["rules"][-1]["method"] == method
    model = llmpress.load(out)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 2 * 7  # every block linear; embeddings/head kept
    ref = llmpress.load(tiny_llama_dir)
    ids = torch.randint(0, tinytok.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    kl = torch.nn.functional.kl_div(_logits(model, ids).log_softmax(-1), _logits(ref, ids).log_softmax(-1),
                                    log_target=True, reduction="batchmean").item()
    assert kl < (1e-3 if bits == 8 else 0.5)
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 16)


def test_smollm2_rtn_4bit_g64_generates(smollm_dir, tmp_path):
    """The real model at 4 bits, groups of 64 (not the Q4_1 g32 grid): packed, loads, talks."""
    from transformers import AutoTokenizer

    out = tmp_path / "q4"
    res = llmpress.quantize(smollm_dir, out, method="rtn", bits=4, group_size=64, progress=False)
    assert 4.49 < res["bpw"] < 4.52  # 4 bits + fp16 scale and offset per 64 weights
    assert res["ratio"] < 0.35
    model = llmpress.load(out)
    assert isinstance(model.model.layers[5].self_attn.q_proj, QuantLinear)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("The capital of France is", return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0])
    assert "Paris" in text


def _cli(*args):
    from llmpress.cli import _load_commands, app

    _load_commands()
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_quantize_json(tiny_llama_dir, tmp_path):
    out = tmp_path / "cli"
    r = _cli("quantize", tiny_llama_dir, "-o", out, "--bits", "3", "--group-size", "16", "--sym", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("bpw", "bytes_in", "bytes_out", "ratio", "seconds", "peak_rss_bytes"):
        assert k in res
    assert 3 < res["bpw"] < 4.5
    r2 = _cli("quantize", tiny_llama_dir, "-o", out)
    assert r2.exit_code != 0 and "exists" in r2.output


@pytest.mark.parametrize("args,msg", [
    (["--bits", "7"], "bits must be one of"),
    (["--group-size", "-5"], "group_size"),
    (["--method", "nope"], "unknown method"),
    (["--range", "best"], "unknown range"),
])
def test_cli_bad_input(tiny_llama_dir, tmp_path, args, msg):
    r = _cli("quantize", tiny_llama_dir, "-o", tmp_path / "x", *args)
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_recipe_yaml_and_bad_recipes(tiny_llama_dir, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("rules:\n  - match: 'embed|lm_head'\n    method: keep\n"
                   "  - match: 'mlp\\.down_proj'\n    method: rtn\n    bits: 8\n    group_size: 32\n"
                   "  - match: '.*'\n    method: rtn\n    bits: 2\n    group_size: 16\n")
    res = llmpress.quantize(tiny_llama_dir, tmp_path / "o", recipe=rec, progress=False)
    assert res["layers"]["model.layers.1.mlp.down_proj"]["bpw"] > 8 > res["layers"]["model.layers.1.mlp.up_proj"]["bpw"]
    rec.write_text("rules:\n  - match: 'nothing_here'\n    method: rtn\n")
    with pytest.raises(ValueError, match="matches no"):
        llmpress.quantize(tiny_llama_dir, tmp_path / "o2", recipe=rec, progress=False)
    rec.write_text("rules:\n  - match: '.*'\n    method: rtn\n    bits: 9\n")
    with pytest.raises(ValueError, match="rule 0.*bits must be"):
        llmpress.quantize(tiny_llama_dir, tmp_path / "o3", recipe=rec, progress=False)


def test_example_recipes_are_valid():
    from pathlib import Path

    from llmpress.quant.api import build_recipe

    files = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        r = build_recipe(recipe=f)
        assert r.rule_for("model.layers.0.mlp.down_proj").method != "keep"
        assert r.rule_for("model.embed_tokens").method == "keep"
