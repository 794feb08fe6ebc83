"""The near-lossless search: bisection along each ladder, lossless packing of the winner, the bound
the sweep's points give, the time allowed, and its points in the sweep's report."""
from __future__ import annotations

import pytest

from llmpress.sweep import points as pts_mod
from llmpress.sweep import search
from llmpress.sweep.driver import limit, read_results, summarize
from llmpress.sweep.frontier import pareto
from llmpress.sweep.points import quant
from llmpress.sweep.search import PACK_FLOOR, Mixed, Uniform, near_lossless


def _fake(kl, saving: float = 0.4):
    """A run function over ``kl(kind, x)``: kind a uniform ladder's (method, group) with x its
    bits, or "mixed" with x the target; bpw = bits + 32/group or the target (less ``saving``
    packed). Records the labels it was asked for."""
    asked: list[str] = []

    def run(points):
        out = []
        for p in points:
            asked.append(p.label)
            packed = p.label.endswith("+pack")
            if "target_bpw" in p.params:
                kind, x = "mixed", p.params["target_bpw"]
                bpw = x
            else:
                method, rest = p.label.removesuffix("+pack").split("-w")
                bits, g = rest.split("-g")
                kind, x = (method, int(g)), int(bits)
                bpw = x + 32 / int(g)
            out.append({"label": p.label, "family": p.family, "kl_mean": kl(kind, x), "key": p.label,
                        "bpw": bpw - (saving if packed else 0.0)})
        return out

    return run, asked


def _table(t):
    return lambda kind, x: t[(kind, x)]


G128 = Uniform("gptq", 128, (2, 3, 4, 5, 6, 8))
STEEP = {2: 3.0, 3: 0.4, 4: 0.08, 5: 0.02, 6: 0.006, 8: 0.001}


def test_bisection_runs_packed_rungs_and_finds_the_first_in_few_runs():
    run, asked = _fake(_table({(("gptq", 128), b): STEEP[b] for b in STEEP}))
    out = near_lossless(run, 0.01, 60, [], ladders=(G128,))
    assert out["best"]["label"] == "gptq-w6-g128+pack" and out["complete"]
    assert len(asked) <= 3 and all(a.endswith("+pack") for a in asked)  # log2(6) + 1, every one packed
    assert [r["label"] for r in out["rows"]] == asked  # every point it ran is reported, misses too
    run, asked = _fake(_table({(("gptq", 128), b): STEEP[b] for b in STEEP}))
    assert near_lossless(run, 1e-4, 60, [], ladders=(G128,))["best"] is None


def test_a_plain_row_the_sweep_has_decides_a_miss_without_a_run():
    run, asked = _fake(_table({(("gptq", 128), b): STEEP[b] for b in STEEP}))
    known = [{"label": "gptq-w4-g128", "family": "gptq", "kl_mean": 0.08, "bpw": 4.25, "key": "k4"},
             {"label": "gptq-w6-g128", "family": "gptq", "kl_mean": 0.006, "bpw": 6.25, "key": "k6"}]
    out = near_lossless(run, 0.01, 60, known, ladders=(G128,))
    assert "gptq-w4-g128+pack" not in asked  # its plain row missed: decided without a run
    assert "gptq-w6-g128+pack" in asked  # its plain row met it: the packed one is what it costs
    assert out["best"]["label"] == "gptq-w6-g128+pack"


def test_rungs_that_cannot_win_are_not_run_and_a_smaller_mixed_point_wins():
    t = {(("gptq", 128), b): {4: 0.05, 5: 0.02, 6: 0.012, 8: 0.001}[b] for b in (4, 5, 6, 8)}
    t.update({("mixed", x): 0.03 if x < 5.5 else 0.008 for x in (5.0, 5.25, 5.5, 5.75, 6.0, 6.25, 6.5)})
    t.update({(("rtn", 128), b): {6: 0.03, 8: 0.002}[b] for b in (6, 8)})
    ladders = (Uniform("gptq", 128, (4, 5, 6, 8)), Mixed("m", (5.0, 5.25, 5.5, 5.75, 6.0, 6.25, 6.5)),
               Uniform("rtn", 128, (6, 8)))
    run, asked = _fake(_table(t))
    out = near_lossless(run, 0.01, 60, [], ladders=ladders)
    assert out["best"]["label"] == "mixed-m-5.5bpw+pack" and out["best"]["bpw"] == 5.5 - 0.4
    # the RTN rungs (6.25 and 8.25 bpw before packing) cannot beat 5.1 even packed: never run
    assert not any(a.startswith("rtn") for a in asked)
    assert any(s.startswith("rtn g128: cannot beat") for s in out["skipped"])
    # the mixed rungs tried all lay below the bound of the uniform winner, over PACK_FLOOR
    mixed_asked = [float(a.split("-")[2].removesuffix("bpw+pack")) for a in asked if a.startswith("mixed")]
    assert mixed_asked and all(x * PACK_FLOOR < 8.25 - 0.4 for x in mixed_asked)


def test_time_up_before_a_ladder_is_reported():
    run, asked = _fake(lambda kind, x: 0.5)
    out = near_lossless(run, 0.01, 0.0, [], ladders=(G128,))
    assert out["rows"] == [] and asked == [] and not out["complete"]
    assert len(out["skipped"]) == 1 and out["skipped"][0].startswith("gptq g128: time is up")


def _timed(run, seconds):
    """``run`` whose rows say each point took ``seconds(label)`` CPU seconds."""
    def timed(points):
        return [{**r, "cpu_seconds": seconds(r["label"])} for r in run(points)]

    return timed


def test_a_bisection_cut_by_the_allowance_keeps_what_it_found():
    inner, asked = _fake(_table({(("gptq", 128), b): STEEP[b] for b in STEEP}))
    out = near_lossless(_timed(inner, lambda _: 40.0), 0.01, 100, [], ladders=(G128,))
    # 4 bits (miss) and 6 bits (meets it) fit; a third run, predicted at the 40 s the others took,
    # would end past the 100 s allowance: not started
    assert len(asked) == 2 and not out["complete"] and out["seconds"] == 80.0
    assert out["best"]["label"] == "gptq-w6-g128+pack"


def test_a_rung_predicted_to_overrun_is_never_started():
    """The sweep measured GPTQ at 200 s a point (260 s packed, by PACK_SHARE): with 150 s allowed no GPTQ rung starts (the first
    run of a ladder is predicted too, not only the ones after it), while a cheap RTN ladder runs."""
    known = [{"label": "gptq-w3-g64", "family": "gptq", "kl_mean": 0.5, "bpw": 3.5, "key": "g", "cpu_seconds": 200.0,
              "calib": True},
             {"label": "rtn-w4-g64", "family": "rtn", "kl_mean": 0.2, "bpw": 4.5, "key": "r", "cpu_seconds": 20.0,
              "calib": False}]
    inner, asked = _fake(_table({**{(("gptq", 128), b): STEEP[b] for b in STEEP},
                                 **{(("rtn", 128), b): STEEP[b] * 2 for b in STEEP}}))
    out = near_lossless(_timed(inner, lambda lbl: 200.0 if lbl.startswith("gptq") else 25.0), 0.01, 150, known,
                        ladders=(G128, Uniform("rtn", 128, (4, 5, 6, 8))))
    assert not any(a.startswith("gptq") for a in asked) and asked  # RTN's rungs ran, GPTQ's never started
    assert out["skipped"][0].startswith("gptq g128: time is up (a rung is predicted at 260 s, 150 s left)")
    assert out["seconds"] <= 150 and not out["complete"]
    assert out["best"]["label"] == "rtn-w8-g128+pack"


def test_the_estimate_learns_from_the_sweeps_rows():
    from llmpress.sweep.points import mixed_pack, quant_pack
    from llmpress.sweep.search import PROXY, Estimate

    e = Estimate()
    assert e.seconds(quant_pack("gptq", 6, 128, calib=True)) == 0.0  # nothing measured yet: nothing to go by
    for r in ({"label": "rtn-w3-g64", "family": "rtn", "cpu_seconds": 10.0, "calib": False},
              {"label": "rtn-w3-g64+pack", "family": "rtn+pack", "cpu_seconds": 16.0, "calib": False},
              {"label": "gptq-w3-g64", "family": "gptq", "cpu_seconds": 60.0, "calib": True},
              {"label": "mixed-gptq-quick-4bpw", "family": "mixed", "cpu_seconds": 120.0, "calib": True},
              {"label": "lossless", "family": "lossless", "cpu_seconds": 999.0}):
        e.add(r)
    assert e.pack_extra() == 6.0  # what packing added to the point measured both ways
    assert e.seconds(quant_pack("rtn", 8, 128)) == 16.0  # a packed row of the family
    assert e.seconds(quant_pack("gptq", 6, 128, calib=True)) == 66.0  # plain GPTQ + packing
    name, scale = PROXY["awq+gptq"]
    assert name == "gptq" and e.seconds(quant_pack("awq+gptq", 6, 128, calib=True)) == 60.0 * scale + 6.0
    assert e.seconds(mixed_pack(5.0, "near-lossless")) == 126.0
    e.add({"label": "gptq-w6-g128+pack", "family": "gptq+pack", "cpu_seconds": 90.0, "calib": True})
    assert e.seconds(quant_pack("gptq", 5, 128, calib=True)) == 90.0  # measured packed: that row


def test_the_recommendation_is_on_the_frontier_even_at_equal_bits():
    rows = [{"label": "a", "family": "gptq", "bpw": 6.0, "kl_mean": 0.009, "command": "x"},
            {"label": "b", "family": "gptq", "bpw": 6.0, "kl_mean": 0.004, "command": "x"},
            {"label": "c", "family": "rtn", "bpw": 8.0, "kl_mean": 0.001, "command": "x"}]
    s = summarize(rows, 0.01)
    assert s["recommendation"]["label"] == "b" and "b" in {r["label"] for r in pareto(rows)}


def test_limit_runs_the_search_and_recommends_its_point(tiny_llama_dir, tmp_path, monkeypatch):
    """On a tiny model with a one-point budget (RTN 8-bit g32), the search along an RTN ladder finds
    a smaller point within the threshold; it and its packed form join the results and the report."""
    monkeypatch.setitem(pts_mod.BUDGETS, "quick", lambda: [quant("rtn", 8, 32)])
    monkeypatch.setitem(search.BUDGET_LADDERS, "quick", (Uniform("rtn", 32, (4, 5, 6)),))
    s = limit(str(tiny_llama_dir), tmp_path, ctx=64, tokens=256, samples=2, seq_len=32, threads=1, mixed_bpw=None,
              max_kl=0.05)
    rows = {r["label"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert "rtn-w8-g32" in rows and len(rows) >= 3
    found = [lbl for lbl in rows if lbl.startswith("rtn-w") and "+pack" in lbl]
    assert found and sorted(s["search"]["tried"]) == sorted(found)  # every rung it ran, packed, reported
    assert all(rows[lbl]["bpw"] < rows[lbl]["bpw_unpacked"] for lbl in found)
    rec = s["recommendation"]
    assert rec["label"] in s["frontier"]
    assert rec["kl_mean"] <= 0.05 and rec["bpw"] < rows["rtn-w8-g32"]["bpw"]
    assert rec["label"] == min((r for r in rows.values() if r["kl_mean"] <= 0.05), key=lambda r: r["bpw"])["label"]
    report = (tmp_path / "report.md").read_text()
    assert rec["label"] in report and "## Near-lossless search" in report
    # a re-run reuses every row
    n = len(read_results(tmp_path / "results.jsonl"))
    limit(str(tiny_llama_dir), tmp_path, ctx=64, tokens=256, samples=2, seq_len=32, threads=1, mixed_bpw=None, max_kl=0.05)
    assert len(read_results(tmp_path / "results.jsonl")) == n


@pytest.mark.parametrize("flag", ["--no-search"])
def test_cli_has_the_switch(flag):
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["limit", "--help"])
    assert flag in r.output


def test_a_packed_points_calibration_flags_go_to_quantize():
    from llmpress.sweep.points import quant_pack
    from llmpress.sweep.runner import point_command

    settings = {"model": "m", "recipes": "r", "samples": 16, "seq_len": 512, "calib": "calib-mix"}
    cmd = point_command(quant_pack("gptq", 6, 64, calib=True), settings)
    assert cmd == ("llmpress quantize m -o gptq-w6-g64+pack --method gptq --bits 6 --group-size 64 --calib calib-mix "
                   "--samples 16 --seq-len 512 && llmpress pack gptq-w6-g64+pack -o gptq-w6-g64+pack.llmp")


def test_the_near_lossless_menu_holds_the_widths_around_the_threshold():
    from llmpress.sweep.menu import options_for

    assert [o.label for o in options_for("near-lossless", (64, 256))] == \
        ["gptq-w5-g128", "gptq-w6-g128", "rtn-w8-g128"]


def test_a_packed_mixed_point_runs_in_the_sweep(tiny_llama_dir, tmp_path):
    """The mixed ladder's rung: allocation to the target, then packed; its row holds both sizes."""
    from llmpress.sweep.points import mixed_pack

    limit(str(tiny_llama_dir), tmp_path, points=[mixed_pack(5.0, "rtn")], ctx=64, tokens=256, samples=2, seq_len=32,
          threads=1, search=False, mixed_bpw=None)
    (row,) = read_results(tmp_path / "results.jsonl")
    assert row["family"] == "mixed+pack" and row["allocation"]["bpw"] <= 5.0 + 1e-9
    assert row["bpw"] < row["bpw_unpacked"] == pytest.approx(row["allocation"]["bpw"])
    assert "--target-bpw 5" in row["command"] and "&& llmpress pack" in row["command"] and row["recipe"]


def test_a_lossless_point_below_every_lossy_one_is_the_recommendation():
    """A checkpoint dequantized from a grid packs losslessly below the lossy points that meet the
    threshold: the smallest configuration within it is then the lossless one, and the search's
    rungs must beat its size too."""
    rows = [{"label": "lossless", "family": "lossless", "bpw": 5.1, "kl_mean": 0.0, "ratio": 0.32, "command": "p"},
            {"label": "rtn-w8-g128", "family": "rtn", "bpw": 8.27, "kl_mean": 0.0015, "command": "q"},
            {"label": "rtn-w4-g64", "family": "rtn", "bpw": 4.5, "kl_mean": 0.27, "command": "r"}]
    s = summarize(rows, 0.01)
    assert s["recommendation"]["label"] == "lossless" and s["near_lossless_kl"] == "lossless"
    assert s["knee"] != "lossless"
    ran: list[str] = []

    def run(points):
        ran.extend(p.label for p in points)
        return [{"label": p.label, "family": p.family, "bpw": 9.0, "kl_mean": 0.0, "cpu_seconds": 1.0} for p in points]

    out = near_lossless(run, 0.01, 600, rows, ladders=(Uniform("rtn", 128, (6, 7, 8)),))
    assert ran == [] and out["best"]["label"] == "lossless"  # a 6-bit g128 rung cannot beat 5.1 bpw
