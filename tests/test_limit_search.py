"""The near-lossless search: bisection along each ladder, lossless packing of the winner, the bound
the sweep's points give, the time allowed, and its points in the sweep's report."""
from __future__ import annotations

import time

import pytest

from llmpress.sweep import points as pts_mod
from llmpress.sweep import search
from llmpress.sweep.driver import limit, read_results
from llmpress.sweep.points import quant
from llmpress.sweep.search import Ladder, fewest_bits, near_lossless


def _fake(kl: dict[tuple[str, int, int], float], packed_saving: float = 0.4):
    """A run function over a table of KL by (method, bits, group); bpw = bits + 32/group (less
    ``packed_saving`` packed). Records the labels it was asked for."""
    asked: list[str] = []

    def run(points):
        out = []
        for p in points:
            asked.append(p.label)
            method, rest = p.label.split("-w")
            bits, g = rest.split("-g")
            group = int(g.split("+")[0])
            packed = "+pack" in p.label
            k = kl[(method, int(bits), group)]
            out.append({"label": p.label, "family": p.family, "kl_mean": k, "key": p.label,
                        "bpw": int(bits) + 32 / group - (packed_saving if packed else 0.0)})
        return out

    return run, asked


def test_bisection_finds_the_fewest_bits_in_few_runs():
    lad = Ladder("gptq", 128, (2, 3, 4, 5, 6, 8))
    kl = {("gptq", b, 128): {2: 3.0, 3: 0.4, 4: 0.08, 5: 0.02, 6: 0.006, 8: 0.001}[b] for b in lad.bits}
    run, asked = _fake(kl)
    bits, row = fewest_bits(lad, run, 0.01, time.monotonic() + 60)
    assert bits == 6 and row["label"] == "gptq-w6-g128"
    assert len(asked) <= 3  # log2(6) + 1
    run, asked = _fake(kl)
    assert fewest_bits(lad, run, 1e-4, time.monotonic() + 60) is None


def test_search_packs_the_winner_and_skips_ladders_that_cannot_win(monkeypatch):
    monkeypatch.setattr(search, "LADDERS", (Ladder("gptq", 128, (4, 5, 6, 8)), Ladder("gptq", 64, (4, 5, 6)),
                                            Ladder("rtn", 128, (6, 8))))
    kl = {("gptq", 4, 128): 0.05, ("gptq", 5, 128): 0.02, ("gptq", 6, 128): 0.005, ("gptq", 8, 128): 0.001,
          ("gptq", 4, 64): 0.04, ("gptq", 5, 64): 0.009, ("gptq", 6, 64): 0.004,
          ("rtn", 6, 128): 0.03, ("rtn", 8, 128): 0.002}
    run, asked = _fake(kl)
    known = [{"label": "rtn-w8-g128", "family": "rtn", "kl_mean": 0.002, "bpw": 8.25, "key": "k"}]
    rows = near_lossless(run, 0.01, 60, known)
    labels = [r["label"] for r in rows]
    assert labels == ["gptq-w6-g128", "gptq-w6-g128+pack", "gptq-w5-g64", "gptq-w5-g64+pack"]
    assert min(rows, key=lambda r: r["bpw"])["label"] == "gptq-w5-g64+pack"
    assert not any(a.startswith("rtn") for a in asked)  # 6 bits raw ≥ the best found (5.1): skipped


def test_search_stops_when_time_is_up(monkeypatch):
    run, asked = _fake({("gptq", b, 128): 0.5 for b in (4, 5, 6, 8)})
    assert near_lossless(run, 0.01, 0.0, []) == [] and asked == []


def test_limit_runs_the_search_and_recommends_its_point(tiny_llama_dir, tmp_path, monkeypatch):
    """On a tiny model with a one-point budget (RTN 8-bit g32), the search along an RTN ladder finds
    a smaller point within the threshold; it and its packed form join the results and the report."""
    monkeypatch.setitem(pts_mod.BUDGETS, "quick", lambda: [quant("rtn", 8, 32)])
    monkeypatch.setattr(search, "LADDERS", (Ladder("rtn", 32, (4, 5, 6)),))
    s = limit(str(tiny_llama_dir), tmp_path, ctx=64, tokens=256, samples=2, seq_len=32, threads=1, mixed_bpw=None,
              max_kl=0.05)
    rows = {r["label"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert "rtn-w8-g32" in rows and len(rows) >= 3
    found = [r for lbl, r in rows.items() if lbl.startswith("rtn-w") and "+pack" in lbl]
    assert len(found) == 1
    rec = s["recommendation"]
    assert rec["kl_mean"] <= 0.05 and rec["bpw"] < rows["rtn-w8-g32"]["bpw"]
    assert rec["label"] == min((r for r in rows.values() if r["kl_mean"] <= 0.05), key=lambda r: r["bpw"])["label"]
    assert rec["label"] in (tmp_path / "report.md").read_text()
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
