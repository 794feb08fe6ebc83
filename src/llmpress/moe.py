"""Mixture-of-experts models: every expert's matrices are linears of their own.

transformers (≥ 5) holds a layer's experts fused, as 3D parameters — ``experts.gate_up_proj``
(E, 2I, H) and ``experts.down_proj`` (E, H, I) — and converts the per-expert 2D tensors of hub
checkpoints into them at load. llmpress does the opposite: in every skeleton it builds
(``skeleton.build_meta``) each fused experts module of a family in ``FAMILIES`` is replaced by an
``ExpertList``, E small MLPs of three ``nn.Linear`` named as the hub checkpoint names them
(Mixtral ``experts.N.w1/w3/w2``, Qwen-MoE ``experts.N.gate_proj/up_proj/down_proj``). So, with no
MoE case anywhere else in the pipeline:

- each expert matrix is its own linear for codec purposes: its own rule, grid, scales and its
  own CompressedTensor, stored as ``<layer>.mlp.experts.N.w1.weight.<key>``;
- calibration is routed: a pre-hook on an expert's linear sees only the tokens the router sent
  to that expert, so its Stats (Gram matrix) come from those tokens alone; an expert that got
  none is encoded with ``no_input_stats`` (identity Hessian: RTN-like) and a warning;
- the routers (``mlp.gate``, not an ``nn.Linear``) and the gates listed in ``dense`` stay dense
  (``kept_dense``);
- an output folder holds per-expert tensors, which transformers itself loads (its checkpoint
  conversion fuses ``.experts.*.w1.weight`` and friends), so a dense export is an ordinary
  checkpoint; the GGUF writer stacks them into llama.cpp's ``ffn_*_exps`` tensors.

The Gram matrices are not weighted by the routing weights (an expert's output is scaled by its
token's weight before the sum): each routed token counts once, as in a dense layer.

``checkpoint_renames`` maps a checkpoint's names to the skeleton's (Mixtral's hub checkpoints say
``block_sparse_moe`` where the module is ``mlp``); ``TensorStore`` applies it. ``fold_patterns``
gives AWQ the folds that hold inside an expert; ``fan_out`` encodes a block's experts in Ray tasks.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError
from .tensor import Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEFamily:
    """How one model_type lays out its experts."""

    experts_class: str                 # transformers' fused experts module, e.g. "MixtralExperts"
    names: tuple[str, str, str]        # one expert's (gate, up, down) linears, as the hub stores them
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint name fragment → skeleton's
    dense: tuple[str, ...] = ()        # regexes (searched in full names) of linears kept dense: gates
    folds: tuple[tuple[str, str], ...] = ()  # (producer, consumer) linears inside a block AWQ may fold between


FAMILIES: dict[str, MoEFamily] = {
    "mixtral": MoEFamily("MixtralExperts", ("w1", "w3", "w2"), renames=((".block_sparse_moe.", ".mlp."),)),
    "qwen2_moe": MoEFamily("Qwen2MoeExperts", ("gate_proj", "up_proj", "down_proj"),
                           dense=(r"\.mlp\.shared_expert_gate$",),
                           folds=(("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),)),
    "qwen3_moe": MoEFamily("Qwen3MoeExperts", ("gate_proj", "up_proj", "down_proj")),
}


def family(config: Any) -> MoEFamily | None:
    """The MoE layout of a config (transformers config or config.json dict), or None."""
    mt = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return FAMILIES.get(mt)


class Expert(nn.Module):
    """One expert: down(act(gate(x)) ⊙ up(x)), its three linears named by the family."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act: nn.Module):
        super().__init__()
        self._names = names
        g, u, d = names
        self.add_module(g, nn.Linear(hidden, inter, bias=False))  # (I, H)
        self.add_module(u, nn.Linear(hidden, inter, bias=False))  # (I, H)
        self.add_module(d, nn.Linear(inter, hidden, bias=False))  # (H, I)
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:  # (T, H) → (T, H)
        g, u, d = (getattr(self, n) for n in self._names)
        return d(self.act_fn(g(x)) * u(x))  # gate and up read the same x: one shared Stats


class ExpertList(nn.ModuleList):
    """The experts of one layer as E separate MLPs, with the fused module's forward signature
    (hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) → (T, H)."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)  # the tokens routed to e, and at which of their k slots
            if tok.numel() == 0:
                continue
            y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def unfuse(model: nn.Module) -> int:
    """Replace each fused experts module of ``model`` (on meta or not) by an ``ExpertList`` holding
    the same weights per expert; returns how many were replaced (0 for a model outside ``FAMILIES``)."""
    fam = family(getattr(model, "config", None))
    if fam is None:
        return 0
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ == fam.experts_class]
    for name, fused in found:
        gu, dn = fused.gate_up_proj, fused.down_proj  # (E, 2I, H), (E, H, I)
        if getattr(fused, "is_transposed", False) or getattr(fused, "has_bias", False):
            raise InputError(f"{name}: transposed or biased fused experts are not supported")
        e_n, two_i, h = gu.shape
        inter = two_i // 2
        experts = []
        for e in range(e_n):
            with torch.device(gu.device):
                ex = Expert(fam.names, h, inter, fused.act_fn)
            if not gu.is_meta:  # a loaded model: keep its weights
                g, u, d = fam.names
                with torch.no_grad():
                    getattr(ex, g).weight.copy_(gu[e, :inter])
                    getattr(ex, u).weight.copy_(gu[e, inter:])
                    getattr(ex, d).weight.copy_(dn[e])
            experts.append(ex.to(gu.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExpertList(experts))
    return len(found)


def kept_dense(model: nn.Module) -> set[str]:
    """Modules of an MoE that stay as they are, on purpose: each router (the weight-holding sibling
    of an ``ExpertList``, not an ``nn.Linear``) and the family's gates (a shared expert's gate)."""
    fam = family(getattr(model, "config", None))
    if fam is None:
        return set()
    out = set()
    for name, mod in model.named_modules():
        kids = dict(mod.named_children())
        if any(isinstance(k, ExpertList) for k in kids.values()):
            out |= {f"{name}.{k}" for k, m in kids.items()
                    if not isinstance(m, (ExpertList, nn.Linear)) and any(p.ndim == 2 for p in m.parameters(recurse=False))}
    rx = [re.compile(p) for p in fam.dense]
    out |= {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(r.search(n) for r in rx)}
    return out


def checkpoint_renames(folder: Path, keys: list[str]) -> dict[str, str]:
    """{skeleton name: checkpoint name} for the checkpoint keys the family names otherwise;
    refuses fused expert tensors on disk (a raw ``state_dict`` dump) before any work."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.exists():
        return {}
    fam = family(json.loads(cfg_path.read_text()))
    if fam is None:
        return {}
    fused = [k for k in keys if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    if fused:
        raise InputError(f"{folder}: fused expert tensors on disk ({fused[0]}); llmpress reads per-expert "
                         "checkpoints as the hub and transformers' save_pretrained write them")
    out = {}
    for k in keys:
        new = k
        for a, b in fam.renames:
            new = new.replace(a, b)
        if new != k:
            out[new] = k
    return out


def no_input_stats(name: str, in_features: int, gram: bool = True) -> Stats:
    """Stats for a linear that received no calibration token (an expert the router never chose):
    an identity Hessian and unit activations, so GPTQ/AWQ reduce to round-to-nearest with their
    grid; logged, since its codes were not fitted to any data."""
    log.warning("%s: no calibration token was routed to it; encoded with an identity Hessian "
                "(round-to-nearest); more calibration samples would cover it", name)
    eye = torch.eye(in_features, dtype=torch.float64)
    one = torch.ones(in_features, dtype=torch.float64)
    return Stats(gram=eye if gram else None, abs_mean=one, sq_mean=one.clone(), n=1)


@lru_cache(maxsize=None)
def _say_no_norm_fold(model_type: str) -> None:
    log.info("awq on %s: each expert's gate/up keep their own input scale (stored, applied to x): the norm "
             "before them also feeds the router and every other expert, so no per-expert scale folds into it; "
             "up → down folds inside each expert", model_type)


def fold_patterns(block: nn.Module) -> list:
    """AWQ fold patterns (``quant.fold.FoldPattern``) inside one block of an MoE: each expert's up
    → down (act(gate) ⊙ up is channel-wise within the expert), and the family's own (a shared
    expert's up → down). Empty for a block without experts."""
    from .quant.fold import FoldPattern

    cfg = next((m.config for m in block.modules() if hasattr(m, "config")), None)  # e.g. self_attn's
    lists = [(n, m) for n, m in block.named_modules() if isinstance(m, ExpertList)]
    if not lists:
        return []
    pats = []
    for name, experts in lists:
        _, up, down = experts[0]._names
        pats += [FoldPattern(f"{name}.{e}.{up}", (f"{name}.{e}.{down}",), "linear") for e in range(len(experts))]
    fam = family(cfg) if cfg is not None else None
    if fam is not None:
        _say_no_norm_fold(cfg.model_type)
        pats += [FoldPattern(p, (c,), "linear") for p, c in fam.folds]
    return pats


_EXPERT = re.compile(r"\.experts\.\d+\.")


def is_expert(name: str) -> bool:
    """A linear inside an ``ExpertList`` (``….mlp.experts.N.w1``)."""
    return _EXPERT.search(name) is not None


def _with_threads(fn: Any, threads: int, *args: Any) -> Any:
    torch.set_num_threads(threads)  # the driver's count: the same arithmetic, so the same bits
    return fn(*args)


def fan_out(fn: Any, jobs: dict[str, tuple], cluster: Any) -> dict[str, Any]:
    """{name: fn(*args)} for a block's expert linears, one Ray task each on ``cluster``
    (``llmpress.cluster.Cluster``). Each encoding depends only on its weight, its Stats and its
    rule, and runs with the driver's torch thread count, so the results are those of one process."""
    threads = torch.get_num_threads()
    task = cluster.remote(_with_threads)
    refs = {name: task.remote(fn, threads, *args) for name, args in jobs.items()}
    return {name: cluster.ray.get(ref) for name, ref in refs.items()}
