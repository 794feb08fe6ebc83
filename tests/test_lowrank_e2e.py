"""Factorize end to end (tiny Llama: pipeline → folder → llmpress.load → generate), the CLI,
and whitened vs plain SVD on the real SmolLM2's activations."""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import llmpress
from llmpress.lowrank.linear import LowRankLinear
from llmpress.tensor import Stats, get_codec

KW = dict(samples=4, seq_len=64, progress=False)  # 256 calibration tokens ≥ the widest input (160)


def _tok(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def test_factorize_load_generate(tiny_llama_dir, tmp_path):
    res = llmpress.factorize(tiny_llama_dir, tmp_path / "f", method="whiten", ratio=0.5, **KW)
    assert 0.45 < res["params_kept"] <= 0.5
    assert res["dense_layers"] == [] and all(k is not None for k in res["ranks"].values())
    model = llmpress.load(tmp_path / "f")
    lows = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lows) == 14
    stored = sum(m.stored_weights() for m in lows)
    assert stored == res["linear_params_out"]
    ids = _tok(tiny_llama_dir)("The cat sat on", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


def test_factorize_budget_hits_budget(tiny_llama_dir, tmp_path):
    res = llmpress.factorize(tiny_llama_dir, tmp_path / "b", method="whiten", ratio=0.5, allocation="budget",
                             floor=0.1, **KW)
    assert res["params_kept"] <= 0.5
    assert res["params_kept"] > 0.5 - 320 / res["linear_params_in"]  # within one rank step of the widest layer
    ranks = [k for k in res["allocation"].values() if k is not None]
    assert len(set(ranks)) > 3  # not uniform: spread by sensitivity


def test_factorize_energy_leaves_useless_ranks_dense(tiny_llama_dir, tmp_path):
    # Random weights have flat spectra: 99 % of the energy needs nearly full rank, which saves nothing.
    res = llmpress.factorize(tiny_llama_dir, tmp_path / "e", method="svd", energy=0.99, **KW)
    assert res["dense_layers"] and res["params_kept"] == 1.0
    assert all(res["ranks"][n] is None for n in res["dense_layers"])


def test_cli_factorize_json_and_bad_input(tiny_llama_dir, tmp_path):
    from llmpress.cli import _load_commands, app

    _load_commands()
    runner = CliRunner()
    r = runner.invoke(app, ["factorize", str(tiny_llama_dir), "-o", str(tmp_path / "c"), "--method", "rsvd",
                            "--ratio", "0.6", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.55 < res["params_kept"] <= 0.6 and "bpw" in res and "ranks" in res
    for args, msg in ([("--ratio", "1.2"), "ratio must be in"], [("--energy", "0"), "energy must be in"],
                      [("--rank", "1000"), "rank 1000"], [("--method", "nope"), "unknown method"]):
        r = runner.invoke(app, ["factorize", str(tiny_llama_dir), "-o", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and msg in r.output, r.output
    r = runner.invoke(app, ["factorize", str(tiny_llama_dir), "-o", str(tmp_path / "c"), "--method", "svd"])
    assert r.exit_code == 2 and "exists" in r.output


def test_whiten_beats_svd_on_real_activations(smollm_dir):
    """At the same rank, whitened SVD's output error ‖(W−W')X‖ is below plain SVD's, on SmolLM2's
    real inputs to a layer (X from real text, W from the real checkpoint), also on held-out tokens."""
    from llmpress.models import load_model
    from llmpress.pipeline import calib_ids
    from llmpress.text import CALIB_DEFAULT, load_text

    model = load_model(smollm_dir)
    model.model.layers = model.model.layers[:5]  # only the blocks up to the one measured
    layer = model.model.layers[4].self_attn.q_proj  # (576, 576)
    xs = []
    h = layer.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    ids = calib_ids(_tok(smollm_dir), load_text(CALIB_DEFAULT), 8, 256)  # 2048 tokens
    with torch.inference_mode():
        for i in range(0, 8, 2):
            model.model(input_ids=ids[i : i + 2])
    h.remove()
    x = torch.cat(xs).float()  # (T, 576)
    fit, test = x[:1536], x[1536:]
    st = Stats()
    st.add(fit, gram=True)
    w = layer.weight.detach().float()
    k = 144  # half the parameters
    errs = {}
    for name in ("svd", "whiten", "asvd"):
        w_hat = get_codec(name).decode(get_codec(name).encode(w, st, rank=k))
        errs[name] = [float(((w - w_hat) @ z.T).norm() / (w @ z.T).norm()) for z in (fit, test)]
    assert errs["whiten"][0] < 0.7 * errs["svd"][0], errs  # on the calibration tokens: optimal
    assert errs["whiten"][1] < 0.8 * errs["svd"][1], errs  # on held-out tokens
    assert errs["asvd"][1] < errs["svd"][1], errs
