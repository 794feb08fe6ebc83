"""The CPU training loop: small batches, optional gradient checkpointing, a progress bar with
the loss, and checkpoints (safetensors + JSON, no pickle) from which an interrupted run resumes.

Determinism: the batch of step i and the dropout seed of step i depend only on the run's seed
and i, so a run resumed from the checkpoint of step j reproduces the uninterrupted run. A
checkpoint belongs to one run configuration (its hash is stored); a different configuration
starts afresh.

The learning rate warms up linearly over ``warmup`` steps, then follows a cosine to 10 % over the
run: over its steps, or over its time budget when ``max_seconds`` ends it first (the further along
of the two), so a run bounded by time still ends at a low rate; ``schedule="constant"`` keeps it flat.

Keeping the best: with a ``validate`` function (the objective on held-out windows), every
``eval_every`` steps the held-out loss is measured; the trainable tensors of the best so far are
kept (in memory and in each checkpoint), restored at the end if the last state is worse, and the
run stops early after ``patience`` validations without a new best.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import DivergedError, InputError
from ..device import model_device
from ..io.atomic import atomic_dir
from .distill import NEEDS_TEACHER, get_objective, teacher_logits

log = logging.getLogger(__name__)

STATE = "state.json"

# Training-time clocks. "cpu" is this process's CPU time divided by its threads: the wall time
# the same work takes on an idle machine with that many cores, so that a budget means the same
# amount of training when other jobs share the machine (benchmarks on a busy 2-core box).
CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "cpu": lambda: time.process_time() / max(1, torch.get_num_threads()),
}
TENSORS = "trainable.safetensors"


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps (the run may stop earlier at max_seconds)
    lr: float = 1e-5  # Adam learning rate of low-rank factors (weight units)
    qparam_lr: float | None = 1e-4  # of quantization scales/offsets (None: lr)
    code_lr: float = 1e-2  # of QAT latent weights, in quantization steps per step
    batch_size: int = 4  # windows per step
    seq_len: int = 256  # tokens per window
    objective: str = "kd"  # kd | nll
    warmup: int = 10
    schedule: str = "cosine"  # cosine (over the steps, or the time budget if it ends the run first) | constant
    eval_every: int = 25  # held-out validation every this many steps (0: none)
    patience: int = 4  # stop after this many validations without a new best (0: never)
    keep_best: bool = True  # end with the tensors of the best validation
    clip: float = 1.0  # gradient-norm clipping
    seed: int = 0
    grad_ckpt: bool = True  # recompute each block's activations in backward (less memory)
    checkpoint_every: int = 50
    max_seconds: float | None = None  # stop at this training time (not part of the run's identity)
    clock: str = "wall"  # how max_seconds is measured: a key of CLOCKS (not part of the run's identity)
    extra: dict[str, Any] = field(default_factory=dict)  # what else identifies the run (inputs, texts)

    def validate(self) -> "TrainConfig":
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise InputError(f"steps must be a positive integer; got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"lr must be a positive number; got {self.lr!r}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise InputError(f"need batch_size ≥ 1 and seq_len ≥ 2; got {self.batch_size}, {self.seq_len}")
        if self.warmup < 0:
            raise InputError(f"warmup must be ≥ 0; got {self.warmup}")
        if self.clock not in CLOCKS:
            raise InputError(f"clock must be one of {', '.join(CLOCKS)}; got {self.clock!r}")
        if self.eval_every < 0 or self.patience < 0:
            raise InputError(f"eval_every and patience must be ≥ 0; got {self.eval_every}, {self.patience}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule must be cosine or constant; got {self.schedule!r}")
        get_objective(self.objective)
        return self

    def key(self) -> str:
        d = asdict(self)
        d.pop("max_seconds")
        d.pop("clock")
        d.pop("checkpoint_every")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def lr_factor(self, step: int, seconds: float = 0.0) -> float:
        """The learning rate's factor at ``step``, ``seconds`` of training into the run."""
        if step < self.warmup:  # warmup = 0: full rate from the first step
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.max_seconds:  # a time budget that ends the run before its steps: decay over the time
            t = max(t, seconds / self.max_seconds)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(trainables: dict[str, nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with one parameter group per kind (latent weights, quantizer parameters, factors)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for mod in trainables.values():
        for kind, ps in mod.param_groups().items():
            groups.setdefault(kind, []).extend(ps)
    lrs = {"qparams": cfg.qparam_lr or cfg.lr, "latent": cfg.code_lr}
    return torch.optim.Adam(
        [{"params": ps, "lr": lrs.get(k, cfg.lr), "base_lr": lrs.get(k, cfg.lr), "name": k} for k, ps in sorted(groups.items())],
        betas=(0.9, 0.95), eps=1e-10, fused=True,  # one pass over each parameter (CPU kernel)
    )


def _named_trainable(trainables: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    mine = {id(p) for mod in trainables.values() for ps in mod.param_groups().values() for p in ps}
    return {f"{name}.{p}": t for name, mod in trainables.items() for p, t in mod.named_parameters() if id(t) in mine}


@dataclass
class Best:
    """The held-out losses so far and the trainable tensors (host copies) of the best of them."""
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    step: int | None = None
    loss: float = math.inf
    since: int = 0  # validations since the best
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def see(self, step: int, loss: float, params: dict[str, nn.Parameter], keep: bool) -> None:
        self.curve.append((step, loss))
        if loss < self.loss:
            self.step, self.loss, self.since = step, loss, 0
            if keep:
                self.tensors = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        else:
            self.since += 1

    def state(self) -> dict[str, Any]:
        return {"curve": self.curve, "step": self.step, "loss": self.loss if self.step is not None else None,
                "since": self.since}


def save_checkpoint(path: Path, trainables: dict[str, nn.Module], opt: torch.optim.Optimizer, cfg: TrainConfig,
                    step: int, losses: list[float], seconds: float, best: Best | None = None) -> None:
    """Trainable tensors, Adam moments and the best tensors in safetensors, the rest in JSON; atomically."""
    params = _named_trainable(trainables)
    index = {id(p): n for n, p in params.items()}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    if best is not None:
        tensors.update({f"best/{n}": t.contiguous() for n, t in best.tensors.items()})
    moments: dict[str, int] = {}
    for p, st in opt.state.items():
        n = index[id(p)]
        tensors[f"exp_avg/{n}"] = st["exp_avg"].cpu().contiguous()
        tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].cpu().contiguous()
        moments[n] = int(st["step"])
    state = {"config_key": cfg.key(), "step": step, "losses": losses, "seconds": seconds, "adam_steps": moments,
             "best": best.state() if best is not None else None}
    with atomic_dir(path, force=True) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(state))


def _checkpoint_problem(state: Any, header: dict[str, tuple[list[int], str]], params: dict[str, nn.Parameter],
                        cfg: TrainConfig) -> str | None:
    """Why a checkpoint cannot resume this run (its state or tensors do not fit the trainables), or
    None; reads shapes and dtypes from the safetensors header, no data."""
    if not isinstance(state, dict):
        return "its state is not an object"
    if state.get("config_key") != cfg.key():
        return "it belongs to another run configuration"
    step, losses, seconds, moments = (state.get(k) for k in ("step", "losses", "seconds", "adam_steps"))
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= cfg.steps:
        return f"step {step!r} is not a step of this run"
    if not (isinstance(losses, list) and len(losses) == step and all(isinstance(x, (int, float)) for x in losses)):
        return "its losses do not match its step"
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
        return f"seconds {seconds!r} is not a duration"
    if not isinstance(moments, dict) or not all(n in params and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                for n, v in moments.items()):
        return "its Adam step counts do not name this run's parameters"
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    for n, p in params.items():
        for kind in ("param", *(("exp_avg", "exp_avg_sq") if n in moments else ())):
            h = header.get(f"{kind}/{n}")
            if h is None:
                return f"tensor {kind}/{n} is missing"
            if tuple(h[0]) != tuple(p.shape) or dtypes.get(h[1]) is None:
                return f"tensor {kind}/{n} is {h[1]} {list(h[0])}; the run trains {list(p.shape)}"
    for k, (shape, _) in header.items():
        if k.startswith("best/") and (k[5:] not in params or tuple(shape) != tuple(params[k[5:]].shape)):
            return f"tensor {k} is not a state of this run's parameters"
    b = state.get("best")
    if b is not None and not (isinstance(b, dict) and isinstance(b.get("curve"), list)
                              and all(isinstance(x, list) and len(x) == 2 for x in b["curve"])
                              and isinstance(b.get("since"), int) and (b.get("step") is None or isinstance(b.get("step"), int))
                              and (b.get("loss") is None or isinstance(b.get("loss"), (int, float)))):
        return "its held-out record is malformed"
    return None


def load_checkpoint(path: Path, trainables: dict[str, nn.Module], opt: torch.optim.Optimizer, cfg: TrainConfig,
                    best: Best | None = None) -> dict | None:
    """Restore a checkpoint of this run configuration (and ``best``'s record); None when there is
    none to resume. A checkpoint that is unreadable, torn, or whose tensors are missing or of another
    shape is left alone with a warning and the run starts afresh: nothing is restored from it."""
    if not (path / STATE).exists():
        return None
    params = _named_trainable(trainables)
    try:
        state = json.loads((path / STATE).read_text())
        with safe_open(str(path / TENSORS), framework="pt") as f:
            header = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, SafetensorError) as e:
        log.warning("checkpoint %s is unreadable (%s); starting afresh", path, e)
        return None
    why = _checkpoint_problem(state, header, params, cfg)
    if why is not None:
        log.warning("checkpoint %s cannot resume this run: %s; starting afresh", path, why)
        return None
    try:
        tensors = load_file(str(path / TENSORS))
    except (OSError, SafetensorError) as e:
        log.warning("checkpoint %s is unreadable (%s); starting afresh", path, e)
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
            if n in state["adam_steps"]:
                # fused Adam keeps its step counts where the parameter is
                opt.state[p] = {"step": torch.tensor(float(state["adam_steps"][n]), device=p.device),
                                "exp_avg": tensors[f"exp_avg/{n}"].to(p.device, p.dtype, copy=True),
                                "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device, p.dtype, copy=True)}
    b = state.get("best")
    if best is not None and b:
        best.curve = [tuple(x) for x in b["curve"]]
        best.step, best.since = b["step"], b["since"]
        best.loss = b["loss"] if b["loss"] is not None else math.inf
        best.tensors = {k[len("best/"):]: t for k, t in tensors.items() if k.startswith("best/")}
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each block's activations in backward instead of keeping them (transformers 5
    names it activation checkpointing; older versions gradient checkpointing)."""
    for enable, disable, kw in (("activation_checkpointing_enable", "activation_checkpointing_disable", "activation_checkpointing_kwargs"),
                                ("gradient_checkpointing_enable", "gradient_checkpointing_disable", "gradient_checkpointing_kwargs")):
        if hasattr(model, enable):
            if on:
                getattr(model, enable)(**{kw: {"use_reentrant": False}})
            else:
                getattr(model, disable)()
            return


def train(student: nn.Module, teacher: nn.Module | None, trainables: dict[str, nn.Module], batch: Callable[[int], Tensor],
          cfg: TrainConfig, *, ckpt: Path | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None,
          validate: Callable[[], float] | None = None) -> dict[str, Any]:
    """Train ``trainables`` (modules inside ``student``) for ``cfg.steps`` steps; ``batch(i)`` gives
    step i's ids (B, T). ``on_step(step, loss)`` runs after each step (evaluation curves, tests);
    ``validate()`` gives the held-out loss (every ``cfg.eval_every`` steps and at the end; see the
    module's note on keeping the best). Neither's time counts against ``cfg.max_seconds`` nor in the
    seconds returned. Returns the losses, the steps done, the seconds spent, whether a checkpoint was
    resumed, and with ``validate`` the held-out curve, the best step and whether the run ended on it."""
    cfg.validate()
    objective = get_objective(cfg.objective)
    if NEEDS_TEACHER[cfg.objective] and teacher is None:
        raise InputError(f"objective {cfg.objective!r} needs the reference model")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in _named_trainable(trainables).values():
        p.requires_grad_(True)
    opt = make_optimizer(trainables, cfg)
    clock = CLOCKS[cfg.clock]
    dev = model_device(student)  # the batches go where the student is
    best = Best() if validate is not None and cfg.eval_every else None
    state = load_checkpoint(ckpt, trainables, opt, cfg, best) if ckpt is not None else None
    start, losses = (state["step"], list(state["losses"])) if state else (0, [])
    spent = float(state["seconds"]) if state else 0.0
    if cfg.grad_ckpt:
        _checkpointing(student, True)
    student.train()
    t0 = clock() - spent
    bar = tqdm(range(start, cfg.steps), desc="finetune", disable=not progress, unit="step", initial=start, total=cfg.steps)
    step = start
    params = _named_trainable(trainables)
    stopped_early = False

    def held_out(done: int) -> None:  # its time is not training time
        nonlocal t0
        tc = clock()
        student.eval()
        loss = float(validate())  # type: ignore[misc]
        student.train()
        best.see(done, loss, params, cfg.keep_best)  # type: ignore[union-attr]
        t0 += clock() - tc

    try:
        for step in bar:
            for mod in trainables.values():
                mod.phase(step / cfg.steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * cfg.lr_factor(step, clock() - t0)
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            ids = batch(step).to(dev)  # (B, T)
            target = teacher_logits(teacher, ids) if NEEDS_TEACHER[cfg.objective] else None
            logits = student(input_ids=ids, use_cache=False).logits  # (B, T, V)
            loss = objective(logits, target, ids)
            if not torch.isfinite(loss):
                raise DivergedError(f"the loss became {float(loss.detach())} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"] if p.grad is not None], cfg.clip)
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if on_step is not None:  # its time (evaluation curves) is not training time
                tc = clock()
                on_step(done, losses[-1])
                t0 += clock() - tc
            if best is not None and done % cfg.eval_every == 0:
                held_out(done)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", held_out=f"{best.curve[-1][1]:.4f}")
                if cfg.patience and best.since >= cfg.patience:
                    log.info("no better held-out loss in %d validations: stopping at step %d (best: step %d)",
                             best.since, done, best.step)
                    stopped_early = True
                    break
            if ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(ckpt, trainables, opt, cfg, done, losses, clock() - t0, best)
            if cfg.max_seconds is not None and clock() - t0 >= cfg.max_seconds:
                log.info("time budget of %.0f s reached after %d steps", cfg.max_seconds, done)
                break
        if best is not None and losses and (not best.curve or best.curve[-1][0] != len(losses)):
            held_out(len(losses))  # the state the run ends in
        if best is not None and cfg.keep_best and best.step is not None and best.step != len(losses):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(best.tensors[n])
            log.info("kept step %d's tensors: held-out loss %.5f (the last step's: %.5f)", best.step, best.loss,
                     best.curve[-1][1])
    finally:
        bar.close()
        student.eval()
        if cfg.grad_ckpt:
            _checkpointing(student, False)
        for p in student.parameters():
            p.requires_grad_(False)
    out = {"losses": losses, "steps_done": len(losses), "seconds": clock() - t0, "resumed_at": start if state else None}
    if best is not None:
        out.update(held_out=best.curve, best_step=best.step, best_loss=best.loss if best.step is not None else None,
                   kept_best=bool(cfg.keep_best and best.step is not None and best.step != len(losses)),
                   stopped_early=stopped_early)
    return out
