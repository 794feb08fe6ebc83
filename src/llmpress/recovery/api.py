"""``llmpress.finetune``: recovery training of a compressed model, written back in its own format.

    import llmpress
    llmpress.finetune("out/q3", "out/q3-ft", reference="smollm2-135m", steps=200)
    model = llmpress.load("out/q3-ft")        # same codecs, same bits per weight, better fidelity

Each compressed linear of the folder becomes a trainable stand-in chosen by its codec family
(registry ``ADAPTERS``): quantized layers train through their own quantizer (``qat.py``),
low-rank layers train their factors (``factors.py``). Codecs without an adapter (composites such
as ``whiten+q``, ``lqer``) stay frozen. The output folder holds the same tensors with the same
keys, dtypes and shapes as the input, so its size is unchanged; ``llmpress.json`` keeps the
recipe and gains a ``finetune`` record (steps, losses, texts, overlap with the evaluation text).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from ..errors import InputError, MissingInputError
from ..io.atomic import atomic_dir, check_output
from ..io.folder import FolderWriter, is_folder, load_folder, read_manifest
from ..skeleton import carry_hooks, set_module
from ..tensor import CompressedTensor, get_codec
from .data import check_overlap, train_windows
from .distill import NEEDS_TEACHER
from .factors import FactorLinear
from .loop import TrainConfig, train
from .qat import QATLinear

log = logging.getLogger(__name__)

Adapter = tuple[Callable[[Any], bool], Callable[[CompressedTensor, torch.Tensor | None], nn.Module]]


def _is_quant(codec: Any) -> bool:
    from ..quant.codec import QuantCodec

    return isinstance(codec, QuantCodec)


def _is_lowrank(codec: Any) -> bool:
    from ..lowrank.base import LowRankCodec

    return isinstance(codec, LowRankCodec)


# codec family -> (accepts(codec), build(ct, bias)); the first that accepts wins.
ADAPTERS: dict[str, Adapter] = {
    "qat": (_is_quant, QATLinear),
    "factors": (_is_lowrank, FactorLinear),
}


def adapter_for(codec_name: str) -> str | None:
    codec = get_codec(codec_name)
    return next((k for k, (accepts, _) in ADAPTERS.items() if accepts(codec)), None)


# ---------------------------------------------------------------------------- inputs
def _config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.exists():
        raise MissingInputError(f"{folder}: no config.json")
    return json.loads(p.read_text())


ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def check_compatible(compressed: Path, reference: str | Path) -> Path:
    """The reference must be the same architecture with the same tokenizer; returns its folder."""
    from ..eval.windows import tokenizer_sha256
    from ..models import load_tokenizer, resolve

    ref = resolve(reference)
    a, b = _config(compressed), _config(ref.folder)
    diff = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in ARCH_KEYS if a.get(k) != b.get(k)]
    if diff:
        raise InputError(f"{compressed} and the reference {reference} are different architectures ({'; '.join(diff)})")
    if tokenizer_sha256(load_tokenizer(compressed)) != tokenizer_sha256(load_tokenizer(ref.folder)):
        raise InputError(f"{compressed} and the reference {reference} do not share a tokenizer")
    return ref.folder


def read_compressed(folder: Path, manifest: dict) -> tuple[dict[str, CompressedTensor], dict[str, torch.Tensor]]:
    """Every CompressedTensor of the folder by parameter name, and every other stored tensor."""
    tensors: dict[str, torch.Tensor] = {}
    for f in manifest["files"]:
        with safe_open(str(folder / f), framework="pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    cts = {}
    for param, e in manifest["tensors"].items():
        data = {k: tensors.pop(f"{param}.{k}") for k in e["keys"]}
        cts[param] = CompressedTensor(e["codec"], data, dict(e["meta"]))
    return cts, tensors


def make_trainable(model: nn.Module, cts: dict[str, CompressedTensor], rest: dict[str, torch.Tensor]) -> tuple[dict[str, nn.Module], list[str]]:
    """Swap each compressed linear with an adapter for a trainable stand-in; the others stay frozen."""
    trainables, frozen = {}, []
    for param, ct in cts.items():
        mod_name = param.rsplit(".", 1)[0]
        kind = adapter_for(ct.codec)
        if kind == "qat" and not QATLinear.supports(ct):  # a grid whose parameters QAT cannot train
            kind = None
        if kind is None:
            frozen.append(mod_name)
            continue
        bias = rest.get(f"{mod_name}.bias")
        mod = ADAPTERS[kind][1](ct, bias)
        set_module(model, mod_name, carry_hooks(model.get_submodule(mod_name), mod))  # an online rotation stays
        trainables[mod_name] = mod
    if frozen:
        log.warning("no recovery training for %d layers (composite codecs or grids QAT does not handle; kept as they are): %s",
                    len(frozen), ", ".join(frozen[:4]) + (" …" if len(frozen) > 4 else ""))
    if not trainables:
        raise InputError("nothing to train: the folder has no quantized or low-rank layer that recovery training handles")
    return trainables, frozen


def _load_text(spec: str | None, default: str) -> tuple[str, str]:
    from ..text import load_text

    name = spec or default
    return str(name), load_text(str(name))


# ---------------------------------------------------------------------------- the verb
def finetune(compressed: str | Path, out: str | Path, *, reference: str | Path, text: str | None = None,
             steps: int = 200, lr: float = 1e-5, seq_len: int = 256, batch_size: int = 4, objective: str = "kd",
             eval_text: str | list[str] | None = None, force: bool = False, allow_overlap: bool = False,
             max_seconds: float | None = None, clock: str = "wall", checkpoint_every: int = 50, seed: int = 0, grad_ckpt: bool = True,
             schedule: str = "cosine", warmup: int = 10, qparam_lr: float | None = 1e-4, code_lr: float = 1e-2, train_latent: bool = True,
             holdout: int = 8, eval_every: int = 25, patience: int = 4, keep_best: bool = True, progress: bool = True,
             on_step: Callable[[int, float, nn.Module], None] | None = None,
             device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Recovery training of the llmpress folder ``compressed`` towards ``reference`` (the original),
    on ``text`` (default: the calibration corpus), written to ``out`` in the same format.

    Learning rates (Adam): ``lr`` for low-rank factors, ``qparam_lr`` for quantization scales and
    offsets (None: ``lr``), ``code_lr`` for the QAT latent weights in quantization steps;
    ``train_latent=False`` moves codes only through their scales (cheaper per step).
    The learning rate decays (cosine, over the steps or the ``max_seconds`` budget, whichever ends the
    run) unless ``schedule="constant"``. ``holdout`` windows of the training text, after those trained
    on, are held out: every ``eval_every`` steps the objective is measured on them, the best state is
    kept (``keep_best``) and the run stops after ``patience`` validations without a better one (0: never).
    Refuses a training text that overlaps ``eval_text`` (default: the evaluation corpora) unless
    ``allow_overlap``. An interrupted run resumes from its checkpoint (kept beside ``out``).
    Returns ``bpw``, ``bytes_in``, ``bytes_out``, ``ratio``, ``bytes_before``, ``losses``,
    ``loss_first``, ``loss_last``, ``steps``, ``seconds``, ``peak_rss_bytes``, ``out``.
    ``device``: cpu | cuda | auto, where the student and the teacher run and train.
    """
    from ..device import resolve_device, to_cpu
    from ..pipeline import peak_rss_bytes

    dev = resolve_device(device)
    from ..text import CALIB_DEFAULT, EVAL_DEFAULTS

    t0 = time.perf_counter()
    cfg = TrainConfig(steps=steps, lr=lr, qparam_lr=qparam_lr, code_lr=code_lr, batch_size=batch_size, seq_len=seq_len,
                      objective=objective, seed=seed, grad_ckpt=grad_ckpt, checkpoint_every=checkpoint_every,
                      max_seconds=max_seconds, clock=clock, schedule=schedule, warmup=warmup,
                      eval_every=eval_every if holdout else 0, patience=patience, keep_best=keep_best).validate()
    src, out = Path(compressed), Path(out)
    if not is_folder(src):
        raise InputError(f"{src}: not an llmpress folder (quantize/factorize/compress output with llmpress.json)")
    if src.resolve() == out.resolve():
        raise InputError("the output must be a new folder, not the input")
    check_output(out, force)
    manifest = read_manifest(src)
    ref_folder = check_compatible(src, reference)

    text_name, train_text = _load_text(text, CALIB_DEFAULT)
    from ..models import load_tokenizer

    tok = load_tokenizer(src)
    windows = train_windows(tok, train_text, seq_len, steps * batch_size, seed, holdout=holdout)
    evals = [eval_text] if isinstance(eval_text, str) else list(eval_text or EVAL_DEFAULTS)
    overlap = check_overlap(train_text[: windows.chars], {e: _load_text(e, e)[1] for e in evals}, allow=allow_overlap)
    cfg.extra = {"input": manifest["files"], "reference": str(reference), "text": text_name,
                 "windows": windows.windows.shape[0], "train_latent": train_latent,
                 "held_out": 0 if windows.held is None else int(windows.held.shape[0])}

    student = load_folder(src)
    cts, rest = read_compressed(src, manifest)
    trainables, frozen = make_trainable(student, cts, rest)
    student.to(dev)
    for mod in trainables.values():
        if isinstance(mod, QATLinear):
            mod.train_latent = train_latent
    teacher = None
    if NEEDS_TEACHER[objective]:
        from ..loading import load

        teacher = load(ref_folder).eval().to(dev)
        for p in teacher.parameters():
            p.requires_grad_(False)
    ckpt = out.parent / f".{out.name}.finetune-ckpt"
    hook = (lambda i, loss: on_step(i, loss, student)) if on_step is not None else None
    validate = None
    if windows.held is not None and cfg.eval_every:
        validate = _held_out_loss(student, teacher, windows.held.to(dev), objective, batch_size)
    run = train(student, teacher, trainables, lambda i: windows.batch(i, batch_size), cfg, ckpt=ckpt,
                progress=progress, on_step=hook, validate=validate)
    del teacher

    new_cts = {p: trainables[p.rsplit(".", 1)[0]].to_ct() if p.rsplit(".", 1)[0] in trainables else ct for p, ct in cts.items()}
    new_cts = {p: CompressedTensor(ct.codec, to_cpu(ct.data), ct.meta) for p, ct in new_cts.items()}  # written from the host
    for p, ct in new_cts.items():
        if ct.nbits() != cts[p].nbits() or ct.meta != cts[p].meta:
            raise AssertionError(f"{p}: re-packing changed the stored size or meta")
    record = {
        "steps": steps, "steps_done": run["steps_done"], "objective": objective, "lr": lr, "qparam_lr": qparam_lr or lr, "code_lr": code_lr,
        "schedule": schedule, "warmup": warmup, "train_latent": train_latent, "seq_len": seq_len, "batch_size": batch_size, "seed": seed, "max_seconds": max_seconds, "clock": clock,
        "text": text_name, "text_windows": int(windows.windows.shape[0]), "eval_text": evals, "overlap": overlap,
        "reference": str(reference), "input": str(src), "losses": run["losses"], "seconds": run["seconds"],
        "trained": {k: sum(1 for m in trainables.values() if m.kind == k) for k in ADAPTERS}, "frozen": frozen,
        "resumed_at": run["resumed_at"], "holdout": 0 if windows.held is None else int(windows.held.shape[0]),
        "eval_every": cfg.eval_every, "patience": patience, "keep_best": keep_best,
        **{k: run[k] for k in ("held_out", "best_step", "best_loss", "kept_best", "stopped_early") if k in run},
    }
    man = _write(src, out, manifest, new_cts, rest, record, force)
    shutil.rmtree(ckpt, ignore_errors=True)
    losses = run["losses"]
    return {
        "bpw": man["bpw"], "bytes_in": man.get("bytes_in"), "bytes_out": man["bytes_out"],
        "ratio": man["bytes_out"] / man["bytes_in"] if man.get("bytes_in") else None,
        "bytes_before": manifest["bytes_out"], "bpw_before": manifest["bpw"],
        "steps": run["steps_done"], "losses": losses, "loss_first": losses[0], "loss_last": losses[-1],
        "objective": objective, "text": text_name, "overlap": overlap, "frozen": len(frozen),
        **{k: run[k] for k in ("held_out", "best_step", "best_loss", "kept_best", "stopped_early") if k in run},
        "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(), "out": str(out),
    }


def _held_out_loss(student: nn.Module, teacher: nn.Module | None, held: torch.Tensor, objective: str,
                   batch_size: int) -> Callable[[], float]:
    """The training objective on the held-out windows (H, T), averaged over windows."""
    from .distill import get_objective, teacher_logits

    fn = get_objective(objective)

    def loss() -> float:
        total = 0.0
        with torch.no_grad():
            for i in range(0, held.shape[0], batch_size):
                ids = held[i:i + batch_size]
                logits = student(input_ids=ids, use_cache=False).logits
                total += float(fn(logits, teacher_logits(teacher, ids), ids)) * ids.shape[0]
        return total / held.shape[0]

    return loss


_WRITER_KEYS = ("format", "version", "tensors", "files", "bytes_out")


def _write(src: Path, out: Path, manifest: dict, cts: dict[str, CompressedTensor], rest: dict[str, torch.Tensor],
           record: dict, force: bool) -> dict:
    """The output folder: the input's files with the trained tensors, manifest + finetune record."""
    cfg = _config(src)
    cfg.pop("quantization_config", None)
    with atomic_dir(out, force=force) as tmp:
        w = FolderWriter(tmp)
        for param, ct in cts.items():
            w.add_compressed(param, ct)
        for k, t in rest.items():
            w.add_tensor(k, t)
        summary = {k: v for k, v in manifest.items() if k not in _WRITER_KEYS}
        summary["finetune"] = record
        return w.finish(src, cfg, summary)
