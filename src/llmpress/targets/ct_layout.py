"""compressed-tensors' ``pack-quantized`` layout, and which llmpress layers map onto it exactly.

What compressed-tensors (0.20) stores for a linear quantized to b ∈ 1..8 bits, read from its
``PackedQuantizationCompressor`` and ``lifecycle/forward.py``:

=====================  =====================  =============================================
key                    dtype, shape           meaning
=====================  =====================  =============================================
``weight_packed``      int32 (O, ⌈I·b/32⌉)    codes u = q + 2^(b−1) (q the signed code), row
                                              by row: code j at bit j·b of the row's
                                              little-endian word stream (dense: a code may
                                              straddle two words; 2/4/8 bits never do)
``weight_scale``       float (O, G) | (O, 1)  per group / per channel / per tensor (1,)
                       | (1,)
``weight_zero_point``  int32 (⌈O·b/32⌉, G)    asymmetric only: z + 2^(b−1) packed the same
                                              way along the *output* dimension (dim 0)
``weight_shape``       int64 (2,)             [O, I]
=====================  =====================  =============================================

and decodes ``w = (q − z) · s`` computed in the scale's dtype (``_dequantize``: codes and zero
point cast to ``scale.dtype``, subtract, multiply; symmetric: ``q · s``). Groups are consecutive
input columns and must divide I (``_process_group`` raises otherwise); act-order ``g_idx`` is
gone from this release (``actorder='group'`` is rejected); zero points are integers.

llmpress's grids map on it bit for bit:

* ``sym``:   ŵ = (u − 2^(b−1))·s, u the stored code: the same unsigned code, no zero point;
* ``asymz``: ŵ = (u − z)·s, z an integer in 0..2^b−1: the same codes, z stored as is;
* ``asym`` (float offset m: ŵ = u·s + m) has no integer zero point: −m/s is rarely an integer.

In float32 the product (q − z)·s of an integer below 2^8 and an fp16/bf16 scale is exact, and
with a float32 scale it is the one rounding llmpress's decode does too, so a float32
``weight_scale`` reproduces llmpress's decoded weight bit for bit in every loader that computes
in the scale's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..quant import grids
from ..quant.codec import QuantCodec
from ..quant.kquant import LAYOUTS as K_LAYOUTS
from ..quant.pack import pack, unpack
from ..tensor import CompressedTensor, get_codec

# the grids whose points are (q − z)·s with an integer z: asymz, and every grid of sym's form
# (q − 2^(b−1))·s whatever its scale rule (sym; llama.cpp's sym_signed and absmax presets)
def _exact(grid: str) -> bool:
    return grid == "asymz" or isinstance(grids.GRIDS.get(grid), grids.Sym)


# why a grid does not transfer, in a few words
GRID_REASONS = {
    "asym": "float zero point (grid asym stores ŵ = q·s + m; compressed-tensors stores integer zero points: "
            "quantize with grid=asymz)",
    "nf": "NormalFloat codebook, not an affine integer grid",
    "seed": "the seed grid's levels are not (q − z)·s with an integer z",
    "seed_rtn": "the seed grid's levels are not (q − z)·s with an integer z",
    **{k: "llama.cpp K-quant grid (scales quantized per super-block of 256): export it as gguf"
       for k in K_LAYOUTS},
}


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme (one ``config_groups`` entry)."""

    bits: int
    symmetric: bool
    strategy: str  # group | channel | tensor
    group_size: int | None  # groups only

    def weights_args(self) -> dict[str, object]:
        """The ``weights`` entry of a config group, as llm-compressor writes it (no ``observer``:
        llmpress's method chose the ranges, not one of llm-compressor's observers)."""
        args: dict[str, object] = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                                   "group_size": self.group_size, "strategy": self.strategy, "dynamic": False}
        if self.strategy == "channel":
            args["group_size"] = -1
        return args

    def label(self) -> str:
        g = {"group": f"g{self.group_size}", "channel": "per-channel", "tensor": "per-tensor"}[self.strategy]
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g}"


def scheme_of(ct: CompressedTensor) -> Scheme | str:
    """The compressed-tensors scheme that stores ``ct``'s codes exactly, or why there is none."""
    codec = get_codec(ct.codec)
    if not isinstance(codec, QuantCodec):
        return f"method {ct.codec} is not an integer-grid quantization"
    meta = ct.meta
    grid, bits = meta["grid"], int(meta["bits"])
    if not _exact(grid):
        return GRID_REASONS.get(grid, f"grid {grid} has no integer zero point")
    if "g_idx" in ct.data:
        return "act-order g_idx (groups of non-consecutive columns): compressed-tensors 0.20 removed actorder=group"
    if "in_scale" in ct.data:
        return "AWQ input scale not folded (W = Ŵ·diag(1/s) is not per-group affine)"
    if not 1 <= bits <= 8:
        return f"{bits}-bit codes (pack-quantized holds 1..8)"
    out, inp = (int(d) for d in meta["shape"])
    gs = int(meta["group_size"])
    if gs == grids.PER_TENSOR:
        strategy, size = "tensor", None
    elif gs < 0 or gs >= inp:
        strategy, size = "channel", None
    elif inp % gs:
        return f"group size {gs} does not divide in_features {inp} (a ragged last group)"
    else:
        strategy, size = "group", gs
    if grid == "asymz":
        z = ct.data["zero"].to(torch.float32)
        if not bool(((z == z.round()) & (z >= 0) & (z < 2**bits)).all()):
            return "zero points that are not integers in 0..2^b−1"
    return Scheme(bits, grid != "asymz", strategy, size)


# ---------------------------------------------------------------------------- packing
def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes (R, C), values 0..2^b−1 → int32 (R, ⌈C·b/32⌉), code j of a row at bit j·b
    of that row's little-endian word stream.

    Each row is padded to a multiple of 32 codes, so it spans a whole number of words (32 codes of
    b bits are b words); llmpress's own packer then lays the codes out LSB first, which is this
    bit order, and the bytes are read as little-endian words whatever the host's byte order."""
    rows, cols = codes.shape
    padded = math.ceil(cols / 32) * 32
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, padded - cols))
    words = _le_words(pack(c, bits)).reshape(rows, padded * bits // 32)
    return words[:, : math.ceil(cols * bits / 32)].contiguous()


def _le_words(b: Tensor) -> Tensor:
    """uint8 bytes (4n,) → int32 (n,), read little-endian."""
    return torch.from_numpy(np.frombuffer(b.contiguous().numpy().tobytes(), dtype="<i4").astype(np.int32))


def packed_codes(ct: CompressedTensor) -> Tensor:
    """``weight_packed`` (O, ⌈I·b/32⌉) int32 from llmpress's packed codes. When I·b is a multiple
    of 32 every row of llmpress's flat bit stream starts on a word: its bytes already are the words."""
    out, inp = (int(d) for d in ct.meta["shape"])
    bits = int(ct.meta["bits"])
    if (inp * bits) % 32 == 0:
        return _le_words(ct.data["qweight"][: out * inp * bits // 8]).reshape(out, inp * bits // 32)
    codes = unpack(ct.data["qweight"], bits, out * inp).reshape(out, inp)
    return pack_rows(codes, bits)


def layer_tensors(ct: CompressedTensor, scheme: Scheme, scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """The checkpoint tensors of one layer, keyed by their suffix (``weight_packed``, ...)."""
    out, inp = (int(d) for d in ct.meta["shape"])
    scale = ct.data["scale"].to(scale_dtype)  # (R, G)
    t = {"weight_packed": packed_codes(ct), "weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    if scheme.strategy == "tensor":
        t["weight_scale"] = scale.reshape(1).contiguous()
    else:
        t["weight_scale"] = scale.reshape(out, -1).contiguous()  # (O, G) or (O, 1)
    if not scheme.symmetric:
        z = ct.data["zero"].to(torch.float32).round().to(torch.uint8)  # (R, G), 0..2^b−1
        if scheme.strategy == "tensor":  # not packed: the signed int8 value
            t["weight_zero_point"] = (z.reshape(1).to(torch.int16) - 2 ** (scheme.bits - 1)).to(torch.int8)
        else:
            t["weight_zero_point"] = pack_rows(z.reshape(out, -1).T.contiguous(), scheme.bits).T.contiguous()
    return t
