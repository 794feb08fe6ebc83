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

The K-quants (:mod:`llmpress.quant.kquant`; super-blocks of 256 = 16 groups of 16 or 8 of 32)
store float16 ``d`` (``dmin``) per super-block and the sub-block scales already packed as ggml
packs them; their codes are laid out as ggml's ``block_q*_K`` (l: 0..31, h: each 128-weight half):

=====  =====  ==============================================================================
type   bytes  layout of one super-block of 256 weights
=====  =====  ==============================================================================
Q2_K   84     scales[16] · qs[64]: byte 32h + l = Σⱼ q[128h + 32j + l] << 2j · d · dmin
Q3_K   110    hmask[32]: bit i of byte l = bit 2 of q[32i + l] · qs[64] (low 2 bits, as Q2_K)
              · scales[12] · d
Q4_K   144    d · dmin · scales[12] · qs[128]: byte 32c + l = q[64c + l] | q[64c + 32 + l] << 4
Q5_K   176    d · dmin · scales[12] · qh[32] (bit 4 of q, as Q3_K's hmask) · qs[128] (low nibbles)
Q6_K   210    ql[128]: byte 64h + l = q[128h + l] | q[128h + 64 + l] << 4 (low nibbles) ·
              qh[64]: byte 32h + l = Σⱼ (q[128h + 32j + l] >> 4) << 2j · scales[16] int8 · d
=====  =====  ==============================================================================

Which stored forms are which type is :data:`BLOCK_TYPES` (grid, bits): every grid whose value is
(q − 2^(b−1))·s (``sym``, ``sym_signed``, ``absmax``) is a ``_0`` type, ``asym`` (q·s + m) a
``_1`` type, the K-quant grids their own type. Nothing is re-rounded: the float16 parameters are
copied bit for bit, the codes moved, so llama.cpp's dequantization of the bytes is llmpress's
decode (tested with gguf-py's).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import Tensor

from ..errors import InputError
from ..quant.kquant import LAYOUTS, QK_K
from ..quant.pack import unpack
from ..tensor import CompressedTensor

BLOCK = 32
K_TYPES: dict[str, T] = {"q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}
# (grid, bits) → the llama.cpp type that stores it exactly
BLOCK_TYPES: dict[tuple[str, int], T] = {
    **{(g, 4): T.Q4_0 for g in ("sym", "sym_signed", "absmax")},
    **{(g, 5): T.Q5_0 for g in ("sym", "sym_signed", "absmax")},
    **{(g, 8): T.Q8_0 for g in ("sym", "sym_signed", "absmax")},
    ("asym", 4): T.Q4_1,
    ("asym", 5): T.Q5_1,
    **{(g, LAYOUTS[g].bits): t for g, t in K_TYPES.items()},
}
# consecutive weights a group (sub-block) holds, and weights a block (super-block) holds
GROUP = {t: BLOCK for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)} | {t: LAYOUTS[g].sub for g, t in K_TYPES.items()}
SUPER = {t: BLOCK for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)} | {t: QK_K for t in K_TYPES.values()}


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
                f"absmax; Q4_1/Q5_1: asym; Q2_K..Q6_K: the gguf:q*_k grids)")
    qtype = BLOCK_TYPES[key]
    if int(m["group_size"]) != GROUP[qtype]:
        return f"group size {m['group_size']}; GGUF {qtype.name} groups are {GROUP[qtype]} consecutive weights"
    if m.get("scale_dtype", "float16") != "float16":
        return f"group parameters in {m['scale_dtype']}; GGUF blocks store float16"
    if int(m["shape"][1]) % SUPER[qtype]:
        return f"rows of {m['shape'][1]} weights, not a multiple of {SUPER[qtype]}"
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


def _low2(q: np.ndarray) -> np.ndarray:
    """(…, 256) codes → (…, 64): byte 32h + l = Σⱼ (q[128h + 32j + l] & 3) << 2j."""
    q = (q & 3).reshape(*q.shape[:-1], 2, 4, 32)  # [h, j, l]
    return (q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)).reshape(*q.shape[:-3], 64)


def _bit_of(q: np.ndarray, bit: int) -> np.ndarray:
    """(…, 256) codes → (…, 32): bit i of byte l = bit ``bit`` of q[32i + l]."""
    b = ((q >> bit) & 1).reshape(*q.shape[:-1], 8, 32)  # [i, l]
    return np.packbits(np.swapaxes(b, -1, -2), axis=-1, bitorder="little")[..., 0]


def _nibbles_k(q: np.ndarray, span: int) -> np.ndarray:
    """(…, 256) codes → (…, 128): byte span·c + l = low nibble of q[2span·c + l] | of q[2span·c + span + l] << 4."""
    q = (q & 0x0F).reshape(*q.shape[:-1], 256 // (2 * span), 2, span)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:-3], 128)


_PACK_K = {  # (codes (R, N, 256), d, dmin (R, N, 2) bytes, scales (R, N, k)) → the parts in block order
    T.Q2_K: lambda q, d, m, s: [s, _low2(q), d, m],
    T.Q3_K: lambda q, d, m, s: [_bit_of(q, 2), _low2(q), s, d],
    T.Q4_K: lambda q, d, m, s: [d, m, s, _nibbles_k(q, 32)],
    T.Q5_K: lambda q, d, m, s: [d, m, s, _bit_of(q, 4), _nibbles_k(q, 32)],
    T.Q6_K: lambda q, d, m, s: [_nibbles_k(q, 64), _low2(q >> 4), s, d],
}


def pack_blocks(ct: CompressedTensor, row_perm: Tensor | None = None) -> tuple[np.ndarray, T]:
    """The layer's llama.cpp bytes: (out, in/block · block bytes) uint8 and the type. ``row_perm``
    reorders whole output rows (codes and parameters together), e.g. Llama's q/k rotary order."""
    why = why_not_blocks(ct)
    if why is not None:
        raise InputError(why)
    qtype = block_type(ct)
    out, inp = (int(x) for x in ct.meta["shape"])
    codes = unpack(ct.data["qweight"], int(ct.meta["bits"]), out * inp).reshape(out, inp)
    if qtype in _PACK_K:
        data = {k: v if row_perm is None else v[row_perm] for k, v in ct.data.items() if k != "qweight"}
        q = (codes if row_perm is None else codes[row_perm]).numpy().reshape(out, inp // QK_K, QK_K)  # (R, N, 256)
        m = _f16_bytes(data["dmin"]) if "dmin" in data else None
        parts = _PACK_K[qtype](q, _f16_bytes(data["d"]), m, data["scales"].numpy())
        return np.concatenate(parts, axis=-1).reshape(out, -1), qtype
    scale, offset = ct.data["scale"], ct.data.get("offset")
    if row_perm is not None:
        codes, scale = codes[row_perm], scale[row_perm]
        offset = None if offset is None else offset[row_perm]
    q = codes.numpy().reshape(out, inp // BLOCK, BLOCK)  # (R, G, 32)
    d = _f16_bytes(scale)
    m = None if offset is None else _f16_bytes(offset)
    parts = _PACK[qtype](q, d, m)
    return np.concatenate(parts, axis=-1).reshape(out, -1), qtype
