"""Recovery training end to end on a tiny Llama compressed by the pipeline with real codecs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmpress
from llmpress.recovery import finetune
from llmpress.recovery.api import make_trainable, read_compressed
from llmpress.recovery.loop import TrainConfig, train
from llmpress.io.folder import load_folder, read_manifest
from llmpress.pipeline import compress
from llmpress.recipe import Recipe
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids

FAST = dict(seq_len=32, batch_size=2, progress=False, checkpoint_every=2, grad_ckpt=False)


@pytest.fixture(scope="module")
def rtn3(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "rtn3"
    compress(tiny_llama_dir, Recipe.uniform("rtn", bits=3, group_size=32), out, progress=False)
    return out


@pytest.fixture(scope="module")
def svd60(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "svd60"
    compress(tiny_llama_dir, Recipe.uniform("svd", ratio=0.6), out, progress=False)
    return out


def _ids(tiny_llama_dir, n=2, t=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, tinytok.VOCAB, (n, t), generator=g)


@pytest.mark.parametrize("which, lr", [("rtn3", 1e-4), ("svd60", 1e-3)])
def test_loss_goes_down_on_a_fixed_batch(which, lr, request, tiny_llama_dir):
    folder = request.getfixturevalue(which)
    student, teacher = load_folder(folder), llmpress.load(tiny_llama_dir)
    man = read_manifest(folder)
    trainables, frozen = make_trainable(student, *read_compressed(folder, man))
    assert not frozen and len(trainables) == 14
    ids = _ids(tiny_llama_dir)
    cfg = TrainConfig(steps=6, lr=lr, warmup=1, grad_ckpt=False, checkpoint_every=0)
    run = train(student, teacher, trainables, lambda i: ids, cfg, progress=False)
    assert run["losses"][-1] < 0.85 * run["losses"][0], run["losses"]
    assert max(run["losses"][1:]) <= run["losses"][0]


def test_finetune_writes_same_format_same_size(rtn3, tiny_llama_dir, tmp_path):
    out = tmp_path / "ft"
    res = finetune(rtn3, out, reference=tiny_llama_dir, steps=3, lr=1e-3, **FAST)
    a, b = read_manifest(rtn3), read_manifest(out)
    assert res["bpw"] == a["bpw"] == b["bpw"] and res["bytes_out"] == a["bytes_out"] == b["bytes_out"]
    assert {k: v["meta"] for k, v in a["tensors"].items()} == {k: v["meta"] for k, v in b["tensors"].items()}
    assert b["recipe"] == a["recipe"] and b["finetune"]["steps_done"] == 3 and len(b["finetune"]["losses"]) == 3
    assert b["finetune"]["text"] == "calib-mix" and b["finetune"]["overlap"] == {"debian-handbook": 0.0, "linux-doc": 0.0}
    ta, tb = load_file(str(rtn3 / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape for k in ta)
    assert any(not torch.equal(ta[k], tb[k]) for k in ta if k.endswith((".qweight", ".scale")))
    assert not (tmp_path / ".ft.finetune-ckpt").exists()
    m = llmpress.load(out)
    ids = _ids(tiny_llama_dir)
    assert torch.isfinite(m(input_ids=ids).logits).all()
    assert type(m.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"


def test_resume_equals_uninterrupted(svd60, tiny_llama_dir, tmp_path):
    full = tmp_path / "full"
    finetune(svd60, full, reference=tiny_llama_dir, steps=4, lr=1e-3, **FAST)

    class Stop(Exception):
        pass

    def boom(step, loss, model):
        if step == 3:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        finetune(svd60, part, reference=tiny_llama_dir, steps=4, lr=1e-3, on_step=boom, **FAST)
    assert not part.exists() and (tmp_path / ".part.finetune-ckpt" / "state.json").exists()
    res = finetune(svd60, part, reference=tiny_llama_dir, steps=4, lr=1e-3, **FAST)
    assert read_manifest(part)["finetune"]["resumed_at"] == 2
    tf, tp = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(tf[k], tp[k]) for k in tf)
    assert res["losses"] == read_manifest(full)["finetune"]["losses"]


def test_bad_inputs(rtn3, tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="steps"):
        finetune(rtn3, tmp_path / "a", reference=tiny_llama_dir, steps=0)
    with pytest.raises(ValueError, match="not an llmpress folder"):
        finetune(tiny_llama_dir, tmp_path / "a", reference=tiny_llama_dir, steps=1)
    with pytest.raises(ValueError, match="overlaps the evaluation text"):
        finetune(rtn3, tmp_path / "a", reference=tiny_llama_dir, steps=1, text="linux-doc", **FAST)
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(ValueError, match="different architectures.*vocab_size"):
        finetune(rtn3, tmp_path / "a", reference=other, steps=1)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        finetune(rtn3, tmp_path / "exists", reference=tiny_llama_dir, steps=1)
    assert not (tmp_path / "a").exists()


def test_cli(rtn3, tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["finetune", str(rtn3), "-o", str(tmp_path / "o"), "--reference", str(tiny_llama_dir),
                                 "--steps", "1", "--seq-len", "16", "--batch-size", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["steps"] == 1 and res["bpw"] == read_manifest(rtn3)["bpw"]
    r = CliRunner().invoke(app, ["finetune", str(rtn3), "-o", str(tmp_path / "p"), "--reference", str(tiny_llama_dir),
                                 "--steps", "0"])
    assert r.exit_code == 2 and "steps must be a positive integer" in r.output and "Traceback" not in r.output


def test_cli_diverging_run_is_one_line(rtn3, tiny_llama_dir, tmp_path):
    """A learning rate that sends the loss to inf/NaN ends with one line and exit 1, not a traceback."""
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["finetune", str(rtn3), "-o", str(tmp_path / "o"), "--reference", str(tiny_llama_dir),
                                 "--steps", "4", "--seq-len", "16", "--batch-size", "1", "--holdout", "0",
                                 "--lr", "1e38", "--qparam-lr", "1e38", "--code-lr", "1e38"])
    lines = [ln for ln in r.output.splitlines() if ln.strip().startswith("error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "the loss became" in lines[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_cosine_decays_over_the_time_budget():
    cfg = TrainConfig(steps=100000, warmup=0, max_seconds=100.0)
    assert cfg.lr_factor(10, 0.0) == pytest.approx(1.0, abs=1e-6)
    assert cfg.lr_factor(10, 50.0) == pytest.approx(0.55)
    assert cfg.lr_factor(10, 100.0) == pytest.approx(0.1) == cfg.lr_factor(10, 500.0)
    assert TrainConfig(steps=100, warmup=0).lr_factor(100) == pytest.approx(0.1)
    assert TrainConfig(steps=100, warmup=0, schedule="constant", max_seconds=1.0).lr_factor(50, 5.0) == 1.0


def test_keeps_the_best_held_out_state_and_stops_early(rtn3, tiny_llama_dir):
    """Held-out losses 5, 3, 4, 4.5, 6, …: the best is the second validation (step 4); three
    validations without a better one stop the run at step 10, which ends with step 4's tensors."""
    from llmpress.recovery.loop import _named_trainable

    student, teacher = load_folder(rtn3), llmpress.load(tiny_llama_dir)
    trainables, _ = make_trainable(student, *read_compressed(rtn3, read_manifest(rtn3)))
    params = _named_trainable(trainables)
    ids = _ids(tiny_llama_dir)
    script = iter([5.0, 3.0, 4.0, 4.5, 6.0, 7.0, 8.0])
    snap = {}

    def on_step(step: int, loss: float) -> None:
        snap[step] = {n: p.detach().clone() for n, p in params.items()}

    cfg = TrainConfig(steps=40, lr=1e-3, warmup=0, grad_ckpt=False, checkpoint_every=0, eval_every=2, patience=3)
    run = train(student, teacher, trainables, lambda i: ids, cfg, progress=False, on_step=on_step,
                validate=lambda: next(script))
    assert run["held_out"] == [(2, 5.0), (4, 3.0), (6, 4.0), (8, 4.5), (10, 6.0)]
    assert run["stopped_early"] and run["steps_done"] == 10 and run["best_step"] == 4 and run["kept_best"]
    assert any(not torch.equal(snap[4][n], snap[10][n]) for n in params)
    for n, p in params.items():
        assert torch.equal(p.detach(), snap[4][n]), n
    # keep_best off: the last state stays; patience 0: no early stop
    script = iter([5.0, 3.0] + [9.0] * 10)
    cfg = TrainConfig(steps=8, lr=1e-3, warmup=0, grad_ckpt=False, checkpoint_every=0, eval_every=2, patience=0,
                      keep_best=False)
    run = train(student, teacher, trainables, lambda i: ids, cfg, progress=False, on_step=on_step,
                validate=lambda: next(script))
    assert run["steps_done"] == 8 and not run["stopped_early"] and not run["kept_best"]
    assert all(torch.equal(p.detach(), snap[8][n]) for n, p in params.items())


def test_finetune_records_held_out_curve(rtn3, tiny_llama_dir, tmp_path):
    res = finetune(rtn3, tmp_path / "ft", reference=tiny_llama_dir, steps=4, lr=1e-3, eval_every=2, holdout=2, **FAST)
    assert [s for s, _ in res["held_out"]] == [2, 4] and res["best_step"] in (2, 4)
    rec = read_manifest(tmp_path / "ft")["finetune"]
    assert rec["holdout"] == 2 and rec["held_out"] == [list(x) for x in res["held_out"]] or rec["held_out"] == res["held_out"]
