"""A finetune checkpoint that is torn, edited or from another model never crashes the run: it is
left alone with a warning and the run starts afresh (and so ends where an uninterrupted run ends)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmpress.io.folder import read_manifest
from llmpress.pipeline import compress
from llmpress.recipe import Recipe
from llmpress.recovery import finetune

FAST = dict(seq_len=32, batch_size=2, progress=False, checkpoint_every=2, grad_ckpt=False, steps=4, lr=1e-3, holdout=0)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """A compressed model, the uninterrupted run, and the checkpoint an interrupted run left (step 2)."""
    base = tmp_path_factory.mktemp("ckpt")
    svd = base / "svd"
    compress(tiny_llama_dir, Recipe.uniform("svd", ratio=0.6), svd, progress=False)
    finetune(svd, base / "full", reference=tiny_llama_dir, **FAST)

    def boom(step, loss, model):
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(svd, base / "part", reference=tiny_llama_dir, on_step=boom, **FAST)
    ckpt = base / ".part.finetune-ckpt"
    assert (ckpt / "state.json").exists()
    return {"svd": svd, "full": base / "full", "ckpt": ckpt}


def _param_key(sd: dict) -> str:
    return next(k for k in sorted(sd) if k.startswith("param/"))


def _wrong_shape(d: Path) -> None:
    sd = load_file(str(d / "trainable.safetensors"))
    k = _param_key(sd)
    sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
    save_file(sd, str(d / "trainable.safetensors"))


def _missing(d: Path) -> None:
    sd = load_file(str(d / "trainable.safetensors"))
    sd.pop(_param_key(sd))
    save_file(sd, str(d / "trainable.safetensors"))


def _missing_moment(d: Path) -> None:
    sd = load_file(str(d / "trainable.safetensors"))
    sd.pop(next(k for k in sorted(sd) if k.startswith("exp_avg_sq/")))
    save_file(sd, str(d / "trainable.safetensors"))


def _torn(d: Path) -> None:
    raw = (d / "trainable.safetensors").read_bytes()
    (d / "trainable.safetensors").write_bytes(raw[: len(raw) // 2])


def _state(edit):
    def f(d: Path) -> None:
        s = json.loads((d / "state.json").read_text())
        edit(s)
        (d / "state.json").write_text(json.dumps(s))
    return f


# each run end to end (a finetune each: kept to the kinds of damage that reach different code)
RUN_DAMAGES = {
    "wrong shape": _wrong_shape,
    "torn tensors": _torn,
    "step past the run": _state(lambda s: s.update(step=10**9)),
}
# the rest: the check alone, on the real checkpoint (no run)
CHECK_DAMAGES = {
    "missing tensor": _missing,
    "missing moment": _missing_moment,
    "losses of another length": _state(lambda s: s.update(losses=[1.0])),
    "adam step of a stranger": _state(lambda s: s["adam_steps"].update({"nope.weight": 1})),
    "best of a stranger": _state(lambda s: s.update(best={"curve": "x"})),
}


@pytest.mark.parametrize("damage", sorted(RUN_DAMAGES))
def test_a_damaged_checkpoint_starts_afresh_with_a_warning(runs, tiny_llama_dir, tmp_path, caplog, damage):
    ckpt = tmp_path / ".out.finetune-ckpt"
    shutil.copytree(runs["ckpt"], ckpt)
    RUN_DAMAGES[damage](ckpt)
    with caplog.at_level(logging.WARNING, logger="llmpress.recovery.loop"):
        res = finetune(runs["svd"], tmp_path / "out", reference=tiny_llama_dir, **FAST)
    assert any("starting afresh" in r.getMessage() for r in caplog.records), caplog.text
    assert read_manifest(tmp_path / "out")["finetune"]["resumed_at"] in (0, None)
    assert res["losses"] == read_manifest(runs["full"])["finetune"]["losses"]  # the uninterrupted run's
    a, b = load_file(str(runs["full"] / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_damage_is_seen_before_anything_is_restored(runs, tmp_path):
    """The check reads the state and the safetensors header only; each damage is named."""
    from safetensors import safe_open

    from llmpress.recovery.loop import TrainConfig, _checkpoint_problem

    def header_of(d: Path) -> dict:
        with safe_open(str(d / "trainable.safetensors"), framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}

    # the run's trainable parameters: those the sound checkpoint holds
    params = {k[len("param/"):]: torch.nn.Parameter(torch.empty(shape))
              for k, (shape, _) in header_of(runs["ckpt"]).items() if k.startswith("param/")}
    cfg = TrainConfig(steps=FAST["steps"])

    def problem(d: Path) -> str | None:
        state = json.loads((d / "state.json").read_text())
        state["config_key"] = cfg.key()  # the key is the run's: here only the contents are judged
        return _checkpoint_problem(state, header_of(d), params, cfg)

    assert problem(runs["ckpt"]) is None
    for name, damage in CHECK_DAMAGES.items():
        d = tmp_path / name.replace(" ", "-")
        shutil.copytree(runs["ckpt"], d)
        damage(d)
        assert problem(d), name


def test_a_sound_checkpoint_still_resumes(runs, tiny_llama_dir, tmp_path):
    shutil.copytree(runs["ckpt"], tmp_path / ".out.finetune-ckpt")
    res = finetune(runs["svd"], tmp_path / "out", reference=tiny_llama_dir, **FAST)
    assert read_manifest(tmp_path / "out")["finetune"]["resumed_at"] == 2
    assert res["losses"] == read_manifest(runs["full"])["finetune"]["losses"]
