"""The training objective: what the compressed model is pulled towards.

``kd`` (default): knowledge distillation from the original model (Hinton et al. 2015), the
KL divergence KL(p_T ‖ q_T) of the original's next-token distribution p from the compressed
model's q at every position, at temperature T (1 by default: the distribution the evaluation
measures), scaled by T² so gradients keep their size across temperatures.
``nll``: the next-token cross-entropy on the training text (no teacher needed).

Objectives live in a registry; each takes the student's logits (B, T, V), the teacher's logits
(or None) and the input ids (B, T), and returns a scalar mean over positions.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

Objective = Callable[[Tensor, Tensor | None, Tensor], Tensor]
OBJECTIVES: dict[str, Objective] = {}
NEEDS_TEACHER: dict[str, bool] = {}


def objective(name: str, needs_teacher: bool) -> Callable[[Objective], Objective]:
    def deco(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        NEEDS_TEACHER[name] = needs_teacher
        return fn

    return deco


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over positions of KL(softmax(t/T) ‖ softmax(s/T))·T²; logits (B, T, V)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return kl.mean() * temperature**2


@objective("kd", needs_teacher=True)
def _kd(student: Tensor, teacher: Tensor | None, ids: Tensor) -> Tensor:
    if teacher is None:
        raise InputError("the kd objective needs the reference model's logits")
    return kl_loss(student, teacher)


@objective("nll", needs_teacher=False)
def _nll(student: Tensor, teacher: Tensor | None, ids: Tensor) -> Tensor:
    logits = student[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise InputError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None


def teacher_logits(teacher: torch.nn.Module | None, ids: Tensor) -> Tensor | None:
    if teacher is None:
        return None
    with torch.no_grad():  # not inference_mode: its tensors could not enter the student's autograd graph
        return teacher(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
