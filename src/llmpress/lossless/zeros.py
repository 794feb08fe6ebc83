"""A codes segment's zero points (``.llmp`` format 6): each code's group zero point, as context.

A quantizer with an integer zero point (GPTQ/AWQ's ``asymz`` grid, compressed-tensors' asymmetric
schemes) stores ŵ = (q − z)·s: the codes of a group gather around its z, wherever z lies in
0..2^b − 1. Coding d = (q − z) mod 2^b instead of q puts every group's peak on the same symbols,
so one per-chunk model fits them all (``bench/lossless.py --folders`` measures both). z comes from
the segment's zero-point tensor in the same file, which is stored as it is (a small tensor of its
own); a chunk decodes its d's and adds the z's back.

Where a code's z is (``ZeroRef``, the segment's ``zero`` in the index): code i of the segment is in
stored row ``i // row`` and column ``c = i % row``, group ``c // group``; the zero-point tensor is
2-D (rows, groups) and gives z for (row, group); a group or row past its shape has z = 0.
``packing``: ``value`` — the tensor's elements are the zero points (a float or integer dtype,
each an integer in 0..2^b − 1); ``packed`` — compressed-tensors' int32 words holding b-bit zero
points along dim 0 (column g's words, top to bottom, are one little-endian bit stream; row r's z is
its bits r·b … r·b + b − 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import compiled

K = compiled.Kernels("kernels")  # fill_zeros
CK = compiled.Kernels("codes_kernel")  # half_table

PACKINGS = ("value", "packed")
# dtypes a zero-point tensor may have, per packing
VALUE_DTYPES = {"F16": "<f2", "F32": "<f4", "BF16": "<u2", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2",
                "U32": "<u4", "I32": "<i4", "U64": "<u8", "I64": "<i8"}
PACKED_DTYPES = {"I32": "<u4", "U32": "<u4"}
MAX_GROUPS = 1 << 20  # a zero-point tensor's columns (one per group): bounded before anything is sized


@dataclass(frozen=True)
class ZeroRef:
    """Where a codes segment's zero points are: see the module's docstring."""

    tensor: str  # the zero-point tensor's name, in the same file
    row: int  # codes per stored row (≥ 1)
    group: int  # codes per group along a row (≥ 1)
    packing: str  # value | packed

    def to_index(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "row": self.row, "group": self.group, "packing": self.packing}

    @classmethod
    def from_index(cls, d: Any) -> "ZeroRef":
        """The record of an index, checked (ValueError)."""
        if not isinstance(d, dict) or set(d) != {"tensor", "row", "group", "packing"}:
            raise ValueError(f"zero record {d!r}: needs exactly tensor, row, group, packing")
        if not isinstance(d["tensor"], str) or d["packing"] not in PACKINGS or \
                not all(type(d[k]) is int and 1 <= d[k] < 1 << 48 for k in ("row", "group")):
            raise ValueError(f"zero record {d!r}: a tensor name, row and group ≥ 1, packing in {PACKINGS}")
        return cls(d["tensor"], d["row"], d["group"], d["packing"])


def zero_table(raw: np.ndarray, dtype: str, shape: tuple[int, ...] | list[int], packing: str, bits: int) -> np.ndarray:
    """The zero points (rows, groups) uint8 of a zero-point tensor's bytes ``raw`` (nbytes,) uint8;
    ValueError where they are not b-bit integers or the tensor is not one a ``packing`` reads."""
    if len(shape) != 2 or shape[1] > MAX_GROUPS:
        raise ValueError(f"a zero-point tensor of shape {list(shape)}: 2-D (rows, groups) only")
    rows, groups = shape
    if packing == "value":
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"zero points of dtype {dtype}")
        v = raw.view(VALUE_DTYPES[dtype]).reshape(rows, groups)
        if dtype in ("F16", "BF16"):  # one look-up a zero point: its integer, or 255 (none: bits ≤ 7)
            u = np.empty((rows, groups), np.uint8)
            if CK.half_table(np.ascontiguousarray(raw.view("<u2").reshape(rows, groups)), _half_codes(dtype), u) >= 1 << bits:
                raise ValueError(f"zero points that are not integers in 0..{(1 << bits) - 1}")
            return u
        if not ((v >= 0) & (v < 1 << bits)).all():  # NaN fails too
            raise ValueError(f"zero points that are not integers in 0..{(1 << bits) - 1}")
        u = v.astype(np.uint8)
        if not np.array_equal(u, v):  # a fraction
            raise ValueError(f"zero points that are not integers in 0..{(1 << bits) - 1}")
        return u
    if packing != "packed" or dtype not in PACKED_DTYPES:
        raise ValueError(f"zero points packed in {dtype} words")
    words = np.ascontiguousarray(raw.view(PACKED_DTYPES[dtype]).reshape(rows, groups).T.astype("<u4"))  # (groups, words)
    cols = words.view(np.uint8).reshape(groups, 4 * rows)  # each column's little-endian bit stream
    n = 32 * rows // bits
    z = np.empty((groups, n), np.uint8)
    if 32 % bits == 0:  # no zero straddles two columns: the columns' streams read as one
        K.unpack_bits(cols.reshape(-1), bits, z.reshape(-1))
    else:
        for g in range(groups):
            K.unpack_bits(np.ascontiguousarray(cols[g]), bits, z[g])
    return np.ascontiguousarray(z.T)  # (n, groups)


_HALF: dict[str, np.ndarray] = {}


def _half_codes(dtype: str) -> np.ndarray:
    """(65536,) uint8: the integer 0..254 a 16-bit float word holds, 255 for any other value."""
    lut = _HALF.get(dtype)
    if lut is None:
        w = np.arange(1 << 16, dtype=np.uint32)
        v = w.astype(np.uint16).view(np.float16).astype(np.float32) if dtype == "F16" else (w << 16).view(np.float32)
        with np.errstate(invalid="ignore"):
            ok = (v >= 0) & (v < 255) & (v == np.floor(v))
        lut = _HALF[dtype] = np.where(ok, v, 255).astype(np.uint8)
    return lut


def chunk_zeros(table: np.ndarray, ref: ZeroRef, first: int, m: int, out: np.ndarray | None = None) -> np.ndarray:
    """z of codes ``first … first + m − 1`` of the segment: (m,) uint8, written into ``out`` if
    given (kernels.fill_zeros, compiled)."""
    out = np.empty(m, np.uint8) if out is None else out[:m]
    if m > 0:
        K.fill_zeros(np.ascontiguousarray(table, np.uint8), ref.row, ref.group, first, out)
    return out


class ChunkZeros:
    """The zero points of one chunk of a codes segment, for its decoder: codes ``first`` on, the
    table ((rows, groups) uint8) asked for only when a chunk needs it (the reader decodes the
    zero-point tensor then, once)."""

    def __init__(self, table: Callable[[], np.ndarray], ref: ZeroRef, first: int, scratch: np.ndarray | None = None):
        self.table, self.ref, self.first, self.scratch = table, ref, first, scratch

    def array(self, m: int) -> np.ndarray:
        """(m,) uint8: each code's zero point."""
        out = self.scratch if self.scratch is not None and len(self.scratch) >= m else None
        return chunk_zeros(self.table(), self.ref, self.first, m, out)

    def add_to(self, x: np.ndarray, bits: int) -> None:
        """Each whole b-bit code of the bytes ``x`` (in place) plus its zero point, mod 2^b."""
        K.add_zero_runs(x, bits, np.ascontiguousarray(self.table(), np.uint8), self.ref.row, self.ref.group, self.first)
