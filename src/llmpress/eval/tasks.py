"""``evaluate_tasks``: downstream tasks (lm-evaluation-harness) on a model and its original, side by side.

The perplexity/KL judge (:mod:`.api`) says how far a compressed model's next-token
distributions moved; downstream tasks say what that costs on questions people ask. Both
sides run the same task objects with the same seeds, batch size and thread count, so the
reference's column is exactly what running the original alone gives, and the difference is
paired item by item: its standard error (``delta_se``) comes from the per-item differences,
not from the two stderrs combined (the two models agree on most items, so the paired error
is far smaller, and it is the one that says whether a drop is real).

Models are resolved as :func:`llmpress.evaluate` resolves them (llmpress folders with their
QuantLinear / LowRankLinear layers, originals, embedded names, in-memory modules), and the
reference defaults to the source an llmpress folder names. The models are loaded one at a
time and released after their run. lm-eval is imported only here, when tasks are asked for.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError
from .api import _default_reference, _resolve

log = logging.getLogger(__name__)

__all__ = ["evaluate_tasks", "paired_se"]


def paired_se(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Standard error of mean(a) − mean(b) over the same items: sd(aᵢ − bᵢ)/√n. Far smaller
    than the two stderrs combined when the models agree on most items, which is what a
    compressed copy and its original do; None when the items differ or n < 2."""
    if set(a) != set(b) or len(a) < 2:
        return None
    d = np.array([a[i] - b[i] for i in sorted(a)], dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def evaluate_tasks(model: Any, tasks: str | Sequence[str], reference: Any = None, *, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, threads: int | None = None, seed: int = 0,
                   tokenizer: Any = None, ref_tokenizer: Any = None, bootstrap_iters: int = 1000,
                   quiet: bool | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Run lm-eval ``tasks`` (names, YAML files or folders; a comma-separated string or a list)
    on ``model`` and on ``reference`` (default: the source an llmpress folder names; none for
    an in-memory model).

    ``limit`` keeps the first N items of each task (a fraction when below 1); ``num_fewshot``
    overrides the tasks' own; ``seed`` seeds Python, NumPy, torch and the few-shot sampler
    before each model's run; ``threads`` sets torch's threads for the run. ``quiet=None``
    silences lm-eval unless llmpress logs at INFO. ``device``: cpu | cuda | auto, where both
    models run (None: a loaded model on the CPU, an in-memory one where it is).

    Returns ``{"model", "reference", "tasks": {task: {"n", "num_fewshot", "version",
    "output_type", "group", "metrics": {metric: {"model", "model_stderr", "reference",
    "reference_stderr", "delta", "delta_se", "higher_is_better"}}}}, "protocol", "seconds"}``;
    the reference keys only with a reference. A metric computed through a filter other than
    lm-eval's ``none`` is named ``metric,filter``.
    """
    t0 = time.perf_counter()
    from ..device import resolve_device
    from ..integrations.lm_eval import TaskSuite, require

    dev = resolve_device(device) if device is not None else None
    lm_eval = require()  # a clear error before any model loads when the engines extra is missing

    specs = list(tasks.split(",") if isinstance(tasks, str) else tasks)
    m = _resolve(model, tokenizer, "model")
    if reference is None and not isinstance(model, torch.nn.Module):
        reference = _default_reference(m)
    r = _resolve(reference, ref_tokenizer, "reference") if reference is not None else None
    for side in (m, r):
        if side is not None:
            side.device = dev  # lm-eval's HFLM runs a module given to it where the module is
        if side is not None and not side.is_causal():
            raise InputError(f"lm-eval tasks need a causal LM; {side.name} is not one")
    # tasks (and their data) load before any model: an unknown task or unreachable data fails fast
    suite = TaskSuite.load(specs, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, quiet=quiet)
    with _torch_threads(threads) as n_threads:
        log.info("running %d task(s) on %s", len(suite.tasks), m.name)
        mine = suite.run(m.module(), m.tokenizer, batch_size=batch_size, seed=seed, quiet=quiet)
        m.release()
        theirs = None
        if r is not None:
            log.info("running them on the reference %s", r.name)
            theirs = suite.run(r.module(), r.tokenizer, batch_size=batch_size, seed=seed, quiet=quiet)
            r.release()

    out_tasks: dict[str, Any] = {}
    for name, metrics in mine.metrics.items():
        rows: dict[str, dict[str, Any]] = {}
        for key, v in metrics.items():
            row = {"model": v["value"], "model_stderr": v["stderr"], "higher_is_better": v["higher_is_better"]}
            ref = theirs.metrics.get(name, {}).get(key) if theirs is not None else None
            if ref is not None:
                a, b = mine.per_item.get(name, {}).get(key), theirs.per_item.get(name, {}).get(key)
                row.update(reference=ref["value"], reference_stderr=ref["stderr"], delta=v["value"] - ref["value"],
                           delta_se=paired_se(a, b) if a is not None and b is not None else None)
            rows[key] = row
        out_tasks[name] = {**mine.info[name], "metrics": rows}
    protocol = {"tasks": specs, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed,
                "threads": n_threads, "bootstrap_iters": bootstrap_iters, "lm_eval": getattr(lm_eval, "__version__", None),
                "paired": "delta_se = sd of per-item differences / sqrt(n), for metrics that are means over items"}
    return {"model": m.name, "reference": r.name if r is not None else None, "tasks": out_tasks, "protocol": protocol,
            "seconds": time.perf_counter() - t0}
