"""transformers' from_pretrained / save_pretrained on llmpress folders (the registered "llmpress" method)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import llmpress
from llmpress.io.folder import compressed_module, module_state_names
from llmpress.lowrank.linear import LowRankLinear
from llmpress.quant.linear import QuantLinear
from llmpress.tensor import Stats, get_codec
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids

SRC = Path(__file__).resolve().parents[1] / "src"


def _auto():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _ids():
    return torch.randint(0, tinytok.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        h = safe_open(str(f), framework="pt")
        out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


_MAKE = {
    "rtn": lambda src, out: llmpress.quantize(src, out, method="rtn", bits=4, group_size=32, progress=False),
    "gptq": lambda src, out: llmpress.quantize(src, out, method="gptq", bits=4, group_size=32, samples=4, seq_len=64,
                                               progress=False),
    "whiten": lambda src, out: llmpress.factorize(src, out, method="whiten", ratio=0.5, samples=4, seq_len=64,
                                                  progress=False),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_llama_dir):
    """folder(kind): the tiny Llama compressed by ``kind``, written once per module."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp("hf") / kind
            _MAKE[kind](tiny_llama_dir, out)
            made[kind] = out
        return made[kind]

    return get


@pytest.mark.parametrize("kind,module_type", [("rtn", QuantLinear), ("gptq", QuantLinear), ("whiten", LowRankLinear)])
def test_from_pretrained_is_llmpress_load_and_round_trips(folder, tmp_path, kind, module_type):
    src = folder(kind)
    assert json.loads((src / "config.json").read_text())["quantization_config"]["modules"]
    model, info = _auto().from_pretrained(src, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    layers = [m for m in model.modules() if isinstance(m, module_type)]
    assert len(layers) == 2 * 7  # every block linear; embeddings and head kept
    assert all(not t.is_meta for t in model.state_dict().values())
    if module_type is QuantLinear:  # the codes stay packed in memory
        codes = [m.state_dict()["qweight"] for m in layers]
        assert all(q.dtype == torch.uint8 and q.numel() < m.in_features * m.out_features for q, m in zip(codes, layers))
    ids = _ids()
    logits = _logits(model, ids)
    assert torch.equal(logits, _logits(llmpress.load(src), ids))
    assert model.generate(ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 16)

    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert not (out / "llmpress.json").exists()
    a, b = _shards(src), _shards(out)
    assert sorted(a) == sorted(b)  # the folder's own names: <linear>.weight.<key>
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    again = _auto().from_pretrained(out)
    assert torch.equal(_logits(again, ids), logits)
    assert torch.equal(_logits(llmpress.load(out), ids), logits)  # no manifest: load goes through from_pretrained


def test_sharded_save_loads_back(folder, tmp_path):
    """A layout spread over several shards (and an index) is read from all their headers."""
    model = _auto().from_pretrained(folder("gptq"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="64KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    ids = _ids()
    assert torch.equal(_logits(_auto().from_pretrained(tmp_path / "sharded"), ids), _logits(model, ids))


def test_bfloat16_keeps_the_packed_tensors(folder):
    src = folder("rtn")
    ref = _auto().from_pretrained(src)
    model = _auto().from_pretrained(src, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    q, q32 = model.model.layers[1].mlp.down_proj, ref.model.layers[1].mlp.down_proj
    for k, t in q32.state_dict().items():
        assert q.state_dict()[k].dtype == t.dtype and torch.equal(q.state_dict()[k], t)
    ids = _ids()
    out = _logits(model, ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - _logits(ref, ids)).abs().max() < 0.05 * _logits(ref, ids).abs().max()
    assert model.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_folder_without_layout_in_config_reads_llmpress_json(folder, tmp_path):
    """Folders written before quantization_config.modules existed still load."""
    old = tmp_path / "old"
    shutil.copytree(folder("rtn"), old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["quantization_config"]["modules"]
    (old / "config.json").write_text(json.dumps(cfg))
    ids = _ids()
    assert torch.equal(_logits(_auto().from_pretrained(old), ids), _logits(llmpress.load(old), ids))


def test_dequantize_gives_dense_linears_of_the_decoded_weights(folder):
    model = _auto().from_pretrained(folder("rtn"))
    ids = _ids()
    before = _logits(model, ids)
    w = model.model.layers[0].self_attn.q_proj.dequantize()
    model.dequantize()
    lin = model.model.layers[0].self_attn.q_proj
    assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, w)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)


def _edit_layout(cfg: dict, how: str) -> None:
    q = cfg["quantization_config"]
    entry = q["modules"]["model.layers.1.mlp.up_proj"]
    if how == "missing":
        entry["keys"].append("zero")
    elif how == "extra":
        entry["keys"].remove("scale")
    elif how == "module":
        q["modules"]["model.layers.9.mlp.up_proj"] = entry
    elif how == "unlisted":
        del q["modules"]["model.layers.1.mlp.up_proj"]
    elif how == "codec":
        entry["codec"] = "nope"
    elif how == "other_codec":
        entry["codec"] = "whiten"
    elif how == "shape":
        entry["meta"]["shape"] = entry["meta"]["shape"][::-1]
    elif how == "malformed":
        del entry["keys"]
    elif how == "version":
        q["format_version"] = 99


@pytest.mark.parametrize("how,msg", [
    ("missing", r"model\.layers\.1\.mlp\.up_proj\.weight\.zero missing from the shards"),
    ("extra", r"shards hold model\.layers\.1\.mlp\.up_proj\.weight\.scale, which the layout does not list"),
    ("module", r"names model\.layers\.9\.mlp\.up_proj, which LlamaForCausalLM does not have"),
    ("unlisted", r"shards hold compressed tensors of model\.layers\.1\.mlp\.up_proj, which .* does not list"),
    ("codec", r"up_proj: codec 'nope': unknown method"),
    ("other_codec", r"up_proj: codec whiten stores \['U', 'V'\]; the layout lists"),
    ("shape", r"up_proj: stored for a \[64, 160\] weight; the model's linear is \[160, 64\]"),
    ("malformed", r"up_proj: malformed layout"),
    ("version", r"format version 99.*upgrade llmpress"),
])
def test_inconsistent_layout_is_refused_before_loading(folder, tmp_path, how, msg):
    bad = tmp_path / "bad"
    shutil.copytree(folder("rtn"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    _edit_layout(cfg, how)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        _auto().from_pretrained(bad)


def test_quantizing_on_the_fly_is_refused(tiny_llama_dir):
    from llmpress.integrations.transformers import LlmpressConfig

    with pytest.raises(ValueError, match="pre-quantized"):
        _auto().from_pretrained(tiny_llama_dir, quantization_config=LlmpressConfig())


def _stats(n: int) -> Stats:
    st = Stats()
    st.add(torch.randn(400, n) * torch.linspace(0.2, 3, n), gram=True)
    return st


@pytest.mark.parametrize("codec,params", [
    ("rtn", {"bits": 4, "group_size": 32}),
    ("gptq", {"bits": 3, "group_size": 16, "static_groups": False}),  # act order: g_idx stored
    ("awq", {"bits": 4, "group_size": 32}),
    ("hqq", {"bits": 4, "group_size": 32}),
    ("svd", {"rank": 8, "factor_dtype": "float16"}),
    ("svd", {"rank": 48}),  # saves nothing: stored dense
    ("whiten", {"rank": 8}),
    ("whiten+q", {"rank": 8, "bits": 4, "group_size": 32}),
    ("svd+q", {"rank": 60, "bits": 8, "group_size": 32}),  # dense fallback, quantized
    ("lqer", {"quant": "rtn", "bits": 3, "group_size": 32, "rank": 8}),
])
def test_state_names_say_where_each_module_keeps_its_tensors(codec, params):
    """What from_pretrained fills and save_pretrained writes: every tensor of the module is a stored one."""
    w = torch.randn(96, 64) / 8
    ct = get_codec(codec).encode(w, _stats(64), **params)
    bias = torch.randn(96)
    module = compressed_module(ct, bias)
    names, bias_name = module_state_names(ct)
    sd = module.state_dict()
    assert sorted(names) == sorted(ct.data)
    assert sorted(sd) == sorted([*names.values(), bias_name])
    for key, state in names.items():
        assert sd[state].dtype == ct.data[key].dtype and torch.equal(sd[state], ct.data[key]), (key, state)
    assert torch.equal(sd[bias_name], bias.to(sd[bias_name].dtype))


_ORDER = {
    "llmpress_first": """
        import sys
        import llmpress
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        import transformers.quantizers.auto as auto  # what from_pretrained imports to find a method
    """,
    "transformers_first": """
        import sys
        import transformers.quantizers.auto as auto  # the registry exists before llmpress comes
        import llmpress
    """,
}


@pytest.mark.parametrize("order", sorted(_ORDER))
def test_registered_whichever_is_imported_first(order):
    """The method is in transformers' registry either way, and the import hook leaves no trace
    (from_pretrained itself is tested in this process, which imported llmpress first)."""
    script = textwrap.dedent(_ORDER[order]) + textwrap.dedent("""
        import importlib.machinery
        from llmpress.integrations import _AfterImport
        from llmpress.integrations.transformers import LlmpressConfig, LlmpressQuantizer
        assert auto.AUTO_QUANTIZER_MAPPING["llmpress"] is LlmpressQuantizer
        assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["llmpress"] is LlmpressConfig
        assert not any(isinstance(f, _AfterImport) for f in sys.meta_path)
        assert isinstance(auto.__loader__, importlib.machinery.SourceFileLoader)
        assert auto.__spec__.loader is auto.__loader__
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_smollm2_rtn_4bit_g64_from_pretrained_talks(smollm_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "q4"
    llmpress.quantize(smollm_dir, out, method="rtn", bits=4, group_size=64, progress=False)
    model = _auto().from_pretrained(out)
    assert isinstance(model.model.layers[5].self_attn.q_proj, QuantLinear)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")
    assert "Paris" in tok.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0])
