"""The sequential runner and the output folder, with a small in-test codec."""
from __future__ import annotations

import json

import pytest
import torch

import llmpress
from llmpress.io.folder import read_manifest
from llmpress.pipeline import calib_ids, collect_stats, compress
from llmpress.recipe import Recipe, Rule
from llmpress.errors import InputError
from llmpress.tensor import Codec, CompressedTensor, Stats, register
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids


class _Round(Codec):
    """Per-row 8-bit symmetric rounding; records how many tokens of Stats it saw."""

    gram = True

    def check_params(self, shape, params):
        if set(params) - {"bits"}:
            raise InputError(f"{self.name}: unknown parameter(s) {sorted(set(params) - {'bits'})}")

    def stored_shapes(self, meta):
        out, _ = meta["shape"]
        return {"q": (tuple(meta["shape"]), (torch.int8,)), "scale": ((out, 1), (torch.float16,))}, {}

    def encode(self, w, stats=None, bits=8, **_):
        qmax = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)  # (out, 1)
        q = torch.round(w / scale).to(torch.int8)
        meta = {"shape": list(w.shape), "dtype": "float32", "seen": stats.n if stats is not None else 0}
        return CompressedTensor(self.name, {"q": q, "scale": scale.half()}, meta)

    def decode(self, ct):
        return ct.data["q"].float() * ct.data["scale"].float()


@register("t-round")
class _RoundNoStats(_Round):
    pass


@register("t-round-cal")
class _RoundCal(_Round):
    needs_stats = True


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from llmpress.text import load_text

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(load_text("calib-mix")[:200_000])
    return p


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("codec", ["t-round", "t-round-cal"])
def test_compress_roundtrip_tiny(tiny_llama_dir, tmp_path, calib_file, codec):
    out = tmp_path / "out"
    res = compress(tiny_llama_dir, Recipe.uniform(codec), out, calib=str(calib_file), samples=4, seq_len=32, progress=False)
    # every block linear compressed, embeddings kept
    assert set(res["layers"]) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert 8 < res["bpw"] < 9.5  # int8 codes + fp16 row scales + meta
    man = read_manifest(out)
    assert man["tensors"]["model.layers.0.mlp.down_proj.weight"]["codec"] == codec
    seen = man["tensors"]["model.layers.1.mlp.up_proj.weight"]["meta"]["seen"]
    assert seen == (4 * 32 if codec == "t-round-cal" else 0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "llmpress"
    assert (out / "tokenizer.json").exists()

    ref = llmpress.load(tiny_llama_dir)
    got = llmpress.load(out)
    ids = torch.randint(0, tinytok.VOCAB, (2, 16))
    a, b = _logits(ref, ids), _logits(got, ids)
    assert not torch.equal(a, b)  # it really was rounded
    assert torch.allclose(a, b, atol=0.05), (a - b).abs().max()
    # a no-stats recipe streams; both routes must give the same weights for a per-tensor codec
    if codec == "t-round":
        assert res["calibration"] is None


def test_streaming_equals_sequential_weights(tiny_llama_dir, tmp_path, calib_file):
    a = compress(tiny_llama_dir, Recipe.uniform("t-round"), tmp_path / "a", progress=False)
    b = compress(tiny_llama_dir, Recipe.uniform("t-round-cal"), tmp_path / "b", calib=str(calib_file), samples=2, seq_len=16, progress=False)
    ma, mb = llmpress.load(tmp_path / "a"), llmpress.load(tmp_path / "b")
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), n
    assert a["bpw"] == pytest.approx(b["bpw"], rel=1e-3)


def test_recipe_rules_first_match_wins(tiny_llama_dir, tmp_path):
    r = Recipe([Rule("lm_head|embed", "keep"), Rule(r"down_proj", "keep"), Rule(".*", "t-round")])
    res = compress(tiny_llama_dir, r, tmp_path / "o", progress=False)
    assert res["layers"]["model.layers.0.mlp.down_proj"]["codec"] == "keep"
    assert res["layers"]["model.layers.0.mlp.up_proj"]["codec"] == "t-round"


def test_every_codec_derives_from_the_base_and_checks_its_params():
    from llmpress.tensor import codec_names, get_codec

    for name in codec_names():
        codec = get_codec(name)
        assert isinstance(codec, Codec), name
        codec.check_params((64, 64), {})  # its defaults are valid
        with pytest.raises(InputError, match="unknown|must|give"):
            codec.check_params((64, 64), {"no_such_parameter": 1})

    class NotACodec:
        pass

    with pytest.raises(TypeError, match="does not derive"):
        register("t-not-a-codec")(NotACodec)


@pytest.mark.parametrize("method,params", [("whiten", {"ratoi": 0.5}), ("whiten+q", {"ratio": 0.5, "bitz": 4}),
                                           ("lqer", {"rank": 4, "grup_size": 32}), ("gptq", {"bits": 4, "gruop_size": 32})])
def test_a_misspelt_parameter_fails_before_calibration(tiny_llama_dir, tmp_path, monkeypatch, method, params):
    """Every method's parameters are checked before any statistics are collected."""
    import llmpress.pipeline as P

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the recipe was checked")

    monkeypatch.setattr(P, "calib_ids", no_calibration)
    with pytest.raises(InputError, match="unknown parameter"):
        compress(tiny_llama_dir, Recipe.uniform(method, **params), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_bad_recipes(tiny_llama_dir, tmp_path):
    with pytest.raises(KeyError, match="unknown method"):
        compress(tiny_llama_dir, Recipe.uniform("no-such-method"), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="matches no"):
        compress(tiny_llama_dir, Recipe([Rule("nothing-like-this", "t-round")]), tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_refuses_existing_output_and_leaves_no_partial(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(FileExistsError):
        compress(tiny_llama_dir, Recipe.uniform("t-round"), out, progress=False)

    class Boom(_Round):
        def encode(self, *a, **k):
            raise RuntimeError("boom")

    register("t-boom")(Boom)
    with pytest.raises(RuntimeError):
        compress(tiny_llama_dir, Recipe.uniform("t-boom"), tmp_path / "p", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_nan_weights_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.self_attn.v_proj.weight has NaN"):
        compress(bad, Recipe.uniform("t-round"), tmp_path / "o", progress=False)


def test_calib_ids_and_short_text(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    text = "The quick brown fox jumps over the lazy dog. " * 200
    ids = calib_ids(tok, text, 4, 64)
    assert ids.shape == (4, 64)
    with pytest.raises(ValueError, match="too short"):
        calib_ids(tok, "too short", 4, 64)


def test_collect_stats_matches_manual(tiny_llama_dir, calib_file):
    st = collect_stats(tiny_llama_dir, calib=str(calib_file), samples=2, seq_len=16, match="layers.0.mlp.down_proj", progress=False)
    assert list(st) == ["model.layers.0.mlp.down_proj"]
    s: Stats = st["model.layers.0.mlp.down_proj"]
    assert s.n == 32 and s.gram.shape == (160, 160)
    # the Gram matrix of real activations is symmetric positive semi-definite
    assert torch.allclose(s.gram, s.gram.T)
    assert torch.linalg.eigvalsh(s.gram).min() > -1e-6 * s.gram.diagonal().max()


def test_compress_cli_with_recipe_yaml(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    rec = tmp_path / "r.yaml"
    rec.write_text(Recipe([Rule("embed|lm_head", "keep"), Rule(".*", "rtn", {"bits": 4, "group_size": 32})]).to_yaml())
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-m", "llmpress", "compress", str(tiny_llama_dir), "-o", str(out), "--recipe", str(rec), "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert 4 < res["bpw"] < 5.5 and res["bytes_out"] == read_manifest(out)["bytes_out"]
    p = subprocess.run([sys.executable, "-m", "llmpress", "compress", str(tiny_llama_dir), "-o", str(out), "--recipe", str(rec)],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "exists" in p.stderr and "Traceback" not in p.stderr


def test_siblings_fed_the_same_input_share_their_stats(tiny_llama_dir, calib_file):
    st = collect_stats(tiny_llama_dir, calib=str(calib_file), samples=3, seq_len=16, batch_size=2, match=r"layers\.1\.", progress=False)
    p = "model.layers.1."
    q, k, v, o = (st[p + f"self_attn.{n}_proj"] for n in "qkvo")
    gate, up, down = (st[p + f"mlp.{n}_proj"] for n in ("gate", "up", "down"))
    assert q is k is v and gate is up
    assert len({id(q), id(o), id(gate), id(down)}) == 4
    assert q.n == gate.n == down.n == 48  # each batch counted once, even when shared
    assert not torch.equal(q.gram, gate.gram)  # different inputs, different Gram matrices


def test_statistics_of_a_block_stop_after_its_last_linear_input(tiny_llama_dir):
    """Collecting the Stats of a block whose output nobody needs stops each batch once every
    hooked linear has seen its input: the same Stats as a whole forward, without the last linear."""
    from transformers import AutoModelForCausalLM

    from llmpress.pipeline import BlockCall, _StatsHooks

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    block = model.model.layers[0]
    ids = torch.randint(0, tinytok.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = model.model.rotary_emb(h, torch.arange(12)[None])
    kws = [BlockCall((), {"position_embeddings": pos, "attention_mask": None})] * 2
    lin = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    calls = []
    hd = lin["mlp.down_proj"].register_forward_hook(lambda *_: calls.append(1))
    full = _StatsHooks(lin, dict.fromkeys(lin, True))
    outs = full.run(block, [h, h[:1]], kws)
    assert len(calls) == 2 and all(o is not None for o in outs)
    early = _StatsHooks(lin, dict.fromkeys(lin, True), outputs=False)
    assert early.run(block, [h, h[:1]], kws) == [None, None]
    assert len(calls) == 2  # down_proj's input was taken, its product never computed
    hd.remove()
    for n in lin:
        a, b = full.stats[n], early.stats[n]
        assert a.n == b.n == 36 and torch.equal(a.gram, b.gram) and torch.equal(a.sq_mean, b.sq_mean)


@pytest.mark.parametrize("width", [7, 384, 577])
def test_gram_matrix_is_the_symmetric_product(width):
    """Stats' Gram matrix from the upper block triangle equals XᵀX (float64 reference) and is
    exactly symmetric (the blocks below the diagonal are mirrored, not recomputed)."""
    from llmpress.tensor import gram_matrix

    x = torch.randn(256, width, generator=torch.Generator().manual_seed(width))
    g, ref = gram_matrix(x), x.double().T @ x.double()
    assert g.dtype == torch.float32 and g.shape == (width, width)
    assert torch.allclose(g.double(), ref, rtol=1e-5, atol=1e-3)
    if width >= 384:
        assert torch.equal(g, g.T)


def test_trial_blocks_times_the_first_blocks_and_writes_nothing(tiny_llama_dir, tmp_path, calib_file):
    out = tmp_path / "trial"
    res = compress(tiny_llama_dir, Recipe.uniform("t-round-cal"), out, calib=str(calib_file), samples=2, seq_len=16,
                   progress=False, trial_blocks=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, the temporary folder gone
    tr = res["trial"]
    assert (tr["blocks_done"], tr["blocks_total"]) == (1, 2) and res["out"] is None and res["bpw"] is None
    assert len(res["timing"]["block_seconds"]) == 1
    assert tr["extrapolated_seconds"] == pytest.approx(res["seconds"] + tr["seconds_per_block"])
    assert any(".layers.0." in k for k in res["layers"]) and not any(".layers.1." in k for k in res["layers"])
    with pytest.raises(ValueError, match="trial blocks"):
        compress(tiny_llama_dir, Recipe.uniform("t-round"), out, progress=False, trial_blocks=1)  # streams: no blocks


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_float32_grams_give_the_same_folder(tiny_llama_dir, tmp_path, calib_file, monkeypatch, method):
    """GPTQ and AWQ read the Gram matrix in float32 only: narrowing it after the statistics pass
    changes no stored byte; a whitened factorization (float64 Cholesky) keeps its float64 Gram."""
    import llmpress.pipeline as pl
    from safetensors.torch import load_file

    seen: dict[str, set] = {"dtypes": set()}
    real = pl._narrow_grams

    def spy(stats, plan):
        real(stats, plan)
        seen["dtypes"] |= {st.gram.dtype for st in stats.values() if st.gram is not None}

    recipe = Recipe([Rule(r"lm_head|embed", "keep"), Rule(r"mlp\.down_proj", "whiten", {"ratio": 0.5}),
                     Rule(".*", method, {"bits": 3, "group_size": 32})])
    kw = dict(calib=str(calib_file), samples=2, seq_len=32, progress=False)
    monkeypatch.setattr(pl, "_narrow_grams", spy)
    compress(tiny_llama_dir, recipe, tmp_path / "narrow", **kw)
    assert seen["dtypes"] == {torch.float32, torch.float64}  # down_proj's (whiten) stays float64
    monkeypatch.setattr(pl, "_narrow_grams", lambda stats, plan: None)
    compress(tiny_llama_dir, recipe, tmp_path / "wide", **kw)
    a, b = load_file(str(tmp_path / "narrow" / "model.safetensors")), load_file(str(tmp_path / "wide" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
