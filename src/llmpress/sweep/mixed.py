"""Mixed precision under a budget: per-layer bit widths that hit a target bits per weight.

Sensitivity is measured once: for every linear layer l and candidate bit width b, the
relative output error of RTN at b bits on calibration activations,

    e_l(b) = tr(D H Dᵀ) / tr(W H Wᵀ),   D = W − Q_b(W),   H = Σ_t x_t x_tᵀ,

and the exact stored bits c_l(b) of that encoding. The allocation starts every layer at the
lowest width and, greedily, upgrades the layer with the largest error decrease per extra bit
stored until the next upgrade would exceed the budget (a Lagrangian walk along each layer's
convex hull of (c, e)). Like llama.cpp's ``--target-bpw``, the result is a recipe with one
rule per layer.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..recipe import KEEP, Recipe, Rule
from ..tensor import Stats, get_codec

log = logging.getLogger(__name__)


@dataclass
class Option:
    bits: int
    cost: int      # bits stored
    err: float     # relative output error


def sensitivity(weights: dict[str, torch.Tensor], stats: dict[str, Stats], bits: tuple[int, ...], group: int,
                method: str = "rtn") -> dict[str, list[Option]]:
    """Options per layer: (bits, stored bits, relative output error) for each width."""
    codec = get_codec(method)
    table: dict[str, list[Option]] = {}
    for name, w in weights.items():
        h = stats[name].gram
        w64 = w.double()
        denom = float(((w64 @ h) * w64).sum().clamp_min(1e-30))
        opts = []
        for b in bits:
            ct = codec.encode(w, None, bits=b, group_size=group)
            d = w64 - codec.decode(ct).double()
            opts.append(Option(b, ct.nbits(), float(((d @ h) * d).sum()) / denom))
        table[name] = sorted(opts, key=lambda o: o.cost)
    return table


def allocate(table: dict[str, list[Option]], target_bpw: float, numel: dict[str, int]) -> dict[str, int]:
    """Greedy allocation of bit widths whose total stored bits stay within target_bpw·N."""
    budget = target_bpw * sum(numel.values())
    choice = {n: 0 for n in table}  # index into each layer's options, cheapest first
    spent = sum(opts[0].cost for opts in table.values())
    if spent > budget:
        raise InputError(f"target {target_bpw} bpw is below the cheapest configuration ({spent / sum(numel.values()):.3f} bpw)")
    while True:
        best, best_gain = None, 0.0
        for n, opts in table.items():
            i = choice[n]
            if i + 1 >= len(opts):
                continue
            nxt, cur = opts[i + 1], opts[i]
            extra = nxt.cost - cur.cost
            if spent + extra > budget:
                continue
            gain = (cur.err - nxt.err) / max(extra, 1)
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            break
        opts = table[best]
        spent += opts[choice[best] + 1].cost - opts[choice[best]].cost
        choice[best] += 1
    return {n: table[n][i].bits for n, i in choice.items()}


def recipe_for(bits: dict[str, int], group: int, method: str = "rtn", keep: str = r"lm_head|embed|wte|wpe|shared") -> Recipe:
    rules = [Rule(keep, KEEP)]
    rules += [Rule(f"^{re.escape(n)}$", method, {"bits": b, "group_size": group}) for n, b in sorted(bits.items())]
    return Recipe(rules)


def mixed_recipe(model: str, target_bpw: float, *, group: int = 64, bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8),
                 calib: str | None = None, samples: int = 16, seq_len: int = 256, progress: bool = False) -> tuple[Recipe, dict[str, Any]]:
    """Measure sensitivities on ``model`` once and return the recipe hitting ``target_bpw``.

    Widths below the uniform width that fits the budget (target − 32/group bits of FP16
    scale and offset) are not offered: a layer pushed to 2 bits to pay for others costs the
    model far more than its relative output error says."""
    floor_bits = math.floor(target_bpw - 32 / group)
    bits = tuple(b for b in bits if b >= floor_bits) or bits
    from .. import skeleton as sk
    from ..models import TensorStore, resolve
    from ..pipeline import collect_stats

    stats = collect_stats(model, calib=calib, samples=samples, seq_len=seq_len, progress=progress)
    src = resolve(model)
    store = TensorStore(src)
    skel = sk.build_meta(sk.folder_config(src.folder))
    conv = {n for n, m in skel.named_modules() if type(m).__name__ == "Conv1D"}
    weights = {}
    for n in stats:
        t = store.get(f"{n}.weight").float()
        weights[n] = t.T if n in conv else t
    table = sensitivity(weights, stats, bits, group)
    alloc = allocate(table, target_bpw, {n: w.numel() for n, w in weights.items()})
    hist = {b: sum(1 for v in alloc.values() if v == b) for b in bits}
    log.info("mixed precision at %.2f bpw: layers per width %s", target_bpw, hist)
    return recipe_for(alloc, group), {"target_bpw": target_bpw, "widths": hist, "bits": alloc}
