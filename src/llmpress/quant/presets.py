"""Grid presets: named layouts that fix bits, group size, parameter dtype and grid at once.

``grid: gguf:q4_0`` (``quantize --grid gguf:q4_0``) stands for llama.cpp's Q4_0 block: groups of
32 consecutive weights of a row, one float16 scale each. The five legacy llama.cpp block types are
already affine grids of llmpress, so any method (RTN, GPTQ, AWQ) that chooses codes on them chooses
codes llama.cpp runs as they are:

===========  ======================  ===============================  ===================
preset       llama.cpp value         scale rule (llama.cpp's)          llmpress grid
===========  ======================  ===============================  ===================
gguf:q4_0    (q − 8)·d               d = x₊ / −8                       sym_signed, 4 bits
gguf:q4_1    q·d + m                 d = (max − min)/15, m = min       asym, 4 bits
gguf:q5_0    (q − 16)·d              d = x₊ / −16                      sym_signed, 5 bits
gguf:q5_1    q·d + m                 d = (max − min)/31, m = min       asym, 5 bits
gguf:q8_0    (q − 128)·d = int8·d    d = max|x| / 127                  absmax, 8 bits
===========  ======================  ===============================  ===================

(x₊ is the group's value of largest magnitude, with its sign.) Two grids are needed beside
``sym`` and ``asym``:

* ``sym_signed`` — llmpress's ``sym`` grid reconstructs (q − 2^(b−1))·s, the same form as Q4_0,
  but chooses s = 2·max|x|/(2^b − 1), leaving the one-sided level −2^(b−1) almost unused.
  llama.cpp instead puts the extreme value exactly *on* that level: d = x₊/−2^(b−1), so d takes
  the sign opposite to x₊ and all 2^b levels are in use (the side of x₊ gets the extra level).
  The scale is therefore signed: GPTQ's compiled column loop and the clipping search compute
  round((w − a)/s) + z and (q − z)·s + a, which hold for a negative s unchanged.
* ``absmax`` — s = max|x| / (2^(b−1) − 1): the largest magnitude lands on level ±(2^(b−1) − 1),
  symmetric about 0 (Q8_0's rule; level −2^(b−1) stays reachable by a clipping search or GPTQ).

The K-quant presets ``gguf:q2_k|q3_k|q4_k|q5_k|q6_k`` (two-level scales per super-block of 256)
are registered by :mod:`.kquant`.

The presets know nothing of the GGUF writer: an export target recognises the stored form (grid,
bits, group size, parameter dtype) whichever way it was asked for.
"""
from __future__ import annotations

import torch

from . import grids
from .grids import Sym, _grid, _safe_scale


@_grid
class SymSigned(Sym):
    """(q − 2^(b−1))·s with s = x₊ / −2^(b−1), signed (llama.cpp's Q4_0/Q5_0 rule)."""

    name = "sym_signed"

    def params(self, lo, hi, bits, dtype):
        ext = torch.where(hi.abs() > lo.abs(), hi, lo)  # the value of largest magnitude, signed
        d = ext / -(2 ** (bits - 1))
        sign = torch.where(d < 0, -1.0, 1.0)
        return {"scale": sign * _safe_scale(d.abs(), dtype)}  # a sign flip is exact in any dtype


@_grid
class AbsMax(Sym):
    """(q − 2^(b−1))·s with s = max|x| / (2^(b−1) − 1) (llama.cpp's Q8_0 rule)."""

    name = "absmax"

    def params(self, lo, hi, bits, dtype):
        a = torch.maximum(lo.abs(), hi.abs())
        return {"scale": _safe_scale(a / (2 ** (bits - 1) - 1), dtype)}


def _gguf(bits: int, grid: str) -> dict:
    return {"bits": bits, "group_size": 32, "scale_dtype": "float16", "grid": grid}


grids.PRESETS.update({
    "gguf:q4_0": _gguf(4, "sym_signed"),
    "gguf:q4_1": _gguf(4, "asym"),
    "gguf:q5_0": _gguf(5, "sym_signed"),
    "gguf:q5_1": _gguf(5, "asym"),
    "gguf:q8_0": _gguf(8, "absmax"),
})
