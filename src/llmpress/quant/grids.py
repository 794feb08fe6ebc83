"""Quantization grids: where the levels sit, how a range is chosen, how a value is rounded.

A weight matrix W (out, in) is viewed in groups (``group_weights``):

* ``group_size > 0``  groups of that many consecutive input columns per output row; the last
  group is ragged when ``in % group_size != 0`` (padded with NaN in the grouped view, never stored);
* ``group_size == -1`` one group per output row (per channel);
* ``group_size == 0``  one group for the whole tensor (per tensor).

The grouped view has shape (R, G, S): R rows of parameters (out, or 1 per tensor), G groups,
S values per group. A grid turns a per-group range [lo, hi] into stored parameters and maps
values to integer codes 0..2^b−1 and back:

=========  ==========================================  ========================
grid       reconstruction                              stored per group
=========  ==========================================  ========================
asym       ŵ = q·s + m,  s = (hi−lo)/(2^b−1), m = lo   scale, offset
asymz      ŵ = (q − z)·s, range widened to hold 0      scale, zero (integer)
sym        ŵ = (q − 2^(b−1))·s,  s = 2a/(2^b−1)         scale
nf         ŵ = c[q]·a,  c the NormalFloat codebook     scale (a = absmax)
seed       ŵ = (2q/(M−1) − 1)·a,  floor rounding        scale (a = absmax)
seed_rtn   the seed grid with round-to-nearest          scale
=========  ==========================================  ========================

:mod:`.presets` adds llama.cpp's scale rules on the sym form (``sym_signed``: s = x₊/−2^(b−1),
signed, the extreme on the one-sided level; ``absmax``: s = a/(2^(b−1)−1)) and the presets
``gguf:q4_0|q4_1|q5_0|q5_1|q8_0`` that fix bits, group 32 and float16 parameters at once;
:mod:`.kquant` the K-quant grids and presets ``gguf:q2_k..q6_k`` (a grid that fits, stores and
reads back its own parameters: :meth:`Grid.fit`, :meth:`Grid.to_data`, :meth:`Grid.group_params`).

(a = max(|lo|, |hi|), M = 2^b.) The asym form with a float offset m reproduces GGUF Q4_1
exactly, which is why SmolLM2's Q4_1-dequantized weights come back bit for bit at 4 bits g32.

**The seed formula.** The seed article quantizes x ∈ [−1, 1] to M levels with
F(x) = floor((x + 1)(M − 1)/2) + 1 ∈ {1..M} (:func:`seed_level`). We store q = F(x) − 1 and
reconstruct the grid point −1 + 2q/(M − 1). Floor rounding sends every x to the grid point at
or below it, so the error is one-sided: E[ŵ − w] ≈ −half a step and the MSE is about 4× that
of rounding to the nearest point of the same grid (uniform error on [−Δ, 0] vs [−Δ/2, Δ/2]).
``seed_bias`` measures it, and ``tests/test_quant_grids.py`` asserts it on real weights (a mean
error of about minus one half-step, an MSE about 4× round-to-nearest's). Because the errors all
share one sign they add up along every dot product instead of cancelling, and the whole model
quantized with ``grid=seed`` is far worse than asymmetric round-to-nearest at the same bits
(``bench/quant.py --configs 4:128 --seed-grid``).

Range choice (``range=``): ``minmax``; ``percentile`` (clip at the ``percentile``-th percentile
of each group, both tails); ``mse`` (shrink the min–max range by factors in
[1 − mse_shrink, 1] and keep, per group, the one with least squared error — or least of a
caller's loss, e.g. AWQ's Hessian-weighted error); ``mse2`` (the same search with each end
shrunk on its own: ``mse2_steps`` factors for lo times as many for hi, so a group whose tails
differ is clipped harder on its longer one — at 2 bits, where four levels must cover the group,
this is worth far more than at 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..device import host_kernels
from .search_kernel import affine_error

BITS = (2, 3, 4, 5, 6, 8)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PER_TENSOR, PER_CHANNEL = 0, -1

# A loss over a quantization error in grouped form: err (R, G, S) with NaN-padding zeroed → (R, G).
GroupLoss = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------- grouping
def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 or group_size >= in_features else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int) -> Tensor:
    """Group of each input column (in,), int64."""
    if group_size <= 0 or group_size >= in_features:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size  # host memory: callers move it where they index


def group_weights(w: Tensor, group_size: int) -> Tensor:
    """(out, in) → (R, G, S); the ragged last group is padded with NaN."""
    out, inp = w.shape
    if group_size == PER_TENSOR:
        return w.reshape(1, 1, out * inp)
    if group_size < 0 or group_size >= inp:
        return w.reshape(out, 1, inp)
    g = num_groups(inp, group_size)
    pad = g * group_size - inp
    if pad:
        w = torch.nn.functional.pad(w, (0, pad), value=float("nan"))
    return w.reshape(out, g, group_size)


def ungroup(wg: Tensor, shape: tuple[int, int] | list[int]) -> Tensor:
    """(R, G, S) → (out, in), dropping the padding."""
    out, inp = shape
    return wg.reshape(out, -1)[:, :inp]


# ---------------------------------------------------------------------------- grids
def _store(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a parameter to its storage dtype (kept as float32 for arithmetic)."""
    return x.to(dtype).to(torch.float32)


def _safe_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return _store(s.clamp_min(1e-7), dtype)


class Grid:
    """Maps per-group ranges to stored parameters, and values to codes and back."""

    name: str = ""
    stored: tuple[str, ...] = ("scale",)

    def params(self, lo: Tensor, hi: Tensor, bits: int, dtype: torch.dtype) -> dict[str, Tensor]:
        raise NotImplementedError

    def quantize(self, w: Tensor, p: dict[str, Tensor], bits: int) -> Tensor:
        """Float codes (integers in 0..2^b−1) for w; p broadcasts against w."""
        raise NotImplementedError

    def dequantize(self, q: Tensor, p: dict[str, Tensor], bits: int) -> Tensor:
        raise NotImplementedError

    def affine(self, p: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(a, s, z) with codes clamp(round((w − a)/s) + z, 0, 2ᵇ−1) and values (q − z)·s + a,
        for grids of that form (compiled GPTQ); None for the others (codebooks)."""
        return None

    @property
    def is_affine(self) -> bool:
        """Whether this grid states an affine form (:meth:`affine` is overridden)."""
        return type(self).affine is not Grid.affine

    # A grid whose parameters are fitted for whole rows at once (K-quant super-blocks) sets this:
    # GPTQ then fits them before its column loop whatever ``static_groups`` says.
    static: bool = False

    def fit(self, wg: Tensor, spec: "GridSpec", loss: GroupLoss) -> dict[str, Tensor]:
        """Parameters (R, G, 1) float32 for grouped weights wg (R, G, S) by ``spec.range``."""
        return RANGES[spec.range](wg, spec, self, loss)

    def check_shape(self, shape: tuple[int, int] | list[int], spec: "GridSpec") -> str | None:
        """Why an (out, in) weight cannot take this grid, or None."""
        return None

    def to_data(self, params: dict[str, Tensor], spec: "GridSpec") -> dict[str, Tensor]:
        """The stored tensors for fitted parameters: each (R, G) in the spec's dtype."""
        return {k: v.squeeze(-1).to(spec.dtype).contiguous() for k, v in params.items()}

    def group_params(self, data: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
        """The parameters :meth:`dequantize` reads, (R, G) float32 each, from the stored tensors."""
        return {k: data[k].to(torch.float32) for k in self.stored}

    def stored_shapes(self, out: int, inp: int, bits: int, group_size: int,
                      dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """The tensors :meth:`to_data` stores for an (out, in) weight: {key: ((R, G), dtypes)}."""
        rows = 1 if group_size == PER_TENSOR else out
        return {k: ((rows, num_groups(inp, group_size)), (dtype,)) for k in self.stored}


GRIDS: dict[str, Grid] = {}
# preset name -> the GridSpec fields it fixes (filled by :mod:`.presets`, e.g. "gguf:q4_0")
PRESETS: dict[str, dict[str, Any]] = {}


def _grid(cls: type[Grid]) -> type[Grid]:
    GRIDS[cls.name] = cls()
    return cls


@_grid
class Asym(Grid):
    name, stored = "asym", ("scale", "offset")

    def params(self, lo, hi, bits, dtype):
        return {"scale": _safe_scale((hi - lo) / (2**bits - 1), dtype), "offset": _store(lo, dtype)}

    def quantize(self, w, p, bits):
        return torch.round((w - p["offset"]) / p["scale"]).clamp_(0, 2**bits - 1)

    def dequantize(self, q, p, bits):
        return q * p["scale"] + p["offset"]

    def affine(self, p, bits):
        return p["offset"], p["scale"], torch.zeros_like(p["scale"])


@_grid
class AsymZero(Grid):
    """Asymmetric with an integer zero point (GPTQ/AWQ/torchao style): the range is widened to
    hold 0 and 0 sits exactly on the grid, ŵ = (q − z)·s (the float-offset grid's points are
    lo + k·s, anywhere relative to 0). Its weight MSE is a little higher than asym's, yet on
    SmolLM2 at 3 bits g128 its whole-model KL is far lower (bench/quant.py, variant rtn-z)."""

    name, stored = "asymz", ("scale", "zero")

    def params(self, lo, hi, bits, dtype):
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = _safe_scale((hi - lo) / (2**bits - 1), dtype)
        return {"scale": s, "zero": torch.round(-lo / s).clamp_(0, 2**bits - 1)}  # integer, exact in fp16/bf16

    def quantize(self, w, p, bits):
        return (torch.round(w / p["scale"]) + p["zero"]).clamp_(0, 2**bits - 1)

    def dequantize(self, q, p, bits):
        return (q - p["zero"]) * p["scale"]

    def affine(self, p, bits):
        return torch.zeros_like(p["scale"]), p["scale"], p["zero"]


@_grid
class Sym(Grid):
    name = "sym"

    def params(self, lo, hi, bits, dtype):
        a = torch.maximum(lo.abs(), hi.abs())
        return {"scale": _safe_scale(2 * a / (2**bits - 1), dtype)}

    def quantize(self, w, p, bits):
        return (torch.round(w / p["scale"]) + 2 ** (bits - 1)).clamp_(0, 2**bits - 1)

    def dequantize(self, q, p, bits):
        return (q - 2 ** (bits - 1)) * p["scale"]

    def affine(self, p, bits):
        return torch.zeros_like(p["scale"]), p["scale"], torch.full_like(p["scale"], 2 ** (bits - 1))


@lru_cache(maxsize=None)
def normal_float_codebook(bits: int, offset: float = 0.9677083) -> Tensor:
    """NormalFloat levels (QLoRA): 2^(b−1) positive and 2^(b−1)−1 negative quantiles of N(0, 1)
    plus an exact zero, scaled to [−1, 1]. bits=4 gives NF4."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 2 ** (bits - 1) + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 2 ** (bits - 1), dtype=torch.float64)[:-1])
    c = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (c / c.max()).to(torch.float32)


class _AbsmaxGrid(Grid):
    def params(self, lo, hi, bits, dtype):
        return {"scale": _safe_scale(torch.maximum(lo.abs(), hi.abs()), dtype)}


@_grid
class NormalFloat(_AbsmaxGrid):
    name = "nf"

    def quantize(self, w, p, bits):
        c = normal_float_codebook(bits).to(w.device)  # the cached codebook lives on the CPU
        mids = (c[1:] + c[:-1]) / 2
        x = torch.nan_to_num(w / p["scale"])
        return torch.bucketize(x.contiguous(), mids).to(torch.float32)

    def dequantize(self, q, p, bits):
        return normal_float_codebook(bits).to(q.device)[q.long()] * p["scale"]


def seed_level(x: Tensor, levels: int) -> Tensor:
    """The seed article's quantizer, exactly: F(x) = floor((x + 1)(M − 1)/2) + 1 for x ∈ [−1, 1]."""
    x = x.to(torch.float64)
    return torch.floor((x + 1) * (levels - 1) / 2) + 1


def seed_value(level: Tensor, levels: int) -> Tensor:
    """Grid point of level k ∈ {1..M}: −1 + 2(k − 1)/(M − 1) (k = F(x) inverts to the point ≤ x)."""
    return -1 + 2 * (level.to(torch.float64) - 1) / (levels - 1)


@_grid
class Seed(_AbsmaxGrid):
    name = "seed"

    def _level(self, x: Tensor, levels: int) -> Tensor:
        return seed_level(x, levels)

    def quantize(self, w, p, bits):
        m = 2**bits
        x = (w / p["scale"]).clamp(-1, 1)
        return (self._level(x, m) - 1).clamp_(0, m - 1).to(torch.float32)

    def dequantize(self, q, p, bits):
        return seed_value(q + 1, 2**bits).to(torch.float32) * p["scale"]


@_grid
class SeedNearest(Seed):
    """The seed grid with round-to-nearest instead of floor: the fair comparison."""

    name = "seed_rtn"

    def _level(self, x, levels):
        return torch.round((x.to(torch.float64) + 1) * (levels - 1) / 2) + 1


# ---------------------------------------------------------------------------- ranges
def _nan_min_max(wg: Tensor) -> tuple[Tensor, Tensor]:
    nan = torch.isnan(wg)
    lo = torch.where(nan, torch.full_like(wg, float("inf")), wg).amin(-1, keepdim=True)
    hi = torch.where(nan, torch.full_like(wg, float("-inf")), wg).amax(-1, keepdim=True)
    return lo, hi


def squared_error(err: Tensor) -> Tensor:
    return (err * err).sum(-1)


def group_hessian_loss(H: Tensor, group_size: int, s: Tensor | None = None) -> GroupLoss:
    """The output error of each group's weight error, err_g · H_gg · err_gᵀ (H = Σ x xᵀ, (in, in),
    the group's diagonal block: the cross-group terms are left out). With ``s`` (in,) the errors
    are those of W·diag(s) (AWQ's scaled space): err_g · (D⁻¹HD⁻¹)_gg · err_gᵀ, D = diag(s)."""
    inp = H.shape[0]
    H = H.to(torch.float32)
    Hs = H if s is None else H / (s[:, None] * s[None, :])  # error e in W·diag(s) space is e/s in W space
    if group_size <= 0 or group_size >= inp:  # one group per row (or the whole tensor)
        if group_size == PER_TENSOR:
            return lambda err: squared_error(err)  # no per-row structure to exploit
        return lambda err: ((err[:, 0] @ Hs) * err[:, 0]).sum(-1, keepdim=True)
    g = num_groups(inp, group_size)
    pad = g * group_size - inp
    Hp = torch.nn.functional.pad(Hs, (0, pad, 0, pad)) if pad else Hs  # no (in, in) copy when groups fit
    idx = torch.arange(g, device=H.device)
    blocks = Hp.reshape(g, group_size, g, group_size)[idx, :, idx, :].contiguous()  # (G, S, S) diagonal blocks

    def loss(err: Tensor) -> Tensor:  # (R, G, S) -> (R, G)
        e = err.transpose(0, 1)  # (G, R, S)
        return (torch.bmm(e, blocks) * e).sum(-1).T  # a batched product: ~1.4x einsum's speed here

    return loss


@dataclass
class GridSpec:
    """How to quantize one tensor. Parsed from recipe params (see :meth:`parse`).

    Sample recipe rule::

        - match: ".*"
          method: rtn
          bits: 4            # 2, 3, 4, 5, 6, 8
          group_size: 128    # >0 groups along the input dim; -1 per channel; 0 per tensor
          sym: false         # asym (scale + offset) or sym (scale only)
          grid: null         # or asymz | nf | seed | seed_rtn | sym_signed | absmax (overrides sym),
                             # or a preset fixing bits/group/dtype too: gguf:q4_0 (see quant/presets.py)
          range: minmax      # minmax | mse | mse2 | percentile
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    grid: str | None = None
    range: str = "minmax"
    percentile: float = 99.9
    mse_steps: int = 32
    mse_shrink: float = 0.6
    mse2_steps: int = 8
    scale_dtype: str = "float16"

    @property
    def grid_name(self) -> str:
        return self.grid or ("sym" if self.sym else "asym")

    @property
    def dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def searched(self) -> bool:
        """Whether the range is chosen by a search over a loss (which a caller may supply)."""
        return self.range in SEARCHED

    def validate(self) -> "GridSpec":
        if isinstance(self.bits, bool) or int(self.bits) != self.bits or self.bits not in BITS:
            raise InputError(f"bits must be one of {', '.join(map(str, BITS))}; got {self.bits!r}")
        if isinstance(self.group_size, bool) or int(self.group_size) != self.group_size or self.group_size < -1:
            raise InputError(f"group_size must be >0 (groups), -1 (per channel) or 0 (per tensor); got {self.group_size!r}")
        if self.grid_name not in GRIDS:
            raise InputError(f"unknown grid {self.grid!r}; known: {', '.join([*GRIDS, *PRESETS])}")
        if self.range not in RANGES:
            raise InputError(f"unknown range {self.range!r}; known: {', '.join(RANGES)}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise InputError(f"percentile must be in (50, 100]; got {self.percentile!r}")
        if not (0.0 < float(self.mse_shrink) < 1.0 and int(self.mse_steps) >= 1 and int(self.mse2_steps) >= 1):
            raise InputError("mse_shrink must be in (0, 1) and mse_steps, mse2_steps ≥ 1")
        if self.scale_dtype not in SCALE_DTYPES:
            raise InputError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
        self.bits, self.group_size = int(self.bits), int(self.group_size)
        return self

    @classmethod
    def parse(cls, params: dict[str, Any]) -> tuple["GridSpec", dict[str, Any]]:
        """Split ``params`` into a validated GridSpec and the remaining (codec-specific) keys."""
        names = {f.name for f in fields(cls)}
        params = expand_preset(params)
        spec = cls(**{k: v for k, v in params.items() if k in names}).validate()
        return spec, {k: v for k, v in params.items() if k not in names}

    def to_meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "grid": self.grid_name, "scale_dtype": self.scale_dtype}


def expand_preset(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with a preset grid (``grid: gguf:q4_0``) replaced by the fields it fixes; a
    field given with another value than the preset's is an error, not silently overridden."""
    name = params.get("grid")
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        return params
    clash = [k for k, v in preset.items() if k != "grid" and params.get(k, v) != v]
    if clash:
        want = ", ".join(f"{k}={preset[k]}" for k in clash)
        got = ", ".join(f"{k}={params[k]}" for k in clash)
        raise InputError(f"grid {name} fixes {want}; got {got}")
    return {**params, **preset}


def _range_minmax(wg: Tensor, spec: GridSpec, grid: Grid, loss: GroupLoss) -> dict[str, Tensor]:
    lo, hi = _nan_min_max(wg)
    return grid.params(lo, hi, spec.bits, spec.dtype)


def _range_percentile(wg: Tensor, spec: GridSpec, grid: Grid, loss: GroupLoss) -> dict[str, Tensor]:
    q = float(spec.percentile) / 100.0
    flat = wg.reshape(-1, wg.shape[-1])
    qs = torch.nanquantile(flat, torch.tensor([1.0 - q, q], dtype=wg.dtype, device=wg.device), dim=-1)  # (2, R*G)
    lo = qs[0].reshape(*wg.shape[:-1], 1)
    hi = qs[1].reshape(*wg.shape[:-1], 1)
    return grid.params(lo, hi, spec.bits, spec.dtype)


def shrink_factors(spec: GridSpec, steps: int) -> list[float]:
    """The clipping searches' factors: ``steps`` values from 1 down to 1 − mse_shrink."""
    return torch.linspace(1.0, 1.0 - float(spec.mse_shrink), int(steps)).tolist()


def _range_mse(wg: Tensor, spec: GridSpec, grid: Grid, loss: GroupLoss) -> dict[str, Tensor]:
    """Shrink [lo, hi] by p ∈ [1 − mse_shrink, 1]; keep per group the p of least loss."""
    return _search(wg, spec, grid, loss, [(p, p) for p in shrink_factors(spec, spec.mse_steps)])


def _range_mse2(wg: Tensor, spec: GridSpec, grid: Grid, loss: GroupLoss) -> dict[str, Tensor]:
    """Shrink lo by p and hi by p', each ∈ [1 − mse_shrink, 1]; keep per group the pair of least loss."""
    ps = shrink_factors(spec, spec.mse2_steps)
    return _search(wg, spec, grid, loss, [(p, q) for p in ps for q in ps])


def _search(wg: Tensor, spec: GridSpec, grid: Grid, loss: GroupLoss,
            shrinks: list[tuple[float, float]]) -> dict[str, Tensor]:
    """The parameters of [p·lo, q·hi] for each (p, q) of ``shrinks``; per group the least loss."""
    lo, hi = _nan_min_max(wg)
    wg = wg.contiguous()
    pad = torch.isnan(wg)
    pad = pad if bool(pad.any()) else None  # a ragged last group's padding
    R, G, S = wg.shape
    compiled = grid.is_affine and host_kernels(wg)  # the compiled pass reads host memory
    buf = torch.empty(G, R, S) if compiled else None  # the affine grids' error, group-major (search_kernel)
    best_p, best_err = None, None
    for p, q in shrinks:
        cand = grid.params(lo * p, hi * q, spec.bits, spec.dtype)
        aff = grid.affine(cand, spec.bits) if compiled else None
        if aff is not None:  # one compiled pass
            a, s, z = (t[..., 0].to(torch.float32).contiguous().numpy() for t in aff)
            affine_error(wg.numpy(), a, s, z, np.float32(2**spec.bits - 1), buf.numpy())
            err = buf.transpose(0, 1)  # (R, G, S) view
        else:
            err = grid.dequantize(grid.quantize(wg, cand, spec.bits), cand, spec.bits).sub_(wg)
            err = err if pad is None else err.masked_fill_(pad, 0.0)
        e = loss(err)  # (R, G)
        if best_err is None:
            best_p, best_err = cand, e
            continue
        better = (e < best_err).unsqueeze(-1)
        best_err = torch.minimum(e, best_err)
        best_p = {k: torch.where(better, cand[k], best_p[k]) for k in cand}
    return best_p


RANGES: dict[str, Callable[[Tensor, GridSpec, Grid, GroupLoss], dict[str, Tensor]]] = {
    "minmax": _range_minmax,
    "mse": _range_mse,
    "mse2": _range_mse2,
    "percentile": _range_percentile,
}
SEARCHED = frozenset({"mse", "mse2"})  # the ranges chosen by a search over a (caller's) loss


# ---------------------------------------------------------------------------- verbs
def fit(wg: Tensor, spec: GridSpec, loss: GroupLoss | None = None) -> dict[str, Tensor]:
    """Stored parameters for grouped weights wg (R, G, S): each (R, G, 1), float32 values
    already rounded to ``spec.scale_dtype``."""
    return GRIDS[spec.grid_name].fit(wg.to(torch.float32), spec, loss or squared_error)


def quantize(w: Tensor, p: dict[str, Tensor], spec: GridSpec) -> Tensor:
    return GRIDS[spec.grid_name].quantize(w, p, spec.bits)


def dequantize(q: Tensor, p: dict[str, Tensor], spec: GridSpec) -> Tensor:
    return GRIDS[spec.grid_name].dequantize(q, p, spec.bits)


def fake_quantize(w: Tensor, spec: GridSpec, loss: GroupLoss | None = None) -> Tensor:
    """Quantize and dequantize (out, in) weights in one go (for searches and tests)."""
    wg = group_weights(w.to(torch.float32), spec.group_size)
    p = fit(wg, spec, loss)
    return ungroup(dequantize(quantize(wg, p, spec), p, spec), w.shape)


def seed_bias(w: Tensor, bits: int = 4, group_size: int = 128) -> dict[str, float]:
    """How much the seed formula's floor rounding costs against round-to-nearest on the same
    grid: mean error in half-steps (−1 = always half a step low) and the MSE ratio."""
    out = {}
    for name in ("seed", "seed_rtn"):
        spec = GridSpec(bits=bits, group_size=group_size, grid=name).validate()
        wg = group_weights(w.to(torch.float32), group_size)
        p = fit(wg, spec)
        err = ungroup(dequantize(quantize(wg, p, spec), p, spec) - wg, w.shape)
        half_step = ungroup((p["scale"] / (2**bits - 1)).expand_as(wg), w.shape)  # Δ/2 = a/(M−1)
        out[name] = ((err / half_step).mean().item(), err.pow(2).mean().item())
    return {
        "mean_err_half_steps_floor": out["seed"][0],
        "mean_err_half_steps_nearest": out["seed_rtn"][0],
        "mse_floor": out["seed"][1],
        "mse_nearest": out["seed_rtn"][1],
        "mse_ratio": out["seed"][1] / out["seed_rtn"][1],
    }
