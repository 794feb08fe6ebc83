"""Grids found in float tensors: values that are exactly a block quantizer's dequantized codes.

A checkpoint dequantized from a quantized file (the embedded SmolLM2: GGUF Q4_1 linears and a
Q8_0 embedding, widened to FP32 by gguf-py) holds a few distinct values per block: each block of
``block`` consecutive values along a row is one of

- ``scale``:  x = d · (s − zero)          (GGUF Q4_0, Q5_0, Q8_0; symmetric RTN grids)
- ``affine``: x = (d · s) + m             (GGUF Q4_1, Q5_1)

with ``s`` an unsigned ``bits``-bit code and the block's ``d`` (and ``m``) stored in ``params``
(F16, BF16 or F32), computed in float32 with round-to-nearest-even and one rounding per
operation (no fused multiply-add): gguf-py's order, which made the file. Such a tensor is coded
as its codes (one symbol each) and its parameters (each split into its own float fields), a
fraction of its float fields' entropy.

Nothing here trusts the model: :func:`fit` recovers codes and parameters for a chunk (the
per-value loops compiled in grid_kernel.py), recomputes every value with :func:`reconstruct` (the
decoder's own numpy float32 arithmetic) and compares the bits; :func:`split` gives the grid's
fields only when every block of the chunk reproduces, and the chunk takes the float path
otherwise. Detection (:func:`detect`) tries every candidate on the tensor's first block, then on
a sample, and costs a few numpy operations on a tensor that is not gridded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .compiled import Kernels
from .fields import LAYOUTS, Field, FloatLayout

K = Kernels("grid_kernel")  # resolved at first use: unpack never fits a grid, so never loads them

FORMULAS = ("scale", "affine")
BLOCKS = (256, 128, 64, 32, 16)  # tried largest first: fewer parameters
PARAMS = ("F16", "BF16", "F32")  # tried in this order: smaller parameters first
MAX_BITS = 16  # codes are field symbols (1..16 bits)
DETECT_BITS = 8  # detection looks for codes of at most this many bits
TENSOR_DTYPES = ("F32",)  # tensors whose values are the float32 result itself
SAMPLE = 1 << 14  # values of a tensor's start that a detected grid must reproduce

# gguf-py's block types as grids: (formula, bits, zero, block, params) -> name, for reports
GGUF_NAMES: dict[tuple[str, int, int, int, str], str] = {
    ("scale", 4, 8, 32, "F16"): "Q4_0",
    ("affine", 4, 0, 32, "F16"): "Q4_1",
    ("scale", 5, 16, 32, "F16"): "Q5_0",
    ("affine", 5, 0, 32, "F16"): "Q5_1",
    ("scale", 8, 128, 32, "F16"): "Q8_0",
}


@dataclass(frozen=True)
class Grid:
    """One tensor's grid (the segment's ``grid`` in the index)."""

    formula: str  # "scale" | "affine"
    block: int  # values per block, consecutive along the last dimension
    params: str  # dtype of d (and m)
    bits: int  # code width
    zero: int  # scale: the code of 0 (x = d·(s − zero)); affine: 0

    @property
    def nparams(self) -> int:
        return 2 if self.formula == "affine" else 1

    @property
    def player(self) -> FloatLayout:
        return LAYOUTS[self.params]  # type: ignore[return-value]

    @property
    def fields(self) -> tuple[Field, ...]:
        pf = self.player.fields
        names = ("d", "m")[: self.nparams]
        return (Field("codes", self.bits),) + tuple(Field(f"{p}.{f.name}", f.width) for p in names for f in pf)

    def symbols(self, words: int) -> list[int]:
        """Symbols in each field of a chunk of ``words`` values."""
        return [words] + [words // self.block] * (len(self.fields) - 1)

    def to_index(self) -> dict[str, Any]:
        return {"formula": self.formula, "block": self.block, "params": self.params, "bits": self.bits,
                "zero": self.zero}

    @classmethod
    def from_index(cls, rec: Any) -> "Grid":
        """The grid of an index record; ValueError if any field is out of the format's range."""
        if not isinstance(rec, dict) or set(rec) != {"formula", "block", "params", "bits", "zero"}:
            raise ValueError(f"grid record {rec!r}: wrong keys")
        g = cls(rec["formula"], rec["block"], rec["params"], rec["bits"], rec["zero"])
        ints = all(type(v) is int for v in (g.block, g.bits, g.zero))
        if not (ints and g.formula in FORMULAS and g.block in BLOCKS and g.params in PARAMS
                and 1 <= g.bits <= MAX_BITS and 0 <= g.zero < 1 << g.bits and (g.formula == "scale" or g.zero == 0)):
            raise ValueError(f"grid record {rec!r}: out of range")
        return g

    def short(self) -> str:
        """A table cell: the GGUF type's name where the grid is one, else formula/bits/block/params."""
        name = GGUF_NAMES.get((self.formula, self.bits, self.zero, self.block, self.params))
        return name or f"{self.formula}{self.bits}/b{self.block}/{self.params}"

    def describe(self) -> str:
        name = GGUF_NAMES.get((self.formula, self.bits, self.zero, self.block, self.params))
        form = f"d·(q−{self.zero})" if self.formula == "scale" else "d·q+m"
        return f"{form}, {self.bits}-bit codes, block {self.block}, {self.params} params" + (f" (GGUF {name})" if name else "")


# ---------------------------------------------------------------- parameter dtypes


def _param_words(v: np.ndarray, params: str) -> np.ndarray:
    """Nearest ``params`` value of float64 ``v``, as unsigned words (sign-magnitude order)."""
    if params == "F16":
        with np.errstate(over="ignore"):
            return v.astype(np.float16).view(np.uint16)
    f = v.astype(np.float32)
    if params == "F32":
        return f.view(np.uint32)
    u = f.view(np.uint32).astype(np.uint64)  # BF16: round to nearest even on the top half
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def param_values(w: np.ndarray, params: str) -> np.ndarray:
    """float32 values of ``params`` words (exact)."""
    if params == "F16":
        return w.view(np.float16).astype(np.float32)
    if params == "BF16":
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w.view(np.float32)


def _exact_words(x: np.ndarray, params: str) -> tuple[np.ndarray, np.ndarray]:
    """(words, representable) of float32 ``x`` in ``params``: representable where the word's value
    has the same bits as ``x``."""
    w = _param_words(x.astype(np.float64), params)
    return w, param_values(w, params).view(np.uint32) == x.view(np.uint32)


# ---------------------------------------------------------------- the formulas (float32, gguf-py's order)


def reconstruct(grid: Grid, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """float32 values (nb·block,) of codes (nb·block,) and block parameters (nb,) as float32,
    into ``out`` if given: each operation a numpy float32 ufunc (one rounding each, no FMA)."""
    x = np.empty(len(codes), np.float32) if out is None else out
    q = x.reshape(-1, grid.block)
    q[:] = codes.reshape(q.shape)  # exact: small integers
    if grid.formula == "scale":
        if grid.zero:
            q -= np.float32(grid.zero)
        q *= d[:, None]
        return x
    q *= d[:, None]
    q += m[:, None]  # type: ignore[index]
    return x


# ---------------------------------------------------------------- fitting one chunk


@dataclass
class Fit:
    codes: np.ndarray  # (n,) uint8 / uint16 symbols
    d: np.ndarray  # (nb,) params words
    m: np.ndarray | None  # (nb,) params words (affine)
    ok: np.ndarray  # (nb,) bool: the block reproduces bit for bit


def _code_dtype(bits: int) -> type:
    return np.uint8 if bits <= 8 else np.uint16


# neighbours of d's estimate (in ulps of ``params``) tried, nearest first: (max − m)/(2^b − 1) is
# off by the roundings of d·q and of + m, a few ulps of a 16-bit d, up to ~ulp(m)/ulp(d)/2^b of an F32 d
_DELTAS = {p: tuple(sorted(range(-r, r + 1), key=lambda v: (abs(v), v))) for p, r in (("F16", 2), ("BF16", 2), ("F32", 24))}


def _fit_affine(x: np.ndarray, params: str, bits: int, zero: int = 0) -> Fit:
    """m = the block's minimum (the value of code 0), d near (max − m)/(2^bits − 1), tried at the
    nearest ``params`` value and its neighbours (:data:`_DELTAS`); codes by rounding (proposed by
    grid_kernel.affine_codes); each block recomputed here and checked bit for bit."""
    k = (1 << bits) - 1
    nb = x.shape[0]
    x = np.ascontiguousarray(x)
    m, mx = np.empty(nb, np.float32), np.empty(nb, np.float32)
    K.block_minmax(x, m, mx)
    mw, ok_m = _exact_words(m, params)
    ok_m &= np.isfinite(m) & np.isfinite(mx)
    dw0 = _param_words((mx.astype(np.float64) - m.astype(np.float64)) / k, params).astype(np.int64)
    deltas = np.array(_DELTAS[params], np.int64)
    cw = np.clip(dw0[None, :] + deltas[:, None], 0, None).astype(mw.dtype)  # (nc, nb) candidate words
    cand = np.ascontiguousarray(param_values(cw.reshape(-1), params).reshape(cw.shape))
    codes = np.zeros(x.shape, _code_dtype(bits))
    pick = np.empty(nb, np.int64)
    K.affine_codes(x, m, cand, k, codes, pick)
    ok = ok_m & (pick >= 0)
    dw = cw[np.maximum(pick, 0), np.arange(nb)]
    rec = reconstruct(Grid("affine", x.shape[1], params, bits, 0), codes.reshape(-1), param_values(dw, params),
                      param_values(mw, params))
    return Fit(codes.reshape(-1), dw, mw, ok & _same_blocks(rec, x))


def _same_blocks(rec: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(nb,) bool: block b of ``rec`` (flat float32) has the bits of ``x[b]`` ((nb, B) float32)."""
    a, b = rec.view(np.uint32), x.view(np.uint32).reshape(-1)
    if np.array_equal(a, b):
        return np.ones(x.shape[0], bool)
    return (a.reshape(x.shape) == x.view(np.uint32)).all(1)


def _fit_scale(x: np.ndarray, params: str, bits: int, zero: int | None = None) -> Fit:
    """x = d·c with c an integer: in units of the block's smallest exponent every value is an
    integer I, and d is the gcd of the I (grid_kernel.scale_gcd), or that divided by a small
    integer t where the gcd is not a ``params`` value; d's sign gives −0 where the block holds −0.
    Each block is then recomputed here and checked bit for bit."""
    zero = 1 << (bits - 1) if zero is None else zero
    lo, hi = -zero, (1 << bits) - 1 - zero
    nb, B = x.shape
    u = np.ascontiguousarray(x).view(np.uint32)
    G, emin = np.empty(nb, np.int64), np.empty(nb, np.int64)
    c = np.empty((nb, B), np.int64)
    cmin, cmax, flags = np.zeros(nb, np.int64), np.zeros(nb, np.int64), np.empty(nb, np.int64)
    K.scale_gcd(u, G, emin, c, cmin, cmax, flags)
    neg0, pos0 = (flags & 1) > 0, (flags & 2) > 0
    todo = np.flatnonzero((flags & 4) == 0)
    sgn = np.ones(nb, np.int64)
    tt = np.ones(nb, np.int64)
    dw = np.zeros(nb, _param_words(np.zeros(1), params).dtype)
    done = np.zeros(nb, bool)
    for t in range(1, max(-lo, hi) + 1):  # d = G/t: codes t·c (wider with t: stops once out of range)
        if t > 1:
            todo = todo[G[todo] > 0]
        if not len(todo):
            break
        dabs = np.ldexp(G[todo].astype(np.float64) / t, (emin[todo] - 150).astype(np.int64))
        w, rep = _exact_words(dabs.astype(np.float32), params)
        rep &= dabs.astype(np.float32).astype(np.float64) == dabs
        a, z = cmin[todo] * t, cmax[todo] * t
        pos_ok = rep & ~neg0[todo] & (a >= lo) & (z <= hi)
        neg_ok = rep & ~pos0[todo] & (-z >= lo) & (-a <= hi) & ~pos_ok
        good = pos_ok | neg_ok
        sel = todo[good]
        sgn[sel] = np.where(neg_ok[good], -1, 1)
        tt[sel] = t
        signbit = 0x8000 if dw.dtype == np.uint16 else 0x80000000
        dw[sel] = np.where(neg_ok[good], w[good] | signbit, w[good])
        done[sel] = True
        in_range = ((a >= lo) & (z <= hi)) | ((-z >= lo) & (-a <= hi))
        todo = todo[~good & in_range]
    mul = (sgn * tt)[:, None]
    sym = (c * mul + zero).clip(0, (1 << bits) - 1).astype(_code_dtype(bits))
    rec = reconstruct(Grid("scale", B, params, bits, zero), sym.reshape(-1), param_values(dw, params))
    return Fit(sym.reshape(-1), dw, None, done & _same_blocks(rec, x))


FITS: dict[str, Callable[[np.ndarray, str, int, int], Fit]] = {"scale": _fit_scale, "affine": _fit_affine}


def fit(grid: Grid, words: np.ndarray) -> Fit:
    """Codes and parameters of float32 ``words`` ((n,) uint32, n a multiple of the block) on
    ``grid``; ``ok`` says which blocks reproduce bit for bit."""
    x = words.view(np.float32).reshape(-1, grid.block)
    return FITS[grid.formula](x, grid.params, grid.bits, grid.zero)


def split(grid: Grid, raw: np.ndarray) -> list[np.ndarray] | None:
    """The fields of one chunk's bytes on ``grid`` (codes, d's float fields, m's), or None when
    some block does not reproduce bit for bit (the chunk takes the float path)."""
    f = fit(grid, raw.view(np.uint32))
    if not f.ok.all():
        return None
    parts = [f.codes]
    for w in (f.d, f.m)[: grid.nparams]:
        parts += grid.player.split(np.ascontiguousarray(w).view(np.uint8))
    return parts


def merge(grid: Grid, parts: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Inverse of :func:`split`: the chunk's bytes into ``out`` ((4n,) uint8)."""
    nb = len(parts[0]) // grid.block
    p = len(grid.player.fields)
    vals = []
    for i in range(grid.nparams):
        w = grid.player.merge(parts[1 + i * p : 1 + (i + 1) * p], nb).view(grid.player.word)
        vals.append(param_values(w, grid.params))
    reconstruct(grid, parts[0], *vals, out=out.view(np.float32))
    return out


# ---------------------------------------------------------------- detection


def candidate(dtype: str, shape: tuple[int, ...] | list[int]) -> bool:
    """Whether a tensor could hold a grid: a float32 tensor with rows of at least one block."""
    return dtype in TENSOR_DTYPES and len(shape) >= 1 and shape[-1] % BLOCKS[-1] == 0 and shape[-1] > 0


def _bits_hint(x: np.ndarray, formula: str) -> list[int]:
    """Code widths worth an exact fit on one block ``x`` (B,) float32: cheap necessary tests."""
    x64 = x.astype(np.float64)
    if not np.isfinite(x64).all():
        return []
    if formula == "affine":  # (x − min)/(max − min) · (2^b − 1) must be near integers
        lo, hi = x64.min(), x64.max()
        if hi == lo:
            return [1]
        r = (x64 - lo) / (hi - lo)
        bs = np.arange(1, DETECT_BITS + 1)
        v = r[None, :] * ((1 << bs) - 1)[:, None]
        return [int(b) for b in bs[(np.abs(v - np.rint(v)) < 1e-3).all(1)]]
    # x = d·c: in units of the smallest exponent, the values' gcd is d (or a multiple); codes
    # already wider than DETECT_BITS at the gcd only widen at d = gcd/t
    u = x.view(np.uint32).astype(np.int64)
    e, man = (u >> 23) & 0xFF, u & 0x7FFFFF
    M = np.where(e > 0, man | (1 << 23), man)
    nz = M != 0
    if not nz.any():
        return [1]
    E = np.where(e > 0, e, 1)
    shift = E[nz] - E[nz].min()
    if shift.max() > 30:
        return []
    I = M[nz] << shift
    return list(range(1, DETECT_BITS + 1)) if I.max() // np.gcd.reduce(I) <= 1 << (DETECT_BITS - 1) else []


def detect(words: np.ndarray, shape: tuple[int, ...] | list[int], dtype: str = "F32") -> Grid | None:
    """The grid of a tensor from its first values ``words`` ((n,) uint32, up to :data:`SAMPLE`,
    whole rows or not): the first candidate (largest block, fewest parameters, narrowest
    codes) under which the first block and then the whole sample reproduce bit for bit; None
    when nothing does (most tensors: the first block already rules out every candidate) or the
    sample is one value repeated."""
    if not candidate(dtype, shape) or not len(words) or (words == words[0]).all():
        return None  # a constant start (a norm of ones): the float path codes it in a few bytes
    row = int(shape[-1])
    n = len(words)
    for B in BLOCKS:
        if row % B or n < B:
            continue
        head = words[:B].view(np.float32).reshape(1, B)
        sample = words[: n // B * B]
        for formula in FORMULAS:
            hint = _bits_hint(head[0], formula)
            for params in PARAMS:
                widths = hint
                if formula == "scale":  # the widest first, then the narrowest the sample's codes allow
                    if not hint or not FITS["scale"](head, params, DETECT_BITS, None).ok.all():
                        continue
                    wide = fit(Grid("scale", B, params, DETECT_BITS, 1 << (DETECT_BITS - 1)), sample)
                    if not wide.ok.all():
                        continue
                    c = np.abs(wide.codes.astype(np.int64) - (1 << (DETECT_BITS - 1))).max()
                    widths = [b for b in range(1, DETECT_BITS + 1) if 1 << (b - 1) >= c]
                for bits in widths:
                    g = Grid(formula, B, params, bits, 1 << (bits - 1) if formula == "scale" else 0)
                    if FITS[formula](head, params, bits, g.zero).ok.all() and fit(g, sample).ok.all():
                        return g
    return None


def detect_segment(fi: Any, offset: int, dtype: str, shape: tuple[int, ...] | list[int], length: int) -> Grid | None:
    """:func:`detect` on a tensor's first :data:`SAMPLE` values, read from the open file ``fi``
    at ``offset`` (the file position is left anywhere)."""
    if not candidate(dtype, shape) or length < 4 * BLOCKS[-1]:
        return None
    fi.seek(offset)
    buf = fi.read(min(length, 4 * SAMPLE))
    return detect(np.frombuffer(buf[: len(buf) // 4 * 4], np.uint32), shape, dtype)
