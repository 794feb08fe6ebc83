"""``llmpress.factorize``: build a low-rank recipe and run it through the sequential pipeline.

Rank choice, in order of precedence: ``rank`` (every layer), ``energy`` (per layer, the smallest
k keeping that fraction of Σσ² of the method's own matrix: W, W·S or W·diag(s)), ``ratio`` (the
fraction of linear-layer parameters *kept*, default 0.8 = 20 % removed). With
``allocation="budget"`` the same total parameter budget is spread over the layers by their
measured sensitivity (``allocate.allocate_budget``), each layer keeping at least ``floor``.

Embeddings and the LM head are kept as they are (``KEEP``); "linear-layer parameters" are those
of the other linear layers, and ``params_kept`` in the result is their stored count over their
dense count, exact: k(m + n) for a factorized layer, m·n for one left dense.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from llmpress.recipe import KEEP, Recipe, Rule
from llmpress.tensor import Stats, get_codec

from ..errors import InputError
from .allocate import LayerSpectrum, allocate_budget, allocated_params, check_energy, check_ratio, exact_rule
from .base import LowRankCodec

log = logging.getLogger(__name__)

KEEP_DEFAULT = r"lm_head|embed|wte|wpe|shared"
ALLOCATIONS = ("uniform", "budget")


def uniform_recipe(method: str, *, ratio: float | None = 0.8, energy: float | None = None, rank: int | None = None,
                   keep: str = KEEP_DEFAULT, **params: Any) -> Recipe:
    """Keep embeddings and head; every other linear by ``method`` at one rank rule."""
    if rank is not None:
        params["rank"] = rank
    elif energy is not None:
        params["energy"] = check_energy(energy)
    else:
        params["ratio"] = check_ratio(ratio if ratio is not None else 0.8)
    return Recipe([Rule(keep, KEEP), Rule(".*", method, {k: v for k, v in params.items() if v is not None})])


def layer_spectra(model: str | Path, method: str = "whiten", *, keep: str = KEEP_DEFAULT, calib: str | None = None,
                  samples: int = 128, seq_len: int = 512, progress: bool = True, device: str | None = "cpu",
                  **params: Any) -> list[LayerSpectrum]:
    """Each linear's singular values of the method's matrix (W, W·S, W·diag(s)) on the ORIGINAL
    model: ‖(W − W_k)S‖² = Σ_{i>k} σ_i², the measured sensitivity the budget is spent on.

    The spectrum is the whole error-vs-rank curve of the layer, so it is all that is kept: the
    calibration statistics arrive one block at a time (``pipeline.iter_stats``), each block's
    curves are taken while its Gram matrices are in hand, and those are freed before the next
    block runs. Peak memory: one block's Gram matrices, not every layer's."""
    from llmpress import skeleton as sk
    from llmpress.device import resolve_device
    from llmpress.models import TensorStore, resolve
    from llmpress.pipeline import iter_stats

    dev = resolve_device(device)
    codec = get_codec(method)
    if not isinstance(codec, LowRankCodec):
        raise InputError(f"budgeted allocation needs one of the low-rank methods svd, rsvd, whiten, asvd; got {method!r}")
    src = resolve(model)
    store = TensorStore(src)
    skel = sk.build_meta(sk.folder_config(src.folder))
    rx = re.compile(keep)
    names = [n for n in sk.linear_names(skel) if not rx.search(n)]
    conv1d = {n for n in names if type(sk.get_module(skel, n)).__name__ == "Conv1D"}
    extra = {**codec.extra, **{k: v for k, v in params.items() if k in codec.extra}}

    def spectrum(name: str, stats: Stats | None) -> LayerSpectrum:
        w = store.get(f"{name}.weight").to(dev).float()
        if name in conv1d:
            w = w.T
        t = codec.transform(w, stats, **extra)
        a = w.double() if t is None else t.apply(w.double())  # (m, n)
        s2 = (torch.linalg.svdvals(a) ** 2).cpu()
        return LayerSpectrum(name, w.shape[0], w.shape[1], s2, float((a * a).sum()))

    got: dict[str, LayerSpectrum] = {}
    if codec.needs_stats:
        for block in iter_stats(model, calib=calib, samples=samples, seq_len=seq_len, gram=codec.gram,
                                progress=progress, match="|".join(exact_rule(n) for n in names), device=dev):
            for name in [n for n in names if n in block]:
                got[name] = spectrum(name, block[name])
            block.clear()  # the Gram matrices go now, before the next block's are built
    # Layers outside the blocks (or never reached by calibration) get no stats: the codec says so.
    return [got[n] if n in got else spectrum(n, None) for n in names]


def budget_recipe(spectra: list[LayerSpectrum], method: str, ratio: float, *, floor: float = 0.1,
                  keep: str = KEEP_DEFAULT, **params: Any) -> tuple[Recipe, dict[str, int | None]]:
    """One rule per layer with its allocated rank (``keep`` for a layer left dense)."""
    ranks = allocate_budget(spectra, ratio, floor=floor)
    rules = [Rule(keep, KEEP)]
    for sp in spectra:
        k = ranks[sp.name]
        rules.append(Rule(exact_rule(sp.name), KEEP) if k is None else Rule(exact_rule(sp.name), method, {**params, "rank": k}))
    log.info("budget: %d of %d linear parameters", allocated_params(spectra, ranks), sum(s.m * s.n for s in spectra))
    return Recipe(rules), ranks


def summarize(result: dict[str, Any], manifest: dict[str, Any], keep: str = KEEP_DEFAULT) -> dict[str, Any]:
    """Ranks per layer, the layers left dense, and the exact parameter count kept."""
    rx = re.compile(keep)
    ranks: dict[str, int | None] = {}
    dense: list[str] = []
    solvers: dict[str, int] = {}  # which SVD ran, per factorized layer (rsvd hands over to exact past its crossover)
    p_in = p_out = 0
    for name, rep in result["layers"].items():
        if rx.search(name):
            continue
        entry = manifest["tensors"].get(f"{name}.weight")
        meta = entry["meta"] if entry else {}
        n_el = int(rep["numel"])
        p_in += n_el
        if entry is None or "rank" not in meta:  # kept, or quantized only
            ranks[name] = None
            p_out += n_el
            continue
        m, n = meta["shape"]
        k = int(meta["rank"])
        if "solver" in meta:
            solvers[meta["solver"]] = solvers.get(meta["solver"], 0) + 1
        if meta.get("dense"):
            ranks[name] = None
            dense.append(name)
            p_out += m * n
        elif entry["codec"] == "lqer":  # dense quantized weight plus a correction
            ranks[name] = k
            p_out += m * n + k * (m + n)
        else:
            ranks[name] = k
            p_out += k * (m + n)
    if dense:
        log.warning("%d layer(s) left dense (their rank saved nothing): %s", len(dense), ", ".join(dense))
    return {"ranks": ranks, "dense_layers": dense, "linear_params_in": p_in, "linear_params_out": p_out,
            "params_kept": p_out / max(1, p_in), "solvers": solvers}


def factorize(
    model: str | Path,
    out: str | Path,
    *,
    method: str = "whiten",
    ratio: float | None = 0.8,
    energy: float | None = None,
    rank: int | None = None,
    allocation: str = "uniform",
    floor: float = 0.1,
    recipe: Recipe | str | Path | None = None,
    calib: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    force: bool = False,
    progress: bool = True,
    device: str | None = "cpu",
    **params: Any,
) -> dict[str, Any]:
    """Factorize ``model``'s linear layers into ``out`` (an llmpress folder; ``llmpress.load`` reads it).

    Returns the pipeline's summary (``bpw``, ``bytes_in``, ``bytes_out``, ``ratio`` = bytes_out /
    bytes_in, ``seconds``, ``peak_rss_bytes``, ``layers``) plus ``ranks`` per layer, ``dense_layers``
    and ``params_kept`` (stored / dense linear parameters). Extra ``params`` go to the codec
    (``damp``, ``alpha``, ``solver``, ``factor_dtype``, or a combo's quant params). ``device``:
    cpu | cuda | auto, where calibration, Gram matrices and the SVDs run.
    """
    from llmpress.device import resolve_device
    from llmpress.io.folder import read_manifest
    from llmpress.pipeline import compress

    resolve_device(device)  # a device that cannot be used fails before any work
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
    ranks_plan = None
    if recipe is not None:
        rec = recipe if isinstance(recipe, Recipe) else Recipe.from_yaml(recipe)
    else:
        get_codec(method)  # a clear error for an unknown method, before any work
        if allocation == "budget":
            if rank is not None or energy is not None:
                raise InputError("budgeted allocation takes a ratio (the total budget), not a rank or energy")
            r = check_ratio(ratio if ratio is not None else 0.8)
            spectra = layer_spectra(model, method, calib=calib, samples=samples, seq_len=seq_len, progress=progress,
                                    device=device, **params)
            rec, ranks_plan = budget_recipe(spectra, method, r, floor=floor, **params)
        else:
            rec = uniform_recipe(method, ratio=ratio, energy=energy, rank=rank, **params)
    meta = {"factorize": {"method": method, "allocation": allocation, "ratio": ratio, "energy": energy, "rank": rank,
                          "floor": floor if allocation == "budget" else None}}
    res = compress(model, rec, out, calib=calib, samples=samples, seq_len=seq_len, force=force, progress=progress,
                   extra_meta=meta, device=device)
    res.update(summarize(res, read_manifest(Path(out))))
    if ranks_plan is not None:
        res["allocation"] = ranks_plan
    if res["solvers"].get("randomized") is not None or method.startswith("rsvd"):
        log.info("SVD solvers that ran: %s (randomized requests past the crossover run exact SVD, being no slower)",
                 ", ".join(f"{k} {v} layers" for k, v in sorted(res["solvers"].items())) or "none")
    for name, k in res["ranks"].items():
        log.info("%s: %s", name, "dense" if k is None else f"rank {k}")
    return res
