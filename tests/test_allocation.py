"""Allocation over a menu: the exact knapsack, the menus and their costs, the Fisher proxy, the CLI."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmpress.sweep.knapsack import solve, units
from llmpress.sweep.menu import GGUF_TYPES, Option, gguf_tensor_bytes, options_for


def _brute(costs, values, cap):
    best, arg = None, None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        c = sum(costs[i][o] for i, o in enumerate(pick))
        v = sum(values[i][o] for i, o in enumerate(pick))
        if c <= cap and (best is None or v < best - 1e-12):
            best, arg = v, pick
    return best, arg


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_is_exact_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    costs = [[rng.randint(0, 12) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    values = [[rng.random() * 10 for _ in c] for c in costs]
    cap = rng.randint(0, 40)
    best, _ = _brute(costs, values, cap)
    pick = solve(costs, values, cap)
    if best is None:
        assert pick is None
        return
    assert sum(costs[i][o] for i, o in enumerate(pick)) <= cap
    assert sum(values[i][o] for i, o in enumerate(pick)) == pytest.approx(best, abs=1e-9)


def test_greedy_walk_is_not_exact_but_the_solver_is():
    # the greedy walk (best gain per bit first) takes b's cheap first step (1.5 per bit), after
    # which a's upgrade no longer fits and it ends at 10 + 0; the optimum upgrades a alone: 0 + 5
    costs = [[0, 10], [0, 1, 10]]
    values = [[10.0, 0.0], [5.0, 3.5, 0.0]]
    assert solve(costs, values, 10) == [1, 0]


def test_units_round_up_within_tolerance():
    costs = [[1000 * b + 7 for b in (2, 3, 4)] for _ in range(10)]
    budget = 3.5 * 1000 * 10
    c, cap, u = units(costs, budget)
    assert u == int(1e-3 * budget / 10)
    pick = solve(c, [[3.0, 2.0, 1.0]] * 10, cap)
    spent = sum(costs[i][o] for i, o in enumerate(pick))
    assert spent <= budget and spent >= budget - 10 * 1000 - 10 * u  # within one step + rounding


# --------------------------------------------------------------------------- menus and the real pipeline
FAST = ["--samples", "4", "--seq-len", "32"]


@pytest.fixture(scope="module")
def llama256(tmp_path_factory) -> Path:
    """A 2-layer Llama whose 256-wide rows take the K-quants and whose 320-wide down_proj rows fall back."""
    from test_export_gguf import _small_model

    return _small_model(tmp_path_factory.mktemp("alloc256"), "llama", hidden_size=256, intermediate_size=320)


def test_gguf_menu_falls_back_and_collapses():
    assert [o.gguf_type for o in options_for("gguf", (512, 256))] == list(GGUF_TYPES)
    # 576-wide rows: q2_k and q3_k both fall back to q4_0 → one option; q4_k → q5_0, q5_k → q5_1, q6_k and q8_0 → q8_0
    assert [o.gguf_type for o in options_for("gguf", (576, 576), "awq")] == ["q4_0", "q5_0", "q5_1", "q8_0"]
    assert {o.method for o in options_for("gguf", (576, 576), "awq")} == {"awq"}
    assert gguf_tensor_bytes("q4_k", (576, 1536)) == 576 * 6 * 144 and gguf_tensor_bytes("q8_0", (3, 32)) == 32 * 4
    with pytest.raises(ValueError, match="unknown menu"):
        options_for("nope", (4, 4))
    with pytest.raises(ValueError, match="a method applies"):
        options_for("gptq", (64, 64), "awq")


def test_option_costs_are_the_stored_bits():
    import torch

    from llmpress.tensor import get_codec

    w = torch.randn(64, 256)
    for o in options_for("rtn", (64, 256)) + options_for("gguf", (64, 256), "rtn"):
        ct = get_codec(o.method).encode(w, None, **o.params)
        if o.gguf_type:  # the GGUF blocks (what export writes), not the CompressedTensor's metadata
            assert o.cost_bits((64, 256), ct) == 8 * gguf_tensor_bytes(o.gguf_type, (64, 256))
            assert abs(ct.nbits() - o.cost_bits((64, 256), ct)) < 8 * 400  # the same blocks, plus metadata
        else:
            assert o.cost_bits((64, 256), ct) == ct.nbits()


def test_gguf_target_bytes_is_the_exported_file_size(llama256, tmp_path):
    from llmpress.cli import _load_commands, app
    from llmpress.quant.gguf_mix import model_shapes
    from llmpress.targets.gguf_size import fixed_bytes

    _, shapes = model_shapes(str(llama256))
    lin = {n: s for n, s in shapes.items() if ".layers." in n and n.endswith("proj.weight")}
    fixed = fixed_bytes(str(llama256), set(lin), "q8_0")
    lo = sum(min(gguf_tensor_bytes(o.gguf_type, s) for o in options_for("gguf", s)) for s in lin.values())
    hi = sum(max(gguf_tensor_bytes(o.gguf_type, s) for o in options_for("gguf", s)) for s in lin.values())
    target = fixed + (lo + hi) // 2
    _load_commands()
    runner = CliRunner()
    out = tmp_path / "alloc"
    r = runner.invoke(app, ["compress", str(llama256), "-o", str(out), "--menu", "gguf", "--method", "rtn",
                            "--target-bytes", str(target), "--json", *FAST])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    a = res["allocation"]
    assert a["fixed_bytes"] == fixed and a["predicted_bytes"] <= target
    assert len(set(a["options"])) > 1  # a real mix at a budget between the extremes
    assert (out / "recipe.yaml").exists()
    r = runner.invoke(app, ["export", str(out), "-o", str(tmp_path / "m.gguf"), "--format", "gguf", "--type", "q8_0"])
    assert r.exit_code == 0, r.output
    size = (tmp_path / "m.gguf").stat().st_size
    assert abs(size - target) <= 0.01 * target
    assert abs(size - a["predicted_bytes"]) <= 64  # the file's name in its metadata aside, exact


def _table(layers: dict[str, float]) -> "Table":
    from llmpress.sweep.sensitivity import Choice, Table

    opts = {b: Option.of("rtn", bits=b, group_size=64) for b in (2, 3, 4, 8)}
    return Table({n: [Choice(opts[b], 1000 * b + 64, s * 4.0 ** -b) for b in opts] for n, s in layers.items()},
                 {n: 1000 for n in layers}, {n: (10, 100) for n in layers}, {"menu": "rtn"})


def test_allocate_hits_budget_and_favours_sensitive_layers():
    from llmpress.sweep.mixed import allocate, recipe_for

    table = _table({"a": 100.0, "b": 1.0})  # a is 100× more sensitive
    choice, unit = allocate(table, 4.0 * 2000)
    assert unit == int(1e-3 * 4.0 * 2000 / 2)
    assert sum(c.bits for c in choice.values()) <= 4.0 * 2000
    assert choice["a"].option.params["bits"] > choice["b"].option.params["bits"]
    r = recipe_for(choice)
    assert r.rule_for("a").params == {"bits": choice["a"].option.params["bits"], "group_size": 64}
    assert r.rule_for("lm_head").method == "keep" and r.rule_for("ab") is None
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(table, 1.0 * 2000)
    # the table survives its JSON cache
    from llmpress.sweep.sensitivity import Table

    back = Table.from_json(table.to_json())
    assert back.layers == table.layers and back.shapes == table.shapes


def test_sweep_mixed_points_share_one_measurement(tiny_llama_dir, tmp_path, monkeypatch):
    from llmpress.sweep import sensitivity
    from llmpress.sweep.driver import limit, read_results
    from llmpress.sweep.points import mixed

    calls = []
    real = sensitivity.measure
    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    limit(str(tiny_llama_dir), tmp_path, points=[mixed(3.0, "rtn"), mixed(5.0, "rtn")], ctx=64, tokens=256,
          samples=2, seq_len=32, threads=1)
    rows = {r["label"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert len(calls) == 1 and len(list((tmp_path / "sensitivity").glob("*-rtn.json"))) == 1
    lo, hi = rows["mixed-rtn-3bpw"], rows["mixed-rtn-5bpw"]
    assert lo["bpw"] <= 3.0 and hi["bpw"] <= 5.0 and lo["bpw"] < hi["bpw"]
    assert hi["allocation"]["predicted_dkl"] < lo["allocation"]["predicted_dkl"]
    assert "--target-bpw 3" in lo["command"]


def test_fisher_proxy_predicts_the_true_kl_of_one_layer(tmp_path):
    """½ Σ f_i ΔW_i H ΔW_iᵀ against the measured KL with that layer alone quantized: within a factor
    of 2 on every (layer, width), over three orders of magnitude."""
    import torch

    from llmpress import skeleton as sk
    from llmpress.models import load_model, load_tokenizer
    from llmpress.pipeline import _calib_text, calib_ids, collect_stats
    from llmpress.sweep.fisher import fisher_weights
    from llmpress.sweep.sensitivity import log_probs, measured_dkl, predicted_dkl
    from llmpress.tensor import get_codec
    from test_export_gguf import _small_model

    p = _small_model(tmp_path / "m", "llama", hidden_size=128, intermediate_size=256)
    ids = calib_ids(load_tokenizer(str(p)), _calib_text(None), 8, 64)
    m = load_model(str(p)).eval()
    f = fisher_weights(str(p), ids)
    st = collect_stats(str(p), samples=8, seq_len=64, progress=False)
    ref = log_probs(m, ids)
    rtn = get_codec("rtn")
    pairs = []
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        w = sk.linear_weight(sk.get_module(m, name))
        for b in (2, 4):
            wh = rtn.decode(rtn.encode(w, None, bits=b, group_size=64))
            pairs.append((predicted_dkl(w, wh, st[name].gram, st[name].n, f[name]), measured_dkl(m, ids, {name: wh}, ref=ref)))
    assert all(0.5 < p / t < 2 for p, t in pairs), pairs
    assert max(t for _, t in pairs) > 1000 * min(t for _, t in pairs)
    assert torch.equal(torch.tensor([p for p, _ in pairs]).argsort(), torch.tensor([t for _, t in pairs]).argsort())


def test_target_bytes_of_a_folder_and_refusals(tiny_llama_dir, tmp_path):
    from llmpress.cli import _load_commands, app

    _load_commands()
    runner = CliRunner()
    out = tmp_path / "o"
    bad = [
        (["--target-bpw", "3", "--recipe", "x.yaml"], "exactly one"),
        (["--target-bpw", "3", "--menu", "nope"], "unknown menu"),
        (["--target-bpw", "3", "--method", "awq"], "a method applies"),
        (["--target-bpw", "0.5", "--menu", "rtn"], "below the cheapest"),
    ]
    for extra, msg in bad:
        r = runner.invoke(app, ["compress", str(tiny_llama_dir), "-o", str(out), *extra, *FAST])
        assert r.exit_code != 0 and msg in r.output, r.output
        assert not out.exists()
    from llmpress.models import TensorStore, resolve

    store = TensorStore(resolve(str(tiny_llama_dir)))
    kept = sum(t.numel() * t.element_size() for k, t in store.items() if "proj" not in k)
    lin = sum(t.numel() for k, t in store.items() if "proj" in k)
    target = kept + int(lin * 4.2 / 8)
    r = runner.invoke(app, ["compress", str(tiny_llama_dir), "-o", str(out), "--menu", "rtn", "--target-bytes", str(target),
                            "--json", *FAST])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["allocation"]["fixed_bytes"] == kept and res["allocation"]["predicted_bytes"] <= target
    assert 3.9 < res["bpw"] <= 4.2 + 1e-9
    from llmpress.recipe import Recipe

    assert Recipe.from_yaml(out / "recipe.yaml").to_dict() == res["recipe"]
    r = runner.invoke(app, ["compress", str(tiny_llama_dir), "-o", str(out), "--target-bpw", "4", *FAST])
    assert r.exit_code != 0 and "exists" in r.output  # refused before any measurement


def test_limit_refuses_an_unknown_menu_before_any_point(tiny_llama_dir, tmp_path):
    from llmpress.sweep.driver import limit

    with pytest.raises(ValueError, match="unknown menu"):
        limit(str(tiny_llama_dir), tmp_path, mixed_bpw=3.0, mixed_menu="nope", search=False)
    assert not (tmp_path / "results.jsonl").exists()
    assert [o.label for o in options_for("gptq-quick", (64, 64))] == ["gptq-w2-g64", "gptq-w3-g64", "gptq-w4-g64", "rtn-w8-g128"]


# --------------------------------------------------------------------------- the mixed-method menu
def test_best_menu_offers_every_method_and_awq_unfolded():
    opts = options_for("best", (64, 256))
    assert {o.method for o in opts} == {"gptq", "awq", "awq+gptq", "rtn"}
    assert {o.params["bits"] for o in opts} == {2, 3, 4, 5, 6, 8}
    assert {o.params["group_size"] for o in opts} == {64, 128}
    assert len({o.label for o in opts}) == len(opts)  # the summary counts options by label
    # AWQ's options are per layer: the scale searched and stored with the layer, never folded
    assert all(o.params["fold"] is False for o in opts if o.method.startswith("awq"))
    assert all(o.params["fold"] is False for o in options_for("awq", (64, 256)) if o.method == "awq")
    quick = options_for("best-quick", (64, 256))
    assert {o.method for o in quick} == {"gptq", "awq+gptq", "rtn"} and set(quick) <= set(opts)


def test_best_menu_allocation_writes_what_it_measured(tiny_llama_dir, tmp_path):
    """compress --target-bpw --menu best: the layers mix methods, and each layer's stored bits are
    the bits the sensitivity table gave its option (an AWQ layer keeps its own scale, unfolded)."""
    from llmpress.recipe import Recipe
    from llmpress.sweep.mixed import allocate
    from llmpress.sweep.sensitivity import Table, load_or_measure

    kw = dict(samples=4, seq_len=32)
    cache = tmp_path / "best.json"
    table = load_or_measure(cache, str(tiny_llama_dir), "best", **kw, progress=False)
    n = sum(table.numel.values())
    # a mixed-method allocation is never worse (predicted) than one method's alone at the same budget
    for target in (3.0, 4.0):
        best = sum(c.dkl for c in allocate(table, target * n)[0].values())
        for m in ("gptq", "awq"):
            one = Table({k: [c for c in cs if c.option.method in (m, "rtn")] for k, cs in table.layers.items()},
                        table.numel, table.shapes, table.meta)
            assert best <= sum(c.dkl for c in allocate(one, target * n)[0].values()) + 1e-12
    # the measured ΔKL orders an option's widths: more bits, less error (per method and group)
    for cs in table.layers.values():
        for m in ("gptq", "awq", "awq+gptq"):
            d = [c.dkl for c in cs if c.option.method == m and c.option.params["group_size"] == 64]
            assert d == sorted(d, reverse=True), (m, d)
    from llmpress.sweep.mixed import compress_to_target

    out = tmp_path / "o"
    res = compress_to_target(str(tiny_llama_dir), out, target_bpw=4.0, menu="best", progress=False, **kw)
    a = res["allocation"]
    assert a["menu"] == "best" and a["bpw"] <= 4.0 and res["bpw"] <= 4.0 + 1e-9
    from safetensors.torch import load_file

    from llmpress.io.folder import read_manifest
    from llmpress.tensor import CompressedTensor

    recipe = Recipe.from_yaml(out / "recipe.yaml")
    tensors = load_file(str(out / "model.safetensors"))
    entries = read_manifest(out)["tensors"]
    methods = set()
    for name, cs in table.layers.items():
        rule = recipe.rule_for(name)
        c = next(c for c in cs if c.option.method == rule.method and c.option.params == rule.params)
        e = entries[f"{name}.weight"]
        ct = CompressedTensor.from_state(f"{name}.weight", tensors, json.dumps({"codec": e["codec"], **e["meta"]}))
        assert ct.nbits() == c.bits, name  # stored as measured
        assert ("in_scale" in e["keys"]) == rule.method.startswith("awq"), name
        methods.add(rule.method)
    assert len(methods) > 1, methods  # the layers chose among methods
    assert a["layer_bytes"] * 8 == sum(c.bits for c in (next(c for c in table.layers[n] if c.option.method ==
                                       recipe.rule_for(n).method and c.option.params == recipe.rule_for(n).params)
                                       for n in table.layers))
