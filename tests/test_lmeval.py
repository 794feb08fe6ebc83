"""lm-evaluation-harness through llmpress: local tasks offline, a compressed model beside its
original, the reference column equal to the original run alone, clear errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import llmpress
import llmpress.cli
from llmpress.cli import app
from llmpress.eval.tasks import evaluate_tasks, paired_se
from llmpress.integrations.lm_eval import TaskError
from typer.testing import CliRunner

llmpress.cli._load_commands()
runner = CliRunner()
DATA = Path(__file__).parent / "data" / "lmeval"
FACTS = DATA / "facts.yaml"


def _check_scores(res: dict, reference: bool) -> None:
    assert set(res["tasks"]) == {"llmpress_facts", "llmpress_words"}
    assert set(res["tasks"]["llmpress_facts"]["metrics"]) == {"acc", "acc_norm"}
    assert set(res["tasks"]["llmpress_words"]["metrics"]) == {"exact_match,first-word"}
    for task in res["tasks"].values():
        for m in task["metrics"].values():
            sides = ("model", "reference") if reference else ("model",)
            for side in sides:
                assert 0.0 <= m[side] <= 1.0 and m[f"{side}_stderr"] is not None and m[f"{side}_stderr"] >= 0
            assert m["higher_is_better"] is True
            if reference:
                assert m["delta"] == m["model"] - m["reference"] and m["delta_se"] is not None
            else:
                assert "reference" not in m and "delta" not in m


@pytest.fixture(scope="module")
def tiny_q3(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmeval") / "q3"
    llmpress.quantize(tiny_llama_dir, out, method="rtn", bits=3, group_size=32, progress=False)
    return out


def test_quantized_copy_beside_its_original(tiny_q3, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tasks' data_files resolve against their YAML, not the working directory
    res = evaluate_tasks(str(tiny_q3), str(DATA), limit=12, threads=1)
    assert res["reference"] == str(tiny_llama_dir)  # the source the llmpress folder names
    _check_scores(res, reference=True)
    facts = res["tasks"]["llmpress_facts"]
    assert facts["n"] == 12 and facts["num_fewshot"] == 0 and facts["output_type"] == "multiple_choice"
    assert res["tasks"]["llmpress_words"]["output_type"] == "generate_until"

    alone = evaluate_tasks(str(tiny_llama_dir), [str(FACTS), str(DATA / "words.yaml")], limit=12, threads=1)
    assert alone["reference"] is None
    _check_scores(alone, reference=False)
    for name, task in res["tasks"].items():
        for key, m in task["metrics"].items():
            a = alone["tasks"][name]["metrics"][key]
            assert (m["reference"], m["reference_stderr"]) == (a["model"], a["model_stderr"])


def test_local_group_runs_from_anywhere(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    suite = tmp_path / "suite"
    shutil.copytree(DATA, suite)
    (suite / "easy.yaml").write_text("group: llmpress_easy\ntask: [llmpress_facts, llmpress_words]\n"
                                     "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the members' data files resolve against their YAML
    res = evaluate_tasks(str(tiny_llama_dir), str(suite / "easy.yaml"), limit=4, threads=1)
    assert {"llmpress_facts", "llmpress_words", "llmpress_easy"} <= set(res["tasks"])
    group = res["tasks"]["llmpress_easy"]
    assert group["group"] is True and group["metrics"]["acc"]["model"] == res["tasks"]["llmpress_facts"]["metrics"]["acc"]["model"]


def test_model_against_itself_and_few_shot_is_deterministic(tiny_llama_dir):
    from llmpress.models import load_model, load_tokenizer

    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    kw = dict(limit=6, num_fewshot=2, threads=1, seed=3)
    same = evaluate_tasks(model, str(FACTS), reference=model, tokenizer=tok, ref_tokenizer=tok, **kw)
    assert same["tasks"]["llmpress_facts"]["num_fewshot"] == 2
    for m in same["tasks"]["llmpress_facts"]["metrics"].values():
        assert m["delta"] == 0.0 and m["delta_se"] == 0.0
    assert paired_se({0: 1.0, 1: 0.0, 2: 1.0}, {0: 1.0, 1: 1.0, 2: 0.0}) == pytest.approx(1 / math.sqrt(3))
    assert paired_se({0: 1.0, 1: 0.0}, {0: 1.0, 2: 0.0}) is None  # not the same items
    again = evaluate_tasks(model, str(FACTS), tokenizer=tok, **kw)
    assert {k: v["model"] for k, v in again["tasks"]["llmpress_facts"]["metrics"].items()} == \
           {k: v["model"] for k, v in same["tasks"]["llmpress_facts"]["metrics"].items()}


def test_cli_tasks_json_and_table(tiny_q3):
    r = runner.invoke(app, ["eval", str(tiny_q3), "--tasks", f"{FACTS},{DATA / 'words.yaml'}", "--limit", "8",
                            "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1  # lm-eval's notices and bars stay off stdout
    j = json.loads(lines[0])
    _check_scores(j, reference=True)
    assert j["protocol"]["limit"] == 8 and j["protocol"]["threads"] == 1
    assert "llmpress_facts" in r.stderr and "Δ" in r.stderr and "reference" in r.stderr
    assert "Traceback" not in r.output and "Running loglikelihood" not in r.output


def test_unknown_task_and_unreachable_data_fail_clearly(tiny_q3, tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        evaluate_tasks(str(tiny_q3), str(tmp_path / "nope.yaml"))
    r = runner.invoke(app, ["eval", str(tiny_q3), "--tasks", f"{FACTS},hellaswg"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "unknown task 'hellaswg'" in r.output and "hellaswag" in r.output
    # a built-in task downloads its data set when it runs: offline (HF_HUB_OFFLINE, conftest) that fails, in one line
    r = runner.invoke(app, ["eval", str(tiny_q3), "--tasks", "arc_easy", "--limit", "2"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "task arc_easy: its data could not be loaded" in r.output and "hub" in r.output


@pytest.mark.slow
def test_smollm2_answers_easy_questions_and_2bit_forgets(smollm_dir, tmp_path):
    q2 = tmp_path / "q2"
    llmpress.quantize(smollm_dir, q2, method="rtn", bits=2, group_size=64, progress=False)
    res = evaluate_tasks(str(q2), str(FACTS), reference=str(smollm_dir), limit=24, threads=1)
    acc = res["tasks"]["llmpress_facts"]["metrics"]["acc"]
    assert acc["reference"] >= 0.5  # chance is 0.25
    assert acc["delta"] < -0.15 and acc["delta"] + 2 * acc["delta_se"] < 0
    assert math.isfinite(acc["delta_se"])


def test_lm_eval_is_imported_only_for_tasks():
    import subprocess
    import sys

    code = ("import sys, llmpress, llmpress.cli as c, llmpress.eval, llmpress.integrations.lm_eval; c._load_commands(); "
            "llmpress.evaluate_tasks; assert 'lm_eval' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
