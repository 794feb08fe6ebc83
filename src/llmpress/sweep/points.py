"""The configurations a sweep visits: one rate axis, many methods.

A :class:`Point` is data: a label, the family it belongs to, the recipe (rules, as YAML would
hold them) and the exact command that reproduces it. Budgets are lists of points.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError
from ..recipe import Recipe
from ..tensor import codec_names, get_codec


# Points without a one-flag command are reproduced from the recipe the report writes beside it.
RECIPE_COMMAND = "llmpress compress {model} -o {out} --recipe {recipes}/{out}.yaml"


@dataclass(frozen=True)
class Point:
    label: str                       # e.g. "rtn-w4-g128"
    family: str                      # lossless | rtn | gptq | awq | whiten | whiten+q | mixed | gguf-mix | llama.cpp
    recipe: dict[str, Any] | None    # Recipe.to_dict(); None for the lossless codec
    command: str                     # the CLI command that reproduces it ({model} and {out} filled later)
    calib: bool = False              # needs calibration text
    params: dict[str, Any] = field(default_factory=dict)

    def key(self, context: str) -> str:
        """Identity of this point's result under a model + protocol context. The defaults of the
        recipe's methods count too: a result measured before a method changed a default (e.g.
        GPTQ's grid) is not reused for the new one."""
        blob = json.dumps({"ctx": context, "label": self.label, "recipe": self.recipe, "params": self.params,
                           "defaults": method_defaults(self.recipe)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def method_defaults(recipe: dict[str, Any] | None) -> dict[str, Any]:
    """{method: its default parameters} for the methods a recipe dict names."""
    out: dict[str, Any] = {}
    for rule in (recipe or {}).get("rules", []):
        m = rule.get("method")
        if m and m not in out and m in codec_names():
            c = get_codec(m)
            out[m] = {**c.options, **c.grid_defaults}
    return out


def lossless() -> Point:
    return Point("lossless", "lossless", None, "llmpress pack {model} -o {out}.llmp")


def quant(method: str, bits: int, group: int, calib: bool = False, grid: str | None = None,
          options: dict[str, Any] | None = None) -> Point:
    """Uniform ``method`` on every linear; ``grid``: another grid than the method's default (a
    ``--grid`` name, e.g. ``nf``), named in the label; ``options``: the codec's own options (e.g.
    GPTQ's ``static_groups``), named in the label, the point then reproduced from its recipe (no flags
    for them)."""
    options = dict(options or {})
    r = Recipe.uniform(method, bits=bits, group_size=group, grid=grid, **options)
    command = (RECIPE_COMMAND if options else
               f"llmpress quantize {{model}} -o {{out}} --method {method} --bits {bits} --group-size {group}"
               + (f" --grid {grid}" if grid else ""))
    return Point(
        f"{method}-w{bits}-g{group}" + (f"-{grid}" if grid else "")
        + "".join(f"-{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(options.items())),
        method, r.to_dict(), command,
        calib=calib,
    )


# the rotations a sweep point may ask for: label suffix -> (``rotate=`` of compress, its CLI flags); the
# "keep" ones leave the embedding and a tied head as stored (no extra bytes: quant/rotate.py keep_head)
ROTATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "rot": ({}, "--rotate"),
    "rot+mlp": ({"mlp": True}, "--rotate-mlp"),
    "rot+keep": ({"keep_head": True}, "--rotate-keep-head"),
    "rot+mlp+keep": ({"mlp": True, "keep_head": True}, "--rotate-mlp --rotate-keep-head"),
    # no residual rotation, no norm folded: each block norm's readers read its output rotated online
    "rot+in+mlp": ({"inputs": True, "mlp": True}, "--rotate-inputs --rotate-mlp"),
}


def quant_rotated(method: str, bits: int, group: int, rotation: str = "rot+mlp+keep", calib: bool = True,
                  grid: str | None = None, options: dict[str, Any] | None = None) -> Point:
    """:func:`quant` on the rotated model (``quant/rotate.py``; ``rotation`` a key of ``ROTATIONS``;
    ``grid`` and ``options`` the codec's, as :func:`quant`'s)."""
    q = quant(method, bits, group, calib, grid=grid, options=options)
    spec, flag = ROTATIONS[rotation]
    return Point(f"{q.label}+{rotation}", f"{method}+{rotation}", q.recipe, f"{q.command} {flag}", calib=calib,
                 params={"rotate": {**spec}})


# how ``pack`` codes a lossy folder, in a packed point's key: a row measured by an older packer is
# not reused (2: each quantized linear's codes one symbol each, lossless/fields.CodesLayout)
PACKER = 2


def quant_pack(method: str, bits: int, group: int, calib: bool = False) -> Point:
    """Quantized, then what remains packed losslessly (codes and scales entropy-coded)."""
    q = quant(method, bits, group, calib)
    return Point(q.label + "+pack", f"{method}+pack", q.recipe, q.command + " && llmpress pack {out} -o {out}.llmp",
                 calib=calib, params={"pack": True, "packer": PACKER})


def lowrank(method: str, ratio: float) -> Point:
    """Factors stored in float16 (float32 factors would cost twice the bits for nothing)."""
    r = Recipe.uniform(method, ratio=ratio, factor_dtype="float16")
    return Point(f"{method}-r{ratio:g}-f16", method, r.to_dict(), RECIPE_COMMAND, calib=True)


def lowrank_quant(ratio: float, bits: int, group: int) -> Point:
    """Whitened factors, then the factors quantized (codec ``whiten+q``)."""
    r = Recipe.uniform("whiten+q", ratio=ratio, bits=bits, group_size=group)
    return Point(
        f"whiten+q-r{ratio:g}-w{bits}-g{group}", "whiten+q", r.to_dict(),
        RECIPE_COMMAND, calib=True,
    )


def gguf_mix(mix: str, method: str = "gptq") -> Point:
    """llmpress's codes on llama.cpp's types of ``mix``, tensor by tensor (``quantize --gguf-mix``)."""
    return Point(f"{method}-{mix}", "gguf-mix", None,
                 f"llmpress quantize {{model}} -o {{out}} --method {method} --gguf-mix {mix}",
                 calib=get_codec(method).needs_stats, params={"gguf_mix": mix, "method": method})


# llama.cpp's own quantization, reproduced with its tools (the calibration windows are written beside the recipes)
LLAMA_CPP_COMMAND = (
    "llmpress export {model} -o {out}-f32.gguf --format gguf --type f32 && "
    "{imatrix}llama-quantize {imatrix_flag}{out}-f32.gguf {out}.gguf {ftype}")
IMATRIX_COMMAND = ("llama-imatrix -m {out}-f32.gguf -f {recipes}/{calib_file} -c {seq_len} -b {seq_len} "
                   "--chunks {samples} -o {out}.imatrix --no-ppl && ")


def llama_cpp(mix: str, imatrix: bool = True) -> Point:
    """``llama-quantize`` of the F32 GGUF to ``mix``, with an importance matrix from ``llama-imatrix``
    on llmpress's calibration windows when ``imatrix``."""
    from ..integrations.llama_cpp import FTYPES

    cmd = LLAMA_CPP_COMMAND.format(model="{model}", out="{out}", ftype=FTYPES[mix],
                                   imatrix=IMATRIX_COMMAND if imatrix else "",
                                   imatrix_flag="--imatrix {out}.imatrix " if imatrix else "")
    return Point(f"llama.cpp-{mix}" + ("+imatrix" if imatrix else ""), "llama.cpp", None, cmd, calib=imatrix,
                 params={"mix": mix, "imatrix": imatrix})


def _gguf(budget: str) -> list[Point]:
    """llama.cpp's K-quant mixes as llama.cpp makes them (with an importance matrix; in the full
    budget also without) and as llmpress makes them (AWQ's scales with GPTQ's codes on the same
    types; GPTQ and AWQ alone too in the full budget)."""
    full = budget == "full"
    pts = []
    for mix in ("q4_k_m", "q3_k_m", "q2_k"):
        pts += [gguf_mix(mix, "awq+gptq"), llama_cpp(mix, imatrix=True)]
        if full:
            pts += [gguf_mix(mix, "gptq"), gguf_mix(mix, "awq"), llama_cpp(mix, imatrix=False)]
    return pts


# --formats NAME: points of an export format's own types, added to the budget's
FORMATS: dict[str, Callable[[str], list[Point]]] = {"gguf": _gguf}


def format_points(name: str, budget: str) -> list[Point]:
    try:
        return FORMATS[name](budget)
    except KeyError:
        raise InputError(f"unknown format {name!r} for the sweep; known: {', '.join(FORMATS)}") from None


def mixed(target_bpw: float, menu: str = "gptq") -> Point:
    """Per-layer options of ``menu`` allocated to ``target_bpw`` (``llmpress.sweep.mixed``)."""
    return Point(f"mixed-{menu}-{target_bpw:g}bpw", "mixed", None,
                 f"llmpress compress {{model}} -o {{out}} --menu {menu} --target-bpw {target_bpw:g}", calib=True,
                 params={"target_bpw": target_bpw, "menu": menu})


def mixed_pack(target_bpw: float, menu: str = "gptq") -> Point:
    """:func:`mixed`, then what remains packed losslessly (codes and scales entropy-coded)."""
    m = mixed(target_bpw, menu)
    return Point(m.label + "+pack", "mixed+pack", None, m.command + " && llmpress pack {out} -o {out}.llmp",
                 calib=True, params={**m.params, "pack": True, "packer": PACKER})


def _quick() -> list[Point]:
    """The main job's budget, a few CPU-minutes for a 135M model on 2 cores, cheapest informative
    first (the report is rewritten after each): the lossless limit (packing and a verify; its
    figures are the reference's own), then RTN, which needs no calibration, across the range
    (4 bits first: where quality starts to go; then 8 bits, then 3 bits for the knee). The
    near-lossless search then fills the gap below 8 bits with packed RTN rungs in the CPU time left
    (:data:`llmpress.sweep.search.SWEEP_CPU_SECONDS`). GPTQ, AWQ, low-rank and mixed points, each
    several CPU-minutes here, are the full budget's."""
    return [
        lossless(),
        quant("rtn", 4, 64),
        quant("rtn", 8, 128),
        quant("rtn", 3, 64),
    ]


def _full() -> list[Point]:
    pts = [lossless()]
    for bits in (8, 6, 5, 4, 3, 2):
        for g in (32, 64, 128):
            pts.append(quant("rtn", bits, g))
    for method in ("gptq", "awq"):
        for bits, g in ((8, 128), (6, 128), (5, 128), (4, 128), (4, 64), (3, 128), (3, 64), (2, 64)):
            pts.append(quant(method, bits, g, calib=True))
    for bits, g in ((8, 128), (4, 64), (3, 64), (2, 64)):
        pts.append(quant_pack("rtn", bits, g))
    pts.append(quant_pack("gptq", 3, 64, calib=True))
    # GPTQ on the rotated model, the norms not folded (each block norm's readers read its output rotated
    # online: below the fused rotation at 3- and 2-bit g64, bench/rotate.py's inputs variants), its groups
    # fitted as GPTQ reaches them (static_groups false: below static groups on the rotated model, above
    # them on the unrotated one), on the float-offset grid (levels anywhere, no exact zero: the rotated
    # weights are near Gaussian, and 0 on the grid costs them a level; the unrotated model wants the zero),
    # each group's range searched end by end (range mse2: four levels leave a long tail no room)
    for bits in (3, 2):
        pts.append(quant_rotated("gptq", bits, 64, "rot+in+mlp", grid="asym",
                                 options={"static_groups": False, "range": "mse2"}))
    # GPTQ on the normal-float grid (no zero point: fewer bytes a group), which measured below the
    # default integer-zero-point grid at 3-bit g64 (bench/rotate.py --opts grid=nf)
    pts.append(quant("gptq", 3, 64, calib=True, grid="nf"))
    for ratio in (0.95, 0.9, 0.8, 0.6):
        pts.append(lowrank("whiten", ratio))
    pts.append(lowrank_quant(0.9, 4, 64))
    pts.append(lowrank_quant(0.8, 8, 128))
    return pts


BUDGETS: dict[str, Callable[[], list[Point]]] = {"quick": _quick, "full": _full}
# calibration windows (of seq_len tokens) each budget uses unless told otherwise
CALIB_SAMPLES = {"quick": 16, "full": 64}
# targets (bpw) of each budget's mixed-precision points: one sensitivity table serves them all
MIXED_BPW: dict[str, tuple[float, ...]] = {"quick": (), "full": (2.5, 3.0, 3.5, 4.0, 4.5)}
# and the menu they allocate from (the quick one measures a third of the gptq menu's encodings)
MIXED_MENU: dict[str, str] = {"quick": "gptq-quick", "full": "gptq"}


def budget(name: str) -> list[Point]:
    try:
        return BUDGETS[name]()
    except KeyError:
        raise InputError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}") from None
