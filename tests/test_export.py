"""The export driver and the dense target: exact weights, the fallback policy, every input kind."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import llmpress
from llmpress.targets import Target, get_target, target_names
from llmpress.targets.api import ExportRefused, plan_actions
from llmpress.targets.source import ExportSource
from llmpress.tensor import decode
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def q4(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "q4"
    llmpress.quantize(tiny_llama_dir, out, method="rtn", bits=4, group_size=32, progress=False)
    return out


def test_dense_export_is_the_decoded_model(q4, tmp_path):
    from transformers import AutoModelForCausalLM

    res = llmpress.export(q4, tmp_path / "d", format="dense")
    assert res["exact"] == 14 and res["fallback"] == {} and res["max_abs_rounding"] == 0.0
    assert (tmp_path / "d" / "tokenizer.json").exists()
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in cfg
    # weights: exactly what llmpress decodes
    with ExportSource(q4) as src, safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        for name in src.compressed_names:
            assert torch.equal(f.get_tensor(name), decode(src.compressed(name)))
    # and the plain transformers model computes what llmpress's does
    ids = torch.randint(0, tinytok.VOCAB, (1, 16))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert torch.equal(_logits(dense, ids), _logits(llmpress.load(q4), ids))


def test_dense_bf16_reports_its_rounding(q4, tmp_path):
    res = llmpress.export(q4, tmp_path / "b", format="dense", dtype="bfloat16")
    assert res["dtype"] == "bfloat16" and 0 < res["max_abs_rounding"] < 1e-2
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        llmpress.export(q4, tmp_path / "x", format="dense", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_export_reads_originals_and_lossless_containers(tiny_llama_dir, tmp_path):
    llmpress.pack(tiny_llama_dir, tmp_path / "t.llmp")
    a = llmpress.export(tiny_llama_dir, tmp_path / "a", format="dense")
    b = llmpress.export(tmp_path / "t.llmp", tmp_path / "b", format="dense")
    assert a["source_kind"] == b["source_kind"] == "original" and a["exact"] == 0
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fa, \
            safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k))


class _Picky(Target):
    """A target that stores only 8-bit layers exactly, for the driver's policy."""

    name = "picky"
    fallbacks = ("dense",)

    def why_not(self, ct, **opts):
        return None if ct.meta["bits"] == 8 else f"{ct.meta['bits']}-bit codes"


def test_fallback_policy_names_the_layers(q4):
    with ExportSource(q4) as src:
        with pytest.raises(ExportRefused, match=r"(?s)14 of 14 compressed layers.*mlp\.up_proj\.weight: 4-bit codes"):
            plan_actions(src, _Picky(), "refuse")
        actions, reasons = plan_actions(src, _Picky(), "dense")
        assert set(actions.values()) == {"dense"} and len(reasons) == 14
        with pytest.raises(ValueError, match="cannot carry out the fallback .requantize."):
            plan_actions(src, _Picky(), "requantize")
        with pytest.raises(ValueError, match="unknown fallback"):
            plan_actions(src, _Picky(), "guess")


def test_registry_and_cli(q4, tmp_path):
    from llmpress.cli import _load_commands, app

    assert "dense" in target_names()
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        get_target("onnx")
    _load_commands()
    run = CliRunner().invoke
    r = run(app, ["export", str(q4), "-o", str(tmp_path / "c"), "--format", "dense", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["exact"] == 14
    r = run(app, ["export", str(q4), "-o", str(tmp_path / "c"), "--format", "dense"])
    assert r.exit_code == 2 and "exists" in r.output
    r = run(app, ["export", str(q4), "-o", str(tmp_path / "e"), "--format", "onnx"])
    assert r.exit_code == 2 and "unknown export format" in r.output and not (tmp_path / "e").exists()
