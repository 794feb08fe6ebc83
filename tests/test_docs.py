"""The generated docs: docs/CLI.md is what scripts/cli_docs.py writes from the commands' own help."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cli_md_is_not_stale():
    text = _script("cli_docs").render()
    assert (REPO / "docs" / "CLI.md").read_text() == text, "docs/CLI.md is stale: run `make docs`"
    for name in ("limit", "pack", "quantize", "eval", "export"):  # every command has its section
        assert f"## `llmpress {name}`" in text


def test_benchmarks_md_shows_every_figure_with_its_provenance(tmp_path):
    """Made from bench outputs alone: a recorded row carries its command, commit and date; a row
    from before the benches recorded them says so; a bench with no output is listed with its command."""
    md = _script("benchmarks_md")
    out = tmp_path / "out"
    (out / "frontier").mkdir(parents=True)
    proto = {"model": "m", "samples": 4, "seq_len": 64, "ctx": 64, "tokens": 128, "texts": ["a", "b"]}
    rec = {"command": "python bench/frontier.py --samples 4", "commit": "abc1234", "date": "2026-12-07T10:00:00+00:00"}
    rows = {json.dumps({"label": "gptq-w3-g64", **proto}, sort_keys=True):
            {**rec, "label": "gptq-w3-g64", "bpw": 3.5, "kl:a": 0.5, "kl:b": 0.25, "kl": 0.375, "seconds": 10.0,
             "peak_rss_bytes": 2**30, "alloc": None},
            json.dumps({"label": "gptq-w4-g64", **proto}, sort_keys=True):
            {"label": "gptq-w4-g64", "bpw": 4.5, "kl:a": 0.2, "kl:b": 0.1, "kl": 0.15, "seconds": 9.0,
             "peak_rss_bytes": 2**30, "alloc": None}}
    (out / "frontier" / "results.json").write_text(json.dumps(rows))
    (out / "lossless.json").write_text(json.dumps({**rec, "command": "python bench/lossless.py --reps 3", "cpus": 2, "reps": 3,
                                                   "rows": [{"file": "BF16", "tool": "zstd -3", "threads": 1, "bytes_in": 100,
                                                             "bytes_out": 78, "ratio": 0.78, "enc_MBps": 50.0,
                                                             "dec_MBps": 500.0, "dec_sha_MBps": None}]}))
    (out / "limit").mkdir()
    (out / "limit" / "results.jsonl").write_text(
        json.dumps({"label": "rtn-w4-g64", "bpw": 4.5, "kl_mean": 0.25, "top1": 0.8, "ppl": 20.0,
                    "protocol_label": "a+b 8×64 #abcd"}) + "\n" + '{"label": "torn')
    text = md.render(out)
    assert "| `rtn-w4-g64` | 4.500 | 0.25 | 0.8000 | 20.000 | `a+b 8×64 #abcd` |" in text
    line = next(l for l in text.splitlines() if l.startswith("| `gptq-w3-g64`"))
    assert "0.3750" in line and "`abc1234` 2026-12-07T10:00" in line
    assert next(l for l in text.splitlines() if l.startswith("| `gptq-w4-g64`")).endswith("| not recorded |")
    assert "- command: `python bench/frontier.py --samples 4`" in text
    assert "- command: `python bench/lossless.py --reps 3`" in text and "| BF16 | zstd -3 | 1 | 100 | 0.78000 |" in text
    missing = text.split("## Not yet recorded", 1)[1]
    assert "bench/quant.py" in missing and "bench/lossless.py --reps 5" not in missing


def test_readme_results_table_is_replaced_between_its_markers(tmp_path):
    md = _script("benchmarks_md")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{md.BEGIN} (made by a script) -->\nold\n{md.END}\n\nafter\n")
    assert md.update_readme(readme, ["| a |", "|---|"])
    assert md.update_readme(readme, ["| a |", "|---|"])  # twice: the same text
    assert readme.read_text() == f"# x\n\n{md.BEGIN} (made by a script) -->\n| a |\n|---|\n{md.END}\n\nafter\n"
    text = (REPO / "README.md").read_text()
    assert md.BEGIN in text and md.END in text


def test_readme_test_command_is_what_ci_runs():
    ci = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"]
    assert "\nmake test " in (REPO / "README.md").read_text()


def test_benchmarks_md_rotation_seeds_and_startup_files(tmp_path):
    """A rotate table over several seeds shows each seed's KL and its ratio to the unrotated row of the same
    case and options; startup's per-file unpack rows are set against the first file's seconds per MB."""
    md = _script("benchmarks_md")
    out = tmp_path / "out"
    out.mkdir()
    rec = {"command": "python bench/rotate.py --seed 0,1", "commit": "abc1234", "date": "2026-12-08"}
    (out / "rotate-table-h16mse2-rangemse2-seed0_1_2.json").write_text(json.dumps({
        **rec, "protocol": "p", "seeds": [0, 1], "kind": "auto", "options": {"range": "mse2"},
        "rows": {"c|range=mse2|none": {"bpw": 2.5, "kl": {"a": 2.0}, "kl_mean": 2.0, "ratio_to_unrotated": 1.0,
                                       "per_seed": {"0": 2.0}},
                 "c|range=mse2|rot": {"bpw": 2.5, "kl": {"a": 1.5}, "kl_mean": 1.5, "ratio_to_unrotated": 0.75,
                                      "per_seed": {"0": 1.2, "1": 1.8}}}}))
    (out / "startup.json").write_text(json.dumps({
        **rec, "command": "python bench/startup.py --files A,B", "reps": 3, "median_s": {}, "ratio_to_zipnn": {},
        "unpack_files": {"A": {"bytes": 1_000_000, "median_s": 0.5, "mb_s": 2.0, "s_per_mb": 0.5, "restored": True},
                         "B": {"bytes": 2_000_000, "median_s": 0.6, "mb_s": 3.33, "s_per_mb": 0.3, "restored": True}}}))
    text = md.render(out)
    assert "| c | rot | 2.500 | 1.5000 | 1.5000 | 0.750 | 0: 1.2000 (0.600), 1: 1.8000 (0.900) |" in text
    assert "rotation seeds 0, 1" in text
    assert "| B | 2,000,000 | 0.600 | 3 | 0.60 | True |" in text


def test_benchmarks_md_frontier_menus_and_new_renderers(tmp_path):
    """frontier rows without a point (a sensitivity table, a target the menu cannot reach) do not break the page;
    each menu's mixed point stands beside the best uniform point at equal or lower bpw; the rotate and delta
    renderers show their rows."""
    md = _script("benchmarks_md")
    out = tmp_path / "out"
    (out / "frontier").mkdir(parents=True)
    proto = {"model": "m", "samples": 4, "seq_len": 64, "ctx": 64, "tokens": 128, "texts": ["a"]}
    rec = {"command": "python bench/frontier.py --menus best-quick", "commit": "abc1234", "date": "2026-12-07T10:00:00+00:00"}
    rows = {"gptq-w3-g64": {"bpw": 3.5, "kl": 0.4, "kl:a": 0.4},
            "gptq-w2-g64": {"bpw": 2.5, "kl": 2.0, "kl:a": 2.0},
            "awq-w3-g64": {**rec, "bpw": 3.5, "kl": 0.5, "kl:a": 0.5},
            "mixed-best-quick-4": {**rec, "bpw": 3.99, "kl": 0.2, "kl:a": 0.2, "alloc": {"predicted_dkl": 0.1}},
            "mixed-best-quick-2.5": {**rec, "infeasible": "below the menu's cheapest", "seconds": 0.1},
            "sensitivity-best-quick": {**rec, "options": 12, "seconds": 30.0, "peak_rss_bytes": None}}
    (out / "frontier" / "results.json").write_text(json.dumps(
        {json.dumps({"label": k, **proto}, sort_keys=True): {"label": k, **v} for k, v in rows.items()}))
    rot = {"command": "python bench/rotate.py", "commit": "abc1234", "date": "2026-12-07", "protocol": "p", "seed": 0,
           "rows": {"c|none": {"bpw": 3.5, "kl": {"a": 0.5}, "kl_mean": 0.5, "ratio_to_unrotated": 1.0, "seconds": 9.0},
                    "c|keep": {"bpw": 3.5, "kl": {"a": 0.4}, "kl_mean": 0.4, "ratio_to_unrotated": 0.8, "seconds": 9.0}}}
    (out / "rotate-table.json").write_text(json.dumps(rot))
    (out / "rotate-floor-h16rot.json").write_text(json.dumps({
        **rec, "command": "python bench/rotate_floor.py", "model": "m", "linears": 7, "every": 6, "seed": 0,
        "shape": {"unrotated": {"excess_kurtosis": 2.4, "group64_max_over_rms": 2.75}},
        "rows": [{"bits": 3, "group_size": -1, "rel_err": {"unrotated": 0.04, "rotated": 0.03, "gaussian": 0.031},
                  "rotated_over_unrotated": 0.75, "gaussian_over_unrotated": 0.775}]}))
    (out / "delta.json").write_text(json.dumps({**rec, "command": "python bench/delta.py", "threads": 2, "rows": [
        {"case": "ft", "bytes_in": 100, "alone_bytes": 60, "alone_ratio": 0.6, "delta_bytes": 10, "delta_ratio": 0.1,
         "x_smaller": 6.0, "share": {"alone": 0.0, "xor": 0.25, "diff": 0.75}, "decode_vs_plain": 0.5}]}))
    text = md.render(out)
    assert "| 4 | 3.990, 0.2000 (0.50 ✓) vs `gptq-w3-g64` |" in text
    assert "| 2.5 | not reachable |" in text and "below the menu's cheapest" in text
    assert "| `best-quick` | 12 | 30 | — | `abc1234`" in text
    assert "| c | keep | 3.500 | 0.4000 | 0.4000 | 0.800 |" in text
    assert "| unrotated | 2.40 | 2.75 |" in text and "| 3 | per channel | 0.04000 | 0.03000 | 0.03100 | 0.750 | 0.775 |" in text
    assert "| ft | 100 | 60 | 0.6000 | 10 | 0.1000 | 6.00 |" in text and "0% / 25% / 75%" in text
    assert "--menus best-quick" not in text.split("rows marked", 1)[1].split("\n", 1)[0]  # the rerun line: old rows only


def test_benchmarks_md_rotate_learned_rows(tmp_path):
    """bench/rotate_learned.py's table: every row with its KL, ratio, the learning's objective before → after,
    and the command and commit that made it."""
    md = _script("benchmarks_md")
    rec = {"command": "python bench/rotate_learned.py --bits 3", "commit": "abc1234", "date": "2026-12-07T10:00:00+00:00"}
    rows = {"none": {**rec, "kl": {"a": 0.5}, "kl_mean": 0.5, "ratio_to_unrotated": 1.0, "seconds": 10.0, "learning": None},
            "learned (dyn, tb3)": {**rec, "commit": "def5678", "kl": {"a": 0.4}, "kl_mean": 0.4, "ratio_to_unrotated": 0.8,
                                   "seconds": 12.0, "learning": {"start": 5.0, "end": 1.25, "seconds": 500.0}}}
    path = tmp_path / "rotate-learned-x-table-gptq3-g64.json"
    lines = md.rotate_learned(path, {**rec, "protocol": "m|s8", "case": "gptq3-g64", "rows": rows})
    text = "\n".join(lines)
    assert "| gptq3-g64 | learned (dyn, tb3) | 0.4000 | 0.4000 | 0.800 | 5.0000 → 1.2500 | 500 | 12 |" in text
    assert "| gptq3-g64 | none | 0.5000 | 0.5000 | 1.000 | — | — | 10 |" in text
    assert "- learned (dyn, tb3): `python bench/rotate_learned.py --bits 3` at `def5678`" in text
