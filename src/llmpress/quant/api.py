"""``llmpress.quantize``: quantize a model's linear layers into an llmpress folder.

    import llmpress
    llmpress.quantize("smollm2-135m", "out/q4", method="gptq", bits=4, group_size=128)
    llmpress.quantize("smollm2-135m", "out/q4_0", method="gptq", grid="gguf:q4_0")  # llama.cpp's Q4_0
    model = llmpress.load("out/q4")          # linears are QuantLinear; model.generate works

The work is done by the sequential runner (:func:`llmpress.pipeline.compress`): methods that
need calibration (gptq, awq) get the Stats of each linear's inputs, block by block.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingInputError
from ..recipe import KEEP, Recipe
from ..tensor import get_codec
from .codec import QuantCodec

log = logging.getLogger(__name__)


def build_recipe(method: str = "rtn", bits: int | None = None, group_size: int | None = None,
                 recipe: str | Path | Recipe | dict | None = None, **grid_opts: Any) -> Recipe:
    """The recipe of a quantize call: a YAML file / dict / Recipe as given, or the uniform
    recipe (embeddings and head kept, ``method`` everywhere else). ``bits`` / ``group_size``
    left None take :class:`GridSpec`'s defaults (4, 128) or a preset grid's (``gguf:q4_0``)."""
    if recipe is None:
        r = Recipe.uniform(method, bits=bits, group_size=group_size, **grid_opts)
    elif isinstance(recipe, Recipe):
        r = recipe
    elif isinstance(recipe, dict):
        r = Recipe.from_dict(recipe)
    else:
        p = Path(recipe)
        if not p.is_file():
            raise MissingInputError(f"no recipe file {p}")
        r = Recipe.from_yaml(p)
    check_recipe(r)
    return r


def check_recipe(recipe: Recipe) -> None:
    """Validate every rule's method and parameters before any work starts."""
    for i, rule in enumerate(recipe.rules):
        if rule.method == KEEP:
            continue
        codec = get_codec(rule.method)  # KeyError lists the known methods
        if isinstance(codec, QuantCodec):
            try:
                codec.parse(rule.params)
            except ValueError as e:
                raise InputError(f"recipe rule {i} ({rule.match!r}): {e}") from None


def quantize(model: str | Path, out: str | Path, *, method: str = "rtn", bits: int | None = None,
             group_size: int | None = None,
             recipe: str | Path | Recipe | dict | None = None, calib: str | None = None, samples: int = 128,
             seq_len: int = 512, force: bool = False, progress: bool = True, trial_blocks: int | None = None,
             device: str | None = "cpu", workers: int = 1, address: str | None = None, gguf_mix: str | None = None,
             rotate: Any = False, **grid_opts: Any) -> dict[str, Any]:
    """Quantize ``model`` into the folder ``out``; returns the runner's summary (``bpw``,
    ``bytes_in``, ``bytes_out``, ``ratio``, ``seconds``, ``peak_rss_bytes``, ``layers``).
    ``trial_blocks=N`` (gptq, awq): time the first N blocks and write nothing (see
    :func:`llmpress.pipeline.compress`). ``device``: cpu | cuda | auto (see :mod:`llmpress.device`).
    ``gguf_mix=q4_k_m|q3_k_m|q2_k``: llama.cpp's type per linear for that mix (see
    :mod:`llmpress.quant.gguf_mix`), ``method`` on each; excludes ``recipe``, ``bits``, ``group_size``, ``grid``.
    ``rotate=True`` (or ``{"seed": 0, "kind": "auto", "heads": True, "mlp": False, "keep_head": False,
    "inputs": False}``): rotate the residual stream (and each attention head's V→O path) by a fused
    orthogonal matrix first (:mod:`llmpress.quant.rotate`; ``mlp``: an online Hadamard before down_proj
    too; ``keep_head``: the embedding and head as stored, the stream rotated online at its ends;
    ``inputs``: no residual rotation and no norm folded, each block norm's readers reading its output
    rotated online)."""
    from ..pipeline import compress

    if gguf_mix is not None:
        from .gguf_mix import mix_recipe, model_shapes

        clash = [k for k, v in (("recipe", recipe), ("bits", bits), ("group_size", group_size),
                                ("grid", grid_opts.get("grid"))) if v is not None]
        if clash:
            raise InputError(f"gguf_mix fixes each linear's grid: drop {', '.join(clash)}")
        recipe = mix_recipe(gguf_mix, *model_shapes(str(model)), method=method, **grid_opts)
    r = build_recipe(method, bits, group_size, recipe, **grid_opts)
    log.info("quantize %s → %s with %d rule(s)", model, out, len(r.rules))
    return compress(model, r, out, calib=calib, samples=samples, seq_len=seq_len, force=force, progress=progress,
                    extra_meta={"command": "quantize", **({"gguf_mix": gguf_mix.lower()} if gguf_mix else {})}, trial_blocks=trial_blocks, device=device, workers=workers,
                    address=address, rotate=rotate)
