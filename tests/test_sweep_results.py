"""results.jsonl after a crash and shared between models: torn lines skipped, never mixed."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmpress.sweep import runner
from llmpress.sweep.driver import _append, limit, read_results
from llmpress.sweep.points import quant

FAST = dict(ctx=64, tokens=256, samples=2, seq_len=32, threads=1, mixed_bpw=None)


def test_rows_that_are_not_rows_are_skipped(tmp_path, caplog):
    p = tmp_path / "results.jsonl"
    p.write_text("\n".join([json.dumps({"key": "a"}), "null", "[1, 2]", "5", '"x"', "", json.dumps({"key": "b"})]) + "\n")
    assert [r["key"] for r in read_results(p)] == ["a", "b"]
    assert "torn line" in caplog.text


def test_a_row_appended_after_a_torn_line_is_kept(tmp_path):
    """A crash mid-write leaves a line without its newline; the next row must not be glued to it."""
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "lab')
    _append(p, {"key": "c"})
    _append(p, {"key": "d"})
    assert [r["key"] for r in read_results(p)] == ["a", "c", "d"]


def test_another_models_rows_are_never_mixed_in(tiny_llama_dir, tmp_path, monkeypatch):
    """Model B's sweep resumes in model A's report folder: B computes its own point, and its summary,
    report and CLI table hold B's row only, though A's row has the same label."""
    from llmpress.cli.limit import shown_rows

    b_dir = tmp_path / "b"
    shutil.copytree(tiny_llama_dir, b_dir)
    from safetensors.torch import load_file, save_file

    f = next(b_dir.glob("*.safetensors"))
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(5)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(f), metadata={"format": "pt"})

    pts = [quant("rtn", 3, 32)]
    out = tmp_path / "report"
    sa = limit(str(tiny_llama_dir), out, points=pts, **FAST)
    calls = []
    real = runner.run_point
    monkeypatch.setattr(runner, "run_point", lambda p, st: calls.append(p.label) or real(p, st))
    sb = limit(str(b_dir), out, points=pts, **FAST)
    assert calls == ["rtn-w3-g32"]  # B's point is B's, not A's cached row
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 2 and rows[0]["label"] == rows[1]["label"] and rows[0]["key"] != rows[1]["key"]
    a_row, b_row = rows
    assert sa["keys"] == [a_row["key"]] and sb["keys"] == [b_row["key"]]
    assert a_row["kl_mean"] != b_row["kl_mean"]
    assert shown_rows(sb) == [b_row] and shown_rows(sa) == [a_row]
    md = (out / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| rtn-w3-g32"))
    kl = float(line.strip("|").split("|")[2])
    assert kl == pytest.approx(b_row["kl_mean"], rel=1e-3, abs=1e-12)


def _row(label: str, bpw: float, kl: float, proto: str) -> dict:
    return {"label": label, "family": "rtn", "bpw": bpw, "kl_mean": kl, "ppl": 10 + kl, "protocol_label": proto}


def _summary(rows: list[dict]) -> dict:
    return {"frontier": [r["label"] for r in rows], "model": "m", "budget": "custom", "max_kl": 0.01,
            "near_lossless_kl": None, "near_lossless_ppl": None, "knee": None, "knee_method": "-", "protocol": {}}


def test_report_names_the_protocol_and_reads_nothing_of_the_working_directory(tmp_path, monkeypatch):
    """One protocol: in the title. Two: a column, never two figures side by side unlabelled. A
    bench's output lying in the working directory (peer points) is not the user's frontier."""
    from llmpress.sweep.report import write_report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench" / "out").mkdir(parents=True)
    (tmp_path / "bench" / "out" / "quant.json").write_text("not json")  # read, it would fail loudly below
    rows = [_row("a", 3.0, 0.5, "t 8×64 #aaaa"), _row("b", 4.0, 0.1, "t 8×64 #aaaa")]
    write_report(tmp_path / "one", rows, _summary(rows))
    md = (tmp_path / "one" / "report.md").read_text().splitlines()
    assert md[0] == "# Compression limit · protocol `t 8×64 #aaaa`"
    assert "protocol" not in next(l for l in md if l.startswith("| point"))
    rows[1]["protocol_label"] = "t 16×64 #bbbb"
    write_report(tmp_path / "two", rows, _summary(rows))
    md = (tmp_path / "two" / "report.md").read_text().splitlines()
    assert "several protocols" in md[0]
    assert next(l for l in md if l.startswith("| point")).endswith("| protocol |")
    assert next(l for l in md if l.startswith("| b ")).endswith("| `t 16×64 #bbbb` |")
