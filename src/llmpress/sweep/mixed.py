"""Mixed precision under a budget: one option of a menu per linear layer, chosen exactly.

The menu (:mod:`.menu`) gives each layer its options and their exact stored cost; the
sensitivity table (:mod:`.sensitivity`) each option's predicted ΔKL on calibration tokens; the
solver (:mod:`.knapsack`) the choice minimizing Σ ΔKL under the byte budget. The result is a
recipe with one exact-name rule per layer (embeddings and head kept) and a summary.

Budgets: ``target_bpw`` counts the allocated layers' stored bits per weight (what ``compress``
reports as ``bpw``); ``target_bytes`` is the whole output — for the ``gguf`` menu the file that
``llmpress export OUT --format gguf --type <kept_type>`` writes (header, metadata, the kept
tensors in ``kept_type``, norms in F32: :func:`llmpress.targets.gguf_size.fixed_bytes`), for the
others the tensor data of the output folder (the kept tensors as stored, safetensors headers
not counted).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..recipe import KEEP, Recipe, Rule
from .knapsack import TOL, solve, units
from .sensitivity import KEEP as KEEP_RX, Choice, Table, load_or_measure
from ..errors import InputError

log = logging.getLogger(__name__)


def allocate(table: Table, budget_bits: float, tol: float = TOL) -> tuple[dict[str, Choice], int]:
    """The choice per layer minimizing the summed predicted ΔKL with stored bits ≤ ``budget_bits``,
    and the cost unit (bits) the solver rounded to."""
    names = sorted(table.layers)
    costs, cap, unit = units([[c.bits for c in table.layers[n]] for n in names], budget_bits, tol)
    pick = solve(costs, [[c.dkl for c in table.layers[n]] for n in names], cap)
    if pick is None:
        least = sum(min(c.bits for c in table.layers[n]) for n in names)
        raise InputError(f"the budget ({budget_bits / 8:,.0f} bytes for the allocated layers) is below the cheapest "
                         f"choice of the menu ({least / 8:,.0f} bytes, {least / sum(table.numel.values()):.3f} bpw)")
    log.debug("knapsack: %d layers, capacity %d units of %d bits", len(names), cap, unit)
    return {n: table.layers[n][o] for n, o in zip(names, pick)}, unit


def recipe_for(choice: dict[str, Choice], keep: str = KEEP_RX) -> Recipe:
    rules = [Rule(keep, KEEP)]
    rules += [Rule(f"^{re.escape(n)}$", c.option.method, c.option.params) for n, c in sorted(choice.items())]
    return Recipe(rules)


def summary(table: Table, choice: dict[str, Choice], budget_bits: float, unit: int, fixed_bytes: int | None) -> dict[str, Any]:
    bits = sum(c.bits for c in choice.values())
    n = sum(table.numel.values())
    out = {
        "menu": table.meta.get("menu"),
        "method": table.meta.get("method"),
        "predicted_dkl": sum(c.dkl for c in choice.values()),
        "bpw": bits / n,
        "layer_bytes": bits / 8,
        "budget_layer_bytes": budget_bits / 8,
        "options": dict(sorted(Counter(c.option.label for c in choice.values()).items())),
        "layers": len(choice),
        "unit_bits": unit,
        "sensitivity_seconds": table.meta.get("seconds"),
    }
    if fixed_bytes is not None:
        out.update(fixed_bytes=fixed_bytes, predicted_bytes=fixed_bytes + bits // 8)
    return out


def fixed_bytes(model: str, table: Table, kept_type: str = "q8_0") -> int:
    """What the output holds besides the allocated layers (see the module's docstring)."""
    if table.meta.get("menu") == "gguf":
        from ..targets.gguf_size import fixed_bytes as gguf_fixed

        return gguf_fixed(model, {f"{n}.weight" for n in table.layers}, kept_type)
    from safetensors import safe_open

    from ..models import resolve, safetensors_files

    allocated = {f"{n}.weight" for n in table.layers}
    total = 0
    for f in safetensors_files(resolve(model)):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k not in allocated:
                    sl = h.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= int(d)
                    total += n * _DTYPE_BYTES[sl.get_dtype()]
    return total


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def mixed_recipe(model: str, *, target_bpw: float | None = None, target_bytes: int | None = None, menu: str = "gptq",
                 method: str | None = None, kept_type: str = "q8_0", calib: str | None = None, samples: int = 32,
                 seq_len: int = 512, cache: Path | None = None, progress: bool = False,
                 device: str | None = "cpu") -> tuple[Recipe, dict[str, Any]]:
    """The recipe of ``menu`` options that minimizes the predicted ΔKL within ``target_bpw`` (stored
    bits per allocated weight) or ``target_bytes`` (the whole output); and its summary. ``cache``:
    a JSON file keeping the sensitivity table for further targets."""
    from .menu import check_menu

    if (target_bpw is None) == (target_bytes is None):
        raise InputError("give one of target bpw or target bytes")
    if (target_bpw is not None and target_bpw <= 0) or (target_bytes is not None and target_bytes <= 0):
        raise InputError("the target must be positive")
    check_menu(menu, method)
    table = load_or_measure(cache, model, menu, method, calib=calib, samples=samples, seq_len=seq_len,
                            progress=progress, device=device)
    fixed = None
    if target_bytes is not None:
        fixed = fixed_bytes(model, table, kept_type)
        budget = 8 * (target_bytes - fixed)
        if budget <= 0:
            raise InputError(f"target {target_bytes:,} bytes: the parts not allocated already take {fixed:,} bytes")
    else:
        budget = target_bpw * sum(table.numel.values())
    choice, unit = allocate(table, budget)
    s = summary(table, choice, budget, unit, fixed)
    s.update(target_bpw=target_bpw, target_bytes=target_bytes)
    if menu == "gguf":
        s["kept_type"] = kept_type
    log.info("allocation (%s menu): %.3f bpw, predicted ΔKL %.4f, options %s", menu, s["bpw"], s["predicted_dkl"], s["options"])
    return recipe_for(choice), s


def compress_to_target(model: str, out: str | Path, *, target_bpw: float | None = None, target_bytes: int | None = None,
                       menu: str = "gptq", method: str | None = None, kept_type: str = "q8_0", calib: str | None = None,
                       samples: int = 128, seq_len: int = 512, force: bool = False, progress: bool = True,
                       device: str | None = "cpu") -> dict[str, Any]:
    """Allocate ``menu``'s options to the target, compress ``model`` by the chosen recipe into
    ``out`` and write the recipe beside it (``out/recipe.yaml``); the summary has ``allocation``."""
    from ..io.atomic import atomic_file, check_output
    from ..pipeline import compress
    from .menu import check_menu

    out = Path(out)
    check_output(out, force)  # before minutes of measurement
    check_menu(menu, method)
    recipe, alloc = mixed_recipe(model, target_bpw=target_bpw, target_bytes=target_bytes, menu=menu, method=method,
                                 kept_type=kept_type, calib=calib, samples=samples, seq_len=seq_len, progress=progress,
                                 device=device)
    res = compress(model, recipe, out, calib=calib, samples=samples, seq_len=seq_len, force=force, progress=progress,
                   device=device, extra_meta={"allocation": alloc})
    with atomic_file(out / "recipe.yaml", force=True) as tmp:
        tmp.write_text(recipe.to_yaml())
    res["recipe_file"] = str(out / "recipe.yaml")
    return res
