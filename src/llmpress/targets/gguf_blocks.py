"""llmpress's stored codes and group parameters → llama.cpp's block bytes, exactly.

A quantized layer is stored as codes q ∈ 0..2ᵇ−1 (bit-packed row-major) with one scale (and an
offset) per group of 32 consecutive columns, in float16. llama.cpp's legacy block types hold
the same numbers for each run of 32 weights of a row, laid out as (gguf-py's ``gguf.quants``
and ggml's ``block_q*`` structs):

=====  =====  ==============================================================================
type   bytes  layout of one block of 32 weights w₀..w₃₁ (value)
=====  =====  ==============================================================================
Q4_0   18     d (f16) · qs[16]: byte j = q_j | q_{j+16} << 4                ((q − 8)·d)
Q4_1   20     d (f16) · m (f16) · qs[16] as Q4_0                            (q·d + m)
Q5_0   22     d · qh (u32 LE, bit j = bit 4 of q_j) · qs[16] of the low nibbles ((q − 16)·d)
Q5_1   24     d · m · qh · qs                                               (q·d + m)
Q8_0   34     d · qs[32] int8 = q − 128                                     (int8·d)
=====  =====  ==============================================================================

Which stored forms are which type is :data:`BLOCK_TYPES` (grid, bits): every grid whose value is
(q − 2^(b−1))·s (``sym``, ``sym_signed``, ``absmax``) is a ``_0`` type, ``asym`` (q·s + m) a
``_1`` type. Nothing is re-rounded: the float16 parameters are copied bit for bit, the codes
moved, so llama.cpp's dequantization of the bytes is llmpress's decode (tested with gguf-py's).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import Tensor

from ..quant.pack import unpack
from ..tensor import CompressedTensor

BLOCK = 32
# (grid, bits) → the llama.cpp type that stores it exactly
BLOCK_TYPES: dict[tuple[str, int], T] = {
    **{(g, 4): T.Q4_0 for g in ("sym", "sym_signed", "absmax")},
    **{(g, 5): T.Q5_0 for g in ("sym", "sym_signed", "absmax")},
    **{(g, 8): T.Q8_0 for g in ("sym", "sym_signed", "absmax")},
    ("asym", 4): T.Q4_1,
    ("asym", 5): T.Q5_1,
}


def why_not_blocks(ct: CompressedTensor) -> str | None:
    """None when ``ct`` is stored exactly by one of llama.cpp's block types, else why not."""
    m, d = ct.meta, ct.data
    if "grid" not in m or "qweight" not in d:
        return f"codec {ct.codec!r} has no GGUF block type (only quantized layers transfer)"
    if "in_scale" in d:
        return "AWQ input scale stored with the layer (not folded); GGUF has no per-column scale"
    if "g_idx" in d:
        return "act-order groups (g_idx) are not consecutive columns"
    key = (str(m["grid"]), int(m["bits"]))
    if key not in BLOCK_TYPES:
        return (f"grid {key[0]} at {key[1]} bits has no GGUF block type (Q4_0/Q5_0/Q8_0: sym, sym_signed, "
                f"absmax; Q4_1/Q5_1: asym)")
    if int(m["group_size"]) != BLOCK:
        return f"group size {m['group_size']}; GGUF blocks are 32 consecutive weights"
    if m.get("scale_dtype", "float16") != "float16":
        return f"group parameters in {m['scale_dtype']}; GGUF blocks store float16"
    if int(m["shape"][1]) % BLOCK:
        return f"rows of {m['shape'][1]} weights, not a multiple of 32"
    return None


def block_type(ct: CompressedTensor) -> T:
    return BLOCK_TYPES[(str(ct.meta["grid"]), int(ct.meta["bits"]))]


def _f16_bytes(p: Tensor) -> np.ndarray:
    """(R, G) float16 → (R, G, 2) uint8, the value's bits unchanged."""
    return p.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*p.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(R, G, 32) codes → (R, G, 16): byte j = low 4 bits of q_j | low 4 bits of q_{j+16} << 4."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(R, G, 32) 5-bit codes → (R, G, 4): a little-endian u32 whose bit j is bit 4 of q_j."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


_PACK = {
    T.Q4_0: lambda q, d, m: [d, _nibbles(q)],
    T.Q4_1: lambda q, d, m: [d, m, _nibbles(q)],
    T.Q5_0: lambda q, d, m: [d, _high_bits(q), _nibbles(q)],
    T.Q5_1: lambda q, d, m: [d, m, _high_bits(q), _nibbles(q)],
    T.Q8_0: lambda q, d, m: [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)],
}


def pack_blocks(ct: CompressedTensor, row_perm: Tensor | None = None) -> tuple[np.ndarray, T]:
    """The layer's llama.cpp bytes: (out, in/32 · block bytes) uint8 and the type. ``row_perm``
    reorders whole output rows (codes and parameters together), e.g. Llama's q/k rotary order."""
    why = why_not_blocks(ct)
    if why is not None:
        raise ValueError(why)
    qtype = block_type(ct)
    out, inp = (int(x) for x in ct.meta["shape"])
    codes = unpack(ct.data["qweight"], int(ct.meta["bits"]), out * inp).reshape(out, inp)
    scale, offset = ct.data["scale"], ct.data.get("offset")
    if row_perm is not None:
        codes, scale = codes[row_perm], scale[row_perm]
        offset = None if offset is None else offset[row_perm]
    q = codes.numpy().reshape(out, inp // BLOCK, BLOCK)  # (R, G, 32)
    d = _f16_bytes(scale)
    m = None if offset is None else _f16_bytes(offset)
    parts = _PACK[qtype](q, d, m)
    return np.concatenate(parts, axis=-1).reshape(out, -1), qtype
