"""The limit sweep: frontier, knee, allocation, resume, report consistency, Ray = local."""
from __future__ import annotations

import json

import pytest

from llmpress.sweep import frontier as fr
from llmpress.sweep import runner
from llmpress.sweep.points import lossless, quant, quant_pack
from llmpress.sweep.driver import limit, read_results

FAST = dict(ctx=64, tokens=256, samples=2, seq_len=32, threads=1, mixed_bpw=None)


def test_pareto_has_no_dominated_point():
    rows = [{"label": str(i), "bpw": b, "kl_mean": k} for i, (b, k) in enumerate(
        [(2, 1.0), (3, 0.2), (3, 0.5), (4, 0.05), (4.5, 0.06), (8, 0.001), (16, 0.0), (5, 0.3)])]
    front = fr.pareto(rows)
    assert [r["label"] for r in front] == ["0", "1", "3", "5", "6"]
    for a in front:
        assert not any(b["bpw"] <= a["bpw"] and b["kl_mean"] <= a["kl_mean"] and b is not a
                       and (b["bpw"] < a["bpw"] or b["kl_mean"] < a["kl_mean"]) for b in rows)


def test_knee_of_a_sharp_bend():
    # KL falls by decades until 4 bits, then barely moves: the knee is at 4
    rows = [{"label": str(b), "bpw": b, "kl_mean": k} for b, k in [(2, 3.0), (3, 0.3), (4, 0.02), (5, 0.015), (6, 0.012), (8, 0.01)]]
    assert fr.knee(fr.pareto(rows))["label"] == "4"
    assert fr.knee(rows[:2]) is None


def test_limit_end_to_end_resume_and_report(tiny_llama_dir, tmp_path, monkeypatch):
    pts = [lossless(), quant("rtn", 8, 32), quant("rtn", 2, 32)]
    s = limit(str(tiny_llama_dir), tmp_path, points=pts, **FAST)
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 3
    ll = next(r for r in rows if r["family"] == "lossless")
    assert ll["kl_mean"] == 0.0 and ll["kl_max"] == 0.0 and ll["top1"] == 1.0  # bit-exact: KL exactly 0
    by = {r["label"]: r for r in rows}
    assert by["rtn-w2-g32"]["kl_mean"] > by["rtn-w8-g32"]["kl_mean"] > 0
    assert by["rtn-w2-g32"]["bpw"] < by["rtn-w8-g32"]["bpw"] < ll["bpw"]
    # no frontier point is dominated
    front = [by[l] for l in s["frontier"]]
    for a in front:
        assert not any(b["bpw"] < a["bpw"] and b["kl_mean"] <= a["kl_mean"] for b in rows)
    # the report's numbers are those of results.jsonl
    md = (tmp_path / "report.md").read_text()
    label = rows[0]["protocol_label"]  # every figure names its protocol: one, in the title
    assert label and all(r["protocol_label"] == label for r in rows)
    assert md.splitlines()[0] == f"# Compression limit · protocol `{label}`"
    for r in rows:
        line = next(l for l in md.splitlines() if l.startswith(f"| {r['label']}"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(r["bpw"], abs=6e-4)
        assert float(cells[2]) == pytest.approx(r["kl_mean"], rel=1e-3, abs=1e-12)
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    # every lossy point's recipe is written so the printed command reproduces it
    from llmpress.recipe import Recipe

    assert Recipe.from_yaml(tmp_path / "recipes" / "rtn-w2-g32.yaml").to_dict() == by["rtn-w2-g32"]["recipe"]

    # a re-run (as after a kill) recomputes nothing finished, only the new point
    calls = []
    real = runner.run_point
    monkeypatch.setattr(runner, "run_point", lambda p, st: calls.append(p.label) or real(p, st))
    limit(str(tiny_llama_dir), tmp_path, points=pts + [quant("rtn", 4, 32), quant_pack("rtn", 4, 32)], **FAST)
    assert calls == ["rtn-w4-g32", "rtn-w4-g32+pack"]
    rows = {r["label"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert len(rows) == 5
    # packing what remains is lossless: same fidelity, fewer bits
    plain, packed = rows["rtn-w4-g32"], rows["rtn-w4-g32+pack"]
    assert packed["kl_mean"] == plain["kl_mean"] and packed["bpw_unpacked"] == plain["bpw"]
    assert packed["bpw"] < plain["bpw"] and packed["bytes_out"] < plain["bytes_out"]
    # a changed protocol invalidates the cached rows
    calls.clear()
    limit(str(tiny_llama_dir), tmp_path, points=pts[1:2], **{**FAST, "tokens": 192})
    assert calls == ["rtn-w8-g32"]


def test_the_report_is_rewritten_as_each_point_finishes(tiny_llama_dir, tmp_path, monkeypatch):
    """A reader opening report.md / frontier.png while the sweep runs finds the points finished so
    far and that the sweep is in progress; the last write says nothing of progress."""
    pts = [quant("rtn", 8, 32), quant("rtn", 2, 32), quant("rtn", 4, 32)]
    seen = []
    real = runner.run_point

    def spy(p, st):
        md = tmp_path / "report.md"
        seen.append((md.read_text() if md.exists() else None, (tmp_path / "frontier.png").exists()))
        return real(p, st)

    monkeypatch.setattr(runner, "run_point", spy)
    limit(str(tiny_llama_dir), tmp_path, points=pts, **FAST)
    assert seen[0] == (None, False)
    for n, (md, png) in enumerate(seen[1:], 1):
        assert png and f"in progress** ({n} of 3 points)" in md
        assert sum(l.startswith("| rtn-w") for l in md.splitlines()) == n  # the rows finished so far
    md = (tmp_path / "report.md").read_text()
    assert "in progress" not in md and sum(l.startswith("| rtn-w") for l in md.splitlines()) == 3


def test_torn_last_line_is_ignored(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps({"key": "a", "label": "x"}) + "\n" + '{"key": "b", "lab')
    assert [r["key"] for r in read_results(p)] == ["a"]


@pytest.mark.slow
def test_ray_gives_the_same_results_as_local(tiny_llama_dir, tmp_path):
    pts = [quant("rtn", 3, 32), quant("rtn", 6, 32)]
    limit(str(tiny_llama_dir), tmp_path / "local", points=pts, workers=1, **FAST)
    limit(str(tiny_llama_dir), tmp_path / "ray", points=pts, workers=2, **FAST)
    a = {r["label"]: r for r in read_results(tmp_path / "local" / "results.jsonl")}
    b = {r["label"]: r for r in read_results(tmp_path / "ray" / "results.jsonl")}
    for label in a:
        for k in ("bpw", "kl_mean", "kl_max", "top1", "ppl", "bytes_out"):
            assert a[label][k] == b[label][k], (label, k)
