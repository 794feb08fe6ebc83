"""Fused rotations (quant/rotate.py, quant/hadamard.py): the Hadamard constructions, the exactness of
the residual (and V→O head) rotation on every family it handles, tied heads, refusals before any
work, and a rotated GPTQ model through the ordinary loader and the GGUF export."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import llmpress
from llmpress.errors import InputError
from llmpress.quant import hadamard as hd
from llmpress.recipe import Recipe

sys.path.insert(0, str(Path(__file__).parent))
from families import VOCAB, build  # noqa: E402
import tinytok  # noqa: E402  (tests/: the tiny models' tokenizer; VOCAB bounds their token ids)

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
KEEP_ALL = Recipe.from_dict({"rules": [{"match": ".*", "method": "keep"}]})


# ---- Hadamard matrices -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 28, 36, 44, 60, 64, 96, 576])
def test_hadamard_orders(n: int) -> None:
    h = hd.hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_constructions() -> None:
    assert hd.construction(576) == ("paley2", 17, 16)  # SmolLM2's hidden: 36 × 16
    assert hd.construction(896) == ("paley2", 13, 32)  # Qwen2.5-0.5B's: 28 × 32
    assert hd.construction(52) is None and hd.hadamard(52) is None  # 52: 25 and 51 are not prime
    with pytest.raises(ValueError, match="prime"):
        hd.paley1(15)
    with pytest.raises(ValueError, match="prime"):
        hd.paley2(11)  # 11 ≡ 3 (mod 4): Paley I's


def test_orthogonal_seeded_and_fallback() -> None:
    a, b, c = hd.orthogonal(36, seed=1), hd.orthogonal(36, seed=1), hd.orthogonal(36, seed=2)
    assert a.kind == "hadamard" and torch.equal(a.matrix, b.matrix) and not torch.equal(a.matrix, c.matrix)
    assert torch.allclose(a.matrix.abs(), torch.full((36, 36), 1 / 6, dtype=torch.float64))
    r = hd.orthogonal(52, seed=0)
    assert r.kind == "random" and r.record()["construction"] == "qr(gaussian)"
    assert torch.allclose(r.matrix @ r.matrix.T, torch.eye(52, dtype=torch.float64), atol=1e-12)
    assert hd.orthogonal(64, kind="random").kind == "random"
    with pytest.raises(ValueError, match="no Hadamard"):
        hd.orthogonal(52, kind="hadamard")


# ---- exactness on the families -------------------------------------------------------------------

def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.double()


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _gemma1(out: Path, tokenizer_dir: Path) -> Path:
    """Gemma (1): (1 + γ) norms, √hidden embedding scale, tied head; no norms on the blocks' outputs."""
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM

    from families import small_tokenizer

    tok = AutoTokenizer.from_pretrained(str(small_tokenizer(tokenizer_dir, out)))
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return _save_with_spread_norms(GemmaForCausalLM(cfg), out)


def _llama(out: Path, tokenizer_dir: Path, hidden: int, tied: bool) -> Path:
    """A Llama whose hidden width is not a power of two (48 = Paley I(11) × 4; 52: no construction)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from families import small_tokenizer

    tok = AutoTokenizer.from_pretrained(str(small_tokenizer(tokenizer_dir, out)))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=tied,
                      attention_bias=True, mlp_bias=True)  # writer biases (o, down) rotate too
    return _save_with_spread_norms(LlamaForCausalLM(cfg), out)


def _save_with_spread_norms(model, out: Path) -> Path:
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval().save_pretrained(out, safe_serialization=True)
    return out


ROTATABLE = ["llama3", "qwen2.5", "qwen3", "phi3", "mistral"]


@pytest.fixture(scope="module")
def models(family_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rot")
    made = {n: build(n, root / n, family_tokenizer_dir) for n in ROTATABLE}
    made["gemma"] = _gemma1(root / "gemma", family_tokenizer_dir)
    made["llama48"] = _llama(root / "llama48", family_tokenizer_dir, 48, tied=False)
    made["llama52"] = _llama(root / "llama52", family_tokenizer_dir, 52, tied=True)
    return made


@pytest.mark.parametrize("name", [*ROTATABLE, "gemma", "llama48", "llama52"])
def test_rotation_is_exact(models, name: str, tmp_path) -> None:
    """A rotated model kept unquantized computes the original's logits, through llmpress.load and
    from_pretrained; norms are the identity, the rotation is recorded, a tied head with a final
    norm ≠ 1 is untied."""
    orig = models[name]
    out = tmp_path / "rot"
    res = llmpress.compress(orig, KEEP_ALL, out, rotate=True, progress=False)
    rec = res["rotation"]
    assert rec["residual"]["kind"] == ("random" if name == "llama52" else "hadamard")
    assert rec["heads"]["kind"] == "hadamard" if name not in ("llama48", "llama52") else rec["heads"]["order"] == 12
    ref = _logits(_hf(orig))
    for model in (llmpress.load(out), _hf(out)):
        got = _logits(model)
        assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    cfg_in, cfg_out = (json.loads((p / "config.json").read_text()) for p in (orig, out))
    assert rec["untied_head"] == bool(cfg_in.get("tie_word_embeddings", False))  # every norm here has spread
    assert not cfg_out.get("tie_word_embeddings", False)
    manifest = json.loads((out / "llmpress.json").read_text())
    assert manifest["rotation"] == rec
    from safetensors import safe_open

    offset = 1.0 if name == "gemma" else 0.0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        norms = [k for k in f.keys() if k.endswith("norm.weight") and "q_norm" not in k and "k_norm" not in k]
        assert norms and all(torch.equal(f.get_tensor(k), torch.full_like(f.get_tensor(k), 1 - offset)) for k in norms)


def test_rotation_without_heads_and_a_tied_identity_norm(tiny_llama_dir, tmp_path) -> None:
    """A tied model whose final norm is 1 stays tied (E Q serves embedding and head); heads=False
    leaves v_proj's rows in the residual rotation alone."""
    out = tmp_path / "rot"
    res = llmpress.compress(tiny_llama_dir, KEEP_ALL, out, rotate={"heads": False, "seed": 5}, progress=False)
    assert res["rotation"]["heads"] is None and not res["rotation"]["untied_head"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    ids = torch.randint(0, tinytok.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(_hf(tiny_llama_dir), ids), _logits(llmpress.load(out), ids)
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("name", ["gpt2", "opt", "gemma2"])
def test_refused_before_any_work(family_tokenizer_dir, tmp_path, name: str) -> None:
    orig = build(name, tmp_path / name, family_tokenizer_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"^unsupported: rotate: "):
        llmpress.quantize(orig, out, method="gptq", bits=4, group_size=32, rotate=True, samples=2, seq_len=16,
                          progress=False)
    assert not out.exists()


def test_rotated_gptq_exports_to_gguf(models, tmp_path) -> None:
    """GPTQ on the rotated model (its statistics gathered on it): an ordinary folder that loads and
    exports to GGUF exactly (gguf-py reads every tensor back equal to llmpress's decode); 8-bit
    codes stay next to the original."""
    from llmpress.targets.gguf_verify import verify

    orig, out = models["llama3"], tmp_path / "q"
    res = llmpress.quantize(orig, out, method="gptq", grid="gguf:q8_0", rotate=True, samples=4, seq_len=32,
                            progress=False)
    assert res["rotation"]["untied_head"]
    ref, got = _logits(_hf(orig)), _logits(llmpress.load(out))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 1e-3
    g = tmp_path / "m.gguf"
    llmpress.export(out, str(g), format="gguf")
    check = verify(g, out)
    assert check["max_abs_exact"] == 0.0 and not check["missing"]
    assert "output.weight" in check["layers"]  # the untied head


def test_cli_rotate(models, tmp_path) -> None:
    """``quantize --rotate`` and ``compress --rotate`` pass the rotation through (RTN streams the rotated tensors)."""
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    _load_commands()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(Recipe.uniform("rtn", bits=8, group_size=32).to_yaml())
    for argv in (["quantize", str(models["qwen3"]), "-o", str(tmp_path / "a"), "--bits", "8", "--group-size", "32"],
                 ["compress", str(models["qwen3"]), "-o", str(tmp_path / "b"), "--recipe", str(recipe)]):
        res = CliRunner().invoke(app, [*argv, "--rotate"])
        assert res.exit_code == 0, res.output
        manifest = json.loads((Path(argv[3]) / "llmpress.json").read_text())
        assert manifest["rotation"]["residual"]["construction"] == "sylvester(64)"


# ---- the MLP's hidden width: an online Hadamard before down_proj ---------------------------------

@pytest.mark.parametrize("name,kind", [("llama3", "auto"), ("qwen3", "auto"), ("phi3", "auto"), ("mistral", "auto"),
                                       ("gemma", "auto"), ("llama48", "random")])
def test_online_mlp_rotation_is_exact(models, name: str, kind: str, tmp_path) -> None:
    """``mlp``: down_proj stores W H and reads x H, H applied online by a pre-hook that llmpress.load
    and from_pretrained install from the record; the logits are the original's. Without the hook the
    stored weights compute something else (the rotation is in them), and from_pretrained's
    dequantize() folds it back into a plain linear."""
    orig = models[name]
    out = tmp_path / "rot"
    res = llmpress.compress(orig, KEEP_ALL, out, rotate={"mlp": True, "kind": kind}, progress=False)
    online = res["rotation"]["online"]["mlp.down_proj"]
    assert online["kind"] == ("random" if kind == "random" else "hadamard")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["rotation"] == res["rotation"]

    def unhook(model) -> None:
        for layer in model.model.layers:
            layer.mlp.down_proj._forward_pre_hooks.clear()

    hf = _exact_online(orig, out, unhook)
    assert all(not layer.mlp.down_proj._forward_pre_hooks for layer in hf.model.layers)


def test_online_rotation_calibrates_on_the_rotated_input(models, tmp_path, monkeypatch) -> None:
    """GPTQ's statistics of down_proj are gathered on x H (the input as the loaders will give it),
    and the rotated GPTQ folder exports dense with the rotation folded back (a plain model that
    transformers loads alone computes what llmpress.load does); GGUF and compressed-tensors refuse it
    before writing anything."""
    from llmpress.quant.hadamard import Orthogonal
    from llmpress.targets.api import ExportRefused
    from llmpress.tensor import Stats

    orig = models["llama3"]
    seen: list[torch.Tensor] = []
    add = Stats.add

    def spy(self, x, gram=True):
        if x.shape[-1] == 256 and not seen:  # block 0's down_proj (the only 256-wide input)
            seen.append(x.detach().reshape(-1, 256).clone())
        return add(self, x, gram)

    monkeypatch.setattr(Stats, "add", spy)
    out = tmp_path / "q"
    res = llmpress.quantize(orig, out, method="gptq", bits=8, group_size=32, rotate={"mlp": True}, samples=2,
                            seq_len=16, progress=False)
    monkeypatch.setattr(Stats, "add", add)
    h = Orthogonal.of_record(res["rotation"]["online"]["mlp.down_proj"]).matrix.float()
    # the same calibration windows through the original model: down_proj's input there, rotated
    from llmpress.models import load_tokenizer
    from llmpress.pipeline import _calib_text, calib_ids

    ids = calib_ids(load_tokenizer(orig), _calib_text(None), 2, 16)
    base, want = _hf(orig), []
    hook = base.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: want.append(a[0].reshape(-1, 256)))
    with torch.inference_mode():
        base(input_ids=ids)
    hook.remove()
    got, want_rot = seen[0], want[0] @ h
    assert got.shape == want_rot.shape
    assert (got - want_rot).abs().max().item() < 1e-4 * want_rot.abs().max().item()

    q = _logits(llmpress.load(out))
    assert (q - _logits(_hf(orig))).abs().max().item() < 0.05 * q.abs().max().item()
    dense = tmp_path / "dense"
    llmpress.export(out, dense, format="dense")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    assert (_logits(plain) - q).abs().max().item() < 1e-4 * q.abs().max().item()
    for fmt, dest in (("gguf", tmp_path / "m.gguf"), ("compressed-tensors", tmp_path / "ct")):
        with pytest.raises(ExportRefused, match="online rotation"):
            llmpress.export(out, dest, format=fmt)
        assert not dest.exists()


def test_online_rotation_refusals(models, tmp_path) -> None:
    """AWQ folds scales across down_proj's input: refused with mlp, before any work; a folder whose
    record names a module the model lacks is refused by the loader."""
    out = tmp_path / "a"
    with pytest.raises(ValueError, match="does not go with awq"):
        llmpress.quantize(models["llama3"], out, method="awq", bits=4, group_size=32, rotate={"mlp": True},
                          samples=2, seq_len=16, progress=False)
    assert not out.exists()
    rot = tmp_path / "rot"
    llmpress.compress(models["llama3"], KEEP_ALL, rot, rotate={"mlp": True}, progress=False)
    man = json.loads((rot / "llmpress.json").read_text())
    man["rotation"]["online"] = {"mlp.nothing": man["rotation"]["online"]["mlp.down_proj"]}
    (rot / "llmpress.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="no module 'mlp.nothing'"):
        llmpress.load(rot)


def test_rotated_sweep_point(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    """A rotated point of the sweep compresses with its rotation and says so in its label, command and key."""
    import llmpress.pipeline as pipeline
    from llmpress.sweep.driver import limit, read_results
    from llmpress.sweep.points import quant, quant_rotated

    seen = []
    real = pipeline.compress
    monkeypatch.setattr(pipeline, "compress", lambda *a, **kw: seen.append(kw.get("rotate")) or real(*a, **kw))
    point = quant_rotated("rtn", 4, 32, calib=False)
    assert point.key("ctx") != quant("rtn", 4, 32).key("ctx")
    limit(str(tiny_llama_dir), tmp_path / "r", points=[point], ctx=64, tokens=256, samples=2, seq_len=32, threads=1,
          mixed_bpw=None)
    assert seen == [{"mlp": True, "keep_head": True}]
    (row,) = read_results(tmp_path / "r" / "results.jsonl")
    assert row["label"] == "rtn-w4-g32+rot+mlp+keep" and "--rotate-mlp --rotate-keep-head" in row["command"]


def test_rotated_sweep_point_codec_options() -> None:
    """A point's codec options reach its recipe's rule, its label and its key; its command is the recipe's."""
    from llmpress.recipe import Recipe
    from llmpress.sweep.points import RECIPE_COMMAND, quant_rotated

    plain = quant_rotated("gptq", 3, 64)
    point = quant_rotated("gptq", 3, 64, options={"static_groups": False})
    assert point.label == "gptq-w3-g64-static_groups=false+rot+mlp+keep" and point.key("c") != plain.key("c")
    assert point.command.startswith(RECIPE_COMMAND) and point.command.endswith("--rotate-mlp --rotate-keep-head")
    rule = Recipe.from_dict(point.recipe).rules[-1]
    assert rule.method == "gptq" and rule.params["static_groups"] is False and rule.params["bits"] == 3
    assert "static_groups" not in Recipe.from_dict(plain.recipe).rules[-1].params
    gridded = quant_rotated("gptq", 2, 64, "rot+in+mlp", grid="asym", options={"static_groups": False})
    assert gridded.label == "gptq-w2-g64-asym-static_groups=false+rot+in+mlp" and gridded.params == {"rotate": {"inputs": True, "mlp": True}}
    assert Recipe.from_dict(gridded.recipe).rules[-1].params["grid"] == "asym"


# ---- keep_head: the stream rotated online at its ends, embedding and head as stored ---------------

def _stored(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _exact_online(orig: Path, out: Path, unhook: Callable[[Any], None], dense: Path | None = None):
    """The rotated folder ``out`` gives ``orig``'s logits through llmpress.load and from_pretrained,
    and not once ``unhook`` has taken the online rotations' hooks off the loaded model (the hooks are
    what make it exact); from_pretrained's dequantize() folds them back (that model is returned for
    the caller's checks), and so does the dense export into ``dense`` where given."""
    ref = _logits(_hf(orig))
    tol = 1e-4 * ref.abs().max().item()
    loaded = llmpress.load(out)
    for model in (loaded, _hf(out)):
        assert (_logits(model) - ref).abs().max().item() < tol
    unhook(loaded)
    assert (_logits(loaded) - ref).abs().max().item() > 100 * tol
    hf = _hf(out)
    hf.dequantize()
    assert (_logits(hf) - ref).abs().max().item() < tol
    if dense is not None:
        llmpress.export(out, dense, format="dense")
        assert "quantization_config" not in json.loads((dense / "config.json").read_text())
        assert (_logits(_hf(dense)) - ref).abs().max().item() < tol
    return hf


@pytest.mark.parametrize("name,spec", [("llama3", {"keep_head": True}), ("qwen3", {"keep_head": True, "mlp": True}),
                                       ("gemma", {"keep_head": True}), ("llama48", {"keep_head": True, "mlp": True}),
                                       ("llama52", {"keep_head": True})])
def test_keep_head_rotation_is_exact(models, name: str, spec: dict, tmp_path) -> None:
    """``keep_head``: the embedding, final norm and (tied or not) head are the original's tensors,
    a tied model stays tied, and the rotation of the stream is applied online (a forward hook on the
    embedding, a pre-hook on the final norm) by llmpress.load and from_pretrained: the logits are the
    original's, and not without the hooks; dequantize() and the dense export fold it back into a
    plain model of the original's architecture."""
    orig = models[name]
    out = tmp_path / "rot"
    res = llmpress.compress(orig, KEEP_ALL, out, rotate=spec, progress=False)
    rec = res["rotation"]
    assert rec["stream"] == {"after": "model.embed_tokens", "before": "model.norm"} and not rec["untied_head"]
    cfg_in, cfg_out = (json.loads((p / "config.json").read_text()) for p in (orig, out))
    assert cfg_out.get("tie_word_embeddings", False) == cfg_in.get("tie_word_embeddings", False)
    assert cfg_out["quantization_config"]["rotation"] == rec
    before, after = _stored(orig), _stored(out)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert (k in before) == (k in after) and (k not in before or torch.equal(before[k], after[k])), k

    def unhook(model) -> None:
        model.model.embed_tokens._forward_hooks.clear()
        model.model.norm._forward_pre_hooks.clear()

    hf = _exact_online(orig, out, unhook, tmp_path / "dense")
    assert not hf.model.embed_tokens._forward_hooks and not hf.model.norm._forward_pre_hooks


def test_keep_head_gptq(models, tmp_path) -> None:
    """GPTQ with ``keep_head`` on a tied model: statistics gathered on the rotated stream (the
    quantized model stays close to the original), the same stored bits as without the rotation
    (the head stays tied: nothing is added), block linears rotated (they differ from the unrotated
    GPTQ's); GGUF and compressed-tensors refuse the folder before writing anything."""
    from llmpress.targets.api import ExportRefused

    orig = models["llama3"]
    opts = dict(method="gptq", bits=8, group_size=32, samples=4, seq_len=32, progress=False)
    plain = llmpress.quantize(orig, tmp_path / "plain", **opts)
    rot = llmpress.quantize(orig, tmp_path / "rot", rotate={"keep_head": True}, **opts)
    assert json.loads((tmp_path / "rot" / "config.json").read_text())["tie_word_embeddings"]
    assert rot["bpw"] == plain["bpw"] and rot["linear_params"] == plain["linear_params"]
    a, b = _stored(tmp_path / "plain"), _stored(tmp_path / "rot")
    assert sorted(a) == sorted(b) and sum(t.nbytes for t in a.values()) == sum(t.nbytes for t in b.values())
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    ref = _logits(_hf(orig))
    got = _logits(llmpress.load(tmp_path / "rot"))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 1e-3
    for fmt, dest in (("gguf", tmp_path / "m.gguf"), ("compressed-tensors", tmp_path / "ct")):
        with pytest.raises(ExportRefused, match="residual stream after model.embed_tokens"):
            llmpress.export(tmp_path / "rot", dest, format=fmt)
        assert not dest.exists()


def test_keep_head_cli_and_refusals(models, tmp_path) -> None:
    """``--rotate-keep-head`` passes keep_head (with --rotate-mlp both); a record whose stream names a
    module the model lacks is refused by the loader."""
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    _load_commands()
    out = tmp_path / "a"
    res = CliRunner().invoke(app, ["quantize", str(models["qwen3"]), "-o", str(out), "--method", "rtn", "--bits", "8",
                                   "--group-size", "32", "--rotate-keep-head", "--rotate-mlp"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "llmpress.json").read_text())["rotation"]
    assert rec["stream"]["before"] == "model.norm" and "mlp.down_proj" in rec["online"]
    man = json.loads((out / "llmpress.json").read_text())
    man["rotation"]["stream"]["after"] = "model.nothing"
    (out / "llmpress.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="no module 'model.nothing'"):
        llmpress.load(out)


def test_decode_once_keeps_the_online_rotation(models, tmp_path) -> None:
    """The sweep's judge decodes quantized linears once (``decode_once`` replaces the modules): an
    online rotation's pre-hook on down_proj goes with the module, so the logits do not change."""
    from llmpress.quant.linear import decode_once

    out = tmp_path / "q"
    llmpress.quantize(models["llama3"], out, method="rtn", bits=4, group_size=32, rotate={"mlp": True, "keep_head": True},
                      progress=False)
    model = llmpress.load(out)
    before = _logits(model)
    assert decode_once(model) > 0
    assert all(layer.mlp.down_proj._forward_pre_hooks for layer in model.model.layers)
    assert (_logits(model) - before).abs().max().item() < 1e-4 * before.abs().max().item()


def test_recovery_keeps_the_online_rotation(models, tmp_path) -> None:
    """Recovery training swaps each quantized linear for a trainable stand-in: the online rotation's
    hooks go with it, so the student starts where the loaded folder is."""
    from llmpress.io.folder import read_manifest
    from llmpress.recovery.api import make_trainable, read_compressed

    out = tmp_path / "q"
    llmpress.quantize(models["llama3"], out, method="rtn", bits=4, group_size=32, rotate={"mlp": True, "keep_head": True},
                      progress=False)
    model = llmpress.load(out)
    before = _logits(model)
    make_trainable(model, *read_compressed(out, read_manifest(out)))
    assert all(layer.mlp.down_proj._forward_pre_hooks for layer in model.model.layers)
    assert (_logits(model) - before).abs().max().item() < 1e-3 * before.abs().max().item()


def test_full_budget_has_the_rotated_points() -> None:
    """The full sweep measures GPTQ 3- and 2-bit g64 on the model rotated without folding its norms
    (the embedding and head as stored: the bytes of the unrotated points they are compared with, and
    the group index of groups fitted as GPTQ goes), on the float-offset grid searched end by end."""
    from llmpress.recipe import Recipe
    from llmpress.sweep.points import RECIPE_COMMAND, budget

    pts = [p for p in budget("full") if p.params.get("rotate")]
    assert [p.label for p in pts] == [f"gptq-w{b}-g64-asym-range=mse2-static_groups=false+rot+in+mlp" for b in (3, 2)]
    for p, bits in zip(pts, (3, 2)):
        assert p.calib and p.params["rotate"] == {"inputs": True, "mlp": True}
        assert p.command == f"{RECIPE_COMMAND} --rotate-inputs --rotate-mlp"
        rule = Recipe.from_dict(p.recipe).rules[-1]
        assert (rule.method, rule.params["bits"], rule.params["group_size"], rule.params["static_groups"],
                rule.params["grid"], rule.params["range"]) == ("gptq", bits, 64, False, "asym", "mse2")


def test_full_budget_has_gptq_on_the_nf_grid() -> None:
    """The full sweep measures 3-bit g64 GPTQ on the NF grid too; its label, recipe and command
    agree, and the command's flags are ones quantize accepts."""
    from llmpress.sweep.points import budget

    (p,) = [p for p in budget("full") if p.label == "gptq-w3-g64-nf"]
    rule = p.recipe["rules"][-1]
    assert p.calib and rule["method"] == "gptq" and rule["grid"] == "nf"
    assert p.command.endswith("--method gptq --bits 3 --group-size 64 --grid nf")
    assert not [q for q in budget("full") if q.label == "gptq-w3-g64" and "grid" in q.recipe["rules"][-1]]



# ---- no residual rotation: each block norm's readers read its output rotated online -------------

READERS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}


@pytest.mark.parametrize("name,spec", [("llama3", {"inputs": True}), ("qwen3", {"inputs": True, "mlp": True}),
                                       ("gemma", {"inputs": True}), ("llama48", {"inputs": True, "heads": False})])
def test_input_rotation_is_exact(models, name: str, spec: dict, tmp_path) -> None:
    """``inputs``: nothing folded, so the norms, the embedding and the head are the original's
    tensors; q/k/v and gate/up store W H and read their input rotated online (one H a norm, from
    the record, by llmpress.load and from_pretrained): the logits are the original's, and not
    without the hooks; dequantize() and the dense export fold the rotations back."""
    orig = models[name]
    out = tmp_path / "rot"
    res = llmpress.compress(orig, KEEP_ALL, out, rotate=spec, progress=False)
    rec = res["rotation"]
    assert rec["residual"] is None and "stream" not in rec and not rec["untied_head"]
    assert READERS <= set(rec["online"]) and ("mlp.down_proj" in rec["online"]) == bool(spec.get("mlp"))
    assert rec["online"]["self_attn.q_proj"] == rec["online"]["self_attn.v_proj"] != rec["online"]["mlp.up_proj"]
    before, after = _stored(orig), _stored(out)
    for k, t in before.items():
        if "norm" in k or "embed" in k or "lm_head" in k:
            assert torch.equal(t, after[k]), k
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])

    def unhook(model) -> None:
        for layer in model.model.layers:
            for m in READERS:
                layer.get_submodule(m)._forward_pre_hooks.clear()

    hf = _exact_online(orig, out, unhook, tmp_path / "dense")
    assert all(not layer.get_submodule(m)._forward_pre_hooks for layer in hf.model.layers for m in READERS)


def test_input_rotation_gptq_and_cli(models, tmp_path) -> None:
    """GPTQ with ``--rotate-inputs``: its statistics gathered on the rotated inputs (the quantized
    model stays close to the original), the same stored bytes as unrotated; keep_head with inputs
    is refused (no stream to keep)."""
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    orig = models["llama3"]
    opts = dict(method="gptq", bits=8, group_size=32, samples=4, seq_len=32, progress=False)
    plain = llmpress.quantize(orig, tmp_path / "plain", **opts)
    _load_commands()
    out = tmp_path / "rot"
    res = CliRunner().invoke(app, ["quantize", str(orig), "-o", str(out), "--method", "gptq", "--bits", "8",
                                   "--group-size", "32", "--samples", "4", "--seq-len", "32", "--rotate-inputs"])
    assert res.exit_code == 0, res.output
    assert READERS <= set(json.loads((out / "llmpress.json").read_text())["rotation"]["online"])
    a, b = _stored(tmp_path / "plain"), _stored(out)
    assert sorted(a) == sorted(b) and sum(t.nbytes for t in a.values()) == sum(t.nbytes for t in b.values())
    ref = _logits(_hf(orig))
    got = _logits(llmpress.load(out))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 1e-3 and plain["bpw"] > 0
    with pytest.raises(InputError, match="no stream to keep"):
        llmpress.quantize(orig, tmp_path / "x", rotate={"inputs": True, "keep_head": True}, **opts)
    res = CliRunner().invoke(app, ["quantize", str(orig), "-o", str(tmp_path / "y"), "--rotate-inputs", "--rotate-keep-head"])
    assert res.exit_code != 0 and "no stream to keep" in res.output and not (tmp_path / "y").exists()
