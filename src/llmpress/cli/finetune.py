"""``llmpress finetune COMPRESSED -o OUT --reference ORIGINAL``: recovery training, same size."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .app import DEVICE_OPT, FORCE_OPT, JSON_OPT, app, console, emit, kv_table


def _show(res: dict[str, Any]) -> None:
    rows = {k: res[k] for k in ("steps", "loss_first", "loss_last", "best_step", "best_loss", "bpw", "bytes_before", "bytes_out", "ratio",
                                "seconds", "peak_rss_bytes", "out") if k in res}
    console.print(kv_table("finetune", rows))


@app.command()
def finetune(
    compressed: Path = typer.Argument(..., help="An llmpress folder written by quantize / factorize / compress."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (same format and size as the input)."),
    reference: str = typer.Option(..., "--reference", "-r", help="The original model (folder, hub id or embedded name)."),
    text: Optional[str] = typer.Option(None, "--text", help="Training text: corpus name or file (default: the calibration corpus)."),
    eval_text: Optional[list[str]] = typer.Option(None, "--eval-text", help="Evaluation text(s) the training text must not overlap."),
    steps: int = typer.Option(200, "--steps", "-n", help="Optimizer steps."),
    lr: float = typer.Option(1e-5, "--lr", help="Adam learning rate of low-rank factors."),
    qparam_lr: float = typer.Option(1e-4, "--qparam-lr", help="Adam learning rate of quantization scales/offsets."),
    code_lr: float = typer.Option(1e-2, "--code-lr", help="Learning rate of QAT latent weights, in quantization steps."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training window."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per step."),
    objective: str = typer.Option("kd", "--objective", help="kd (distil from the reference) | nll (next token)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Stop after this many minutes of training."),
    clock: str = typer.Option("wall", "--clock", help="How --minutes is measured: wall | cpu (CPU time / threads: the same work when the machine is shared)."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine (decays over the steps, or over --minutes when that ends "
                                 "the run first) | constant."),
    holdout: int = typer.Option(8, "--holdout", help="Windows of the training text held out to choose the best state (0: none)."),
    eval_every: int = typer.Option(25, "--eval-every", help="Steps between held-out validations."),
    patience: int = typer.Option(4, "--patience", help="Stop after this many validations without a better held-out loss (0: never)."),
    keep_best: bool = typer.Option(True, "--keep-best/--keep-last", help="End with the best held-out state, or the last one."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Go on (with a warning) when the texts overlap."),
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Train COMPRESSED towards the original (quantized layers through their quantizer, low-rank
    layers' factors) and write it to OUT in the same format, bits per weight unchanged."""
    from ..recovery import finetune as run

    res = run(compressed, out, reference=reference, text=text, steps=steps, lr=lr, qparam_lr=qparam_lr,
              code_lr=code_lr, seq_len=seq_len,
              batch_size=batch_size, objective=objective, eval_text=eval_text or None, force=force,
              allow_overlap=allow_overlap, max_seconds=minutes * 60 if minutes else None, clock=clock,
              schedule=schedule, holdout=holdout, eval_every=eval_every, patience=patience, keep_best=keep_best,
              device=device)
    emit(res, as_json, _show)
