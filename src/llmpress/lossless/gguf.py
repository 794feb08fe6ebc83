"""GGUF files cut into their parts, and ggml's quantized blocks split into fields.

A GGUF file (versions 2 and 3) is ``"GGUF" u32 version | u64 tensors | u64 kvs | key/values |
tensor infos | padding to the alignment | tensor data``. :func:`read_header` parses it with our
own bounded reader (no gguf-py, no allocation sized by the file before it is checked against
the file's size); :func:`plan_gguf` cuts the file into a ``bytes`` segment for everything before
the data (kept verbatim), one tensor segment per tensor in file order, and ``bytes`` segments
for the alignment padding and any trailing bytes.

A tensor of one of ggml's block types in :data:`BLOCKS` is a segment of whole blocks (dtype
``U8``, shape ``[blocks, block bytes]``, the segment's ``gguf`` names the type), split chunk by
chunk into fields: each block parameter (``d``, ``m``, ``dmin``: the F16/F32 float fields of
fields.py), the K-quants' sub-block scales and mins (their 6-bit packing undone: one symbol
each) and the codes (one symbol a weight, the high bits of Q5_*/Q3_K/Q5_K/Q6_K merged back
onto their low bits). Every byte pattern of a block round-trips (the fields hold every bit;
Q8_K's ``bsums`` are stored as their difference from the sums of the block's codes). A chunk may
also code its codes grouped by a class of their block or sub-block (the code of zero for affine
types, the scale's octave for scaled ones), each class with its own model (:func:`classes`):
the chunk keeps whichever is smaller. F32/F16/BF16 tensors are ordinary float tensors; any other
type (IQ*, TQ*, ...) is a ``U8`` tensor of raw bytes.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CorruptFileError
from .compiled import Kernels
from .fields import LAYOUTS, Field, FloatLayout

K = Kernels("gguf_kernel")  # the merges' loops: the AOT build's where there is one (compiled.py)

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays
DEFAULT_ALIGNMENT = 32


class GGUFError(CorruptFileError):
    """A GGUF header that is truncated or lies about counts, sizes or offsets."""


# ---------------------------------------------------------------- the header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    type: int  # GGMLQuantizationType
    offset: int  # in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    data_offset: int
    alignment: int
    tensors: tuple[TensorInfo, ...]


# GGUF value type -> fixed size (strings, 8, and arrays, 9, are variable)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buf: memoryview | bytes, where: str):
        self.buf, self.pos, self.where = buf, 0, where

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"{self.where}: header truncated or lying: {what} needs {n} bytes at offset "
                            f"{self.pos}, the file has {len(self.buf)}")

    def u(self, fmt: str, what: str) -> int:
        s = struct.calcsize(fmt)
        self.need(s, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += s
        return v

    def string(self, what: str) -> bytes:
        n = self.u("Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> int | None:
        """Skip a value; returns it where it is an unsigned integer scalar (alignment), else None."""
        if vtype in _SCALAR:
            fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALAR[vtype]]
            return self.u(fmt, what)
        if vtype == _STRING:
            self.string(what)
            return None
        if vtype != _ARRAY or depth >= MAX_NESTING:
            raise GGUFError(f"{self.where}: {what}: unknown value type {vtype}" if vtype != _ARRAY else
                            f"{self.where}: {what}: arrays nested deeper than {MAX_NESTING}")
        itype, n = self.u("I", what), self.u("Q", what)
        if itype in _SCALAR:
            self.need(n * _SCALAR[itype], f"{what} ({n} items)")
            self.pos += n * _SCALAR[itype]
            return None
        self.need(n * 8, f"{what} ({n} items)")  # every string or array item takes at least 8 bytes
        for _ in range(n):
            self.value(itype, what, depth + 1)
        return None


def is_gguf(path: Path) -> bool:
    """Whether a file starts with GGUF's magic (its header, version included, is checked by
    :func:`read_header`: a file that claims to be GGUF and is not one is refused, not guessed at)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def read_header(path: Path) -> Header:
    """The header of a GGUF file, every count, size and offset checked against the file's size
    before it is used; :class:`GGUFError` otherwise."""
    size = path.stat().st_size
    where = str(path)
    if size < 24:
        raise GGUFError(f"{where}: {size} bytes: too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            return _parse(_Cursor(view, where), size)
        finally:
            view.release()


def _parse(c: _Cursor, size: int) -> Header:
    where = c.where
    if bytes(c.buf[:4]) != MAGIC:
        raise GGUFError(f"{where}: not a GGUF file (magic {bytes(c.buf[:4])!r})")
    c.pos = 4
    version = c.u("I", "version")
    if version not in VERSIONS:
        raise GGUFError(f"{where}: GGUF version {version}; versions {VERSIONS} are read")
    n_tensors, n_kv = c.u("Q", "tensor count"), c.u("Q", "key/value count")
    # a key/value takes at least 8 + 4 + 1 bytes, a tensor info 8 + 4 + 8 + 4 + 8
    if n_kv * 13 > size or n_tensors * 32 > size:
        raise GGUFError(f"{where}: header claims {n_tensors} tensors and {n_kv} key/values: more than "
                        f"{size} bytes can hold")
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = c.string(f"key {i}")
        vtype = c.u("I", f"key {key!r}'s type")
        v = c.value(vtype, f"key {key!r}")
        if key == b"general.alignment":
            if vtype != 4 or v is None or v == 0 or v & (v - 1) or v > 1 << 20:
                raise GGUFError(f"{where}: general.alignment {v!r} (type {vtype}) is not a u32 power of two")
            alignment = v
    infos = []
    for i in range(n_tensors):
        raw_name = c.string(f"tensor {i}'s name")
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            raise GGUFError(f"{where}: tensor {i}'s name is not UTF-8") from None
        nd = c.u("I", f"tensor {name!r}'s dimensions")
        if not 1 <= nd <= MAX_DIMS:
            raise GGUFError(f"{where}: tensor {name!r}: {nd} dimensions (1..{MAX_DIMS})")
        dims = tuple(c.u("Q", f"tensor {name!r}'s shape") for _ in range(nd))
        qtype, off = c.u("I", f"tensor {name!r}'s type"), c.u("Q", f"tensor {name!r}'s offset")
        infos.append((name, dims, qtype, off))
    data = -(-c.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, off in infos:
        bw, bb = type_size(qtype, where, name)
        n = 1
        for d in dims:
            n *= d
        if any(d >= 1 << 48 for d in dims) or dims[0] % bw or n // bw * bb > size:
            raise GGUFError(f"{where}: tensor {name!r}: shape {list(dims)} is not whole {type_name(qtype)} blocks "
                            f"of {bw} or exceeds the file")
        nbytes = n // bw * bb
        if off % alignment or data + off + nbytes > size:
            raise GGUFError(f"{where}: tensor {name!r}: offset {off} (+{nbytes} bytes) is unaligned or past the "
                            f"file's end ({size} bytes)")
        tensors.append(TensorInfo(name, dims, qtype, data + off, nbytes))
    if data > size:
        raise GGUFError(f"{where}: the data section starts at {data}, past the file's end")
    return Header(version, data, alignment, tuple(tensors))


# ggml type id -> (name, weights a block, bytes a block): gguf-py's GGML_QUANT_SIZES, spelled out so
# the lossless path needs neither gguf-py nor its numpy version
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# plain element types -> the safetensors dtype their segment takes (float layouts, or raw words)
PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16", "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64", "F64": "F64"}


def type_name(qtype: int) -> str:
    return GGML_TYPES[qtype][0] if qtype in GGML_TYPES else f"type {qtype}"


def type_size(qtype: int, where: str = "", name: str = "") -> tuple[int, int]:
    if qtype not in GGML_TYPES:
        raise GGUFError(f"{where}: tensor {name!r}: unknown ggml type {qtype}")
    return GGML_TYPES[qtype][1:]


# ---------------------------------------------------------------- block types


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: its fields (per block: ``counts[i]`` symbols of field i; the codes,
    one a weight, are the last field), the split of blocks into fields and back, and the class
    of each code unit (``unit`` consecutive codes) for grouped coding."""

    name: str
    block_bytes: int
    weights: int
    fields: tuple[Field, ...]
    counts: tuple[int, ...]
    split: Callable[[np.ndarray], list[np.ndarray]]  # (nb, block_bytes) uint8 -> fields
    merge: Callable[[list[np.ndarray], np.ndarray], None]  # fields -> (nb, block_bytes) uint8 out
    unit: int  # codes sharing one class (a block or a sub-block)
    nclasses: int
    classes: Callable[[list[np.ndarray]], np.ndarray]  # fields -> (nunits,) int64 in [0, nclasses)

    @property
    def code_bits(self) -> int:
        return self.fields[-1].width

    def symbols(self, nblocks: int) -> list[int]:
        return [c * nblocks for c in self.counts]


F16L: FloatLayout = LAYOUTS["F16"]  # type: ignore[assignment]
F32L: FloatLayout = LAYOUTS["F32"]  # type: ignore[assignment]


def _pfields(name: str, lay: FloatLayout) -> tuple[Field, ...]:
    return tuple(Field(f"{name}.{f.name}", f.width) for f in lay.fields)


def _psplit(cols: np.ndarray, lay: FloatLayout) -> list[np.ndarray]:
    """A parameter's float fields from its bytes ((nb, itemsize) uint8 columns of the blocks)."""
    return lay.split(np.ascontiguousarray(cols).reshape(-1))


def _pmerge(parts: list[np.ndarray], lay: FloatLayout, nb: int) -> np.ndarray:
    """(nb, itemsize) uint8: a parameter's bytes from its float fields."""
    return lay.merge(parts, nb).reshape(nb, lay.itemsize)


def _f16(parts: list[np.ndarray], nb: int) -> np.ndarray:
    """float64 values (nb,) of an F16 parameter's fields."""
    return _pmerge(parts, F16L, nb).reshape(-1).view(np.float16).astype(np.float64)


def _nib(qs: np.ndarray) -> np.ndarray:
    """(nb, 2k) codes of (nb, k) bytes: the low nibbles, then the high ones (ggml's order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.uint8)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """(nb, 32) bits, low first, of (nb, 4) bytes (a little-endian u32)."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _affine_class(d: np.ndarray, m: np.ndarray, bits: int) -> np.ndarray:
    """The code of zero, rint(m / d) clipped to the codes (0 where d is 0 or not finite): a block
    x = d·q − m is centred on it (Q4_1/Q5_1 store −m)."""
    with np.errstate(all="ignore"):
        z = np.rint(m / d)
    z = np.where(np.isfinite(z), z, 0)
    return np.clip(z, 0, (1 << bits) - 1).astype(np.int64)


SCALE_CLASSES = 8


def _scale_class(d: np.ndarray) -> np.ndarray:
    """The octave of |d| relative to the chunk's most common one, in 8 classes (exact: frexp)."""
    e = np.frexp(np.abs(np.where(np.isfinite(d), d, 0)))[1].astype(np.int64)
    if not len(e):
        return e
    mode = int(np.argmax(np.bincount(e - e.min()))) + int(e.min())
    return np.clip(e - mode + SCALE_CLASSES // 2, 0, SCALE_CLASSES - 1)


# -- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: 32 weights, F16 d (and m), codes


def _legacy(name: str, bits: int, affine: bool) -> BlockType:
    np_ = 2 if affine else 1
    qh = 4 if bits == 5 else 0
    bb = 2 * np_ + qh + (32 if bits == 8 else 16)
    pnames = ("d", "m")[:np_]
    fields = tuple(f for p in pnames for f in _pfields(p, F16L)) + (Field("codes", bits),)
    npf = len(F16L.fields)

    def split(b: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(np_):
            out += _psplit(b[:, 2 * i : 2 * i + 2], F16L)
        q = b[:, 2 * np_ + qh :]
        if bits == 8:
            codes = q
        else:
            codes = _nib(q)
            if qh:
                codes = codes | (_bits32(b[:, 2 * np_ : 2 * np_ + 4]) << 4)
        return out + [np.ascontiguousarray(codes).reshape(-1)]

    def merge(parts: list[np.ndarray], out: np.ndarray) -> None:
        nb = len(out)
        for i in range(np_):
            out[:, 2 * i : 2 * i + 2] = _pmerge(parts[i * npf : (i + 1) * npf], F16L, nb)
        if bits == 8:
            out[:, 2 * np_ :] = parts[-1].reshape(nb, 32)
            return
        K.legacy_merge(_u8(parts[-1]), out, 2 * np_ + qh, 2 * np_ if qh else -1)

    def classes(parts: list[np.ndarray]) -> np.ndarray:
        nb = len(parts[0])
        d = _f16(parts[:npf], nb)
        return _affine_class(d, -_f16(parts[npf : 2 * npf], nb), bits) if affine else _scale_class(d)

    counts = (1,) * (np_ * npf) + (32,)
    return BlockType(name, bb, 32, fields, counts, split, merge, 32,
                     1 << bits if affine else SCALE_CLASSES, classes)


# -- K-quants: 256 weights a super-block


def _k_scales_unpack(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> (nb, 8) scales and (nb, 8) mins, 6 bits each (ggml's
    get_scale_min_k4); every bit of the 12 bytes lands in exactly one of them."""
    sc = np.empty((len(s), 8), np.uint8)
    mn = np.empty((len(s), 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _k_scales_pack(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    s = np.empty((len(sc), 12), np.uint8)
    s[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return s


def _q4k_like(name: str, bits: int) -> BlockType:
    """Q4_K (144 B: d, dmin, scales[12], qs[128]) and Q5_K (176 B: ... qh[32] before qs)."""
    qh = 32 if bits == 5 else 0
    bb = 4 + 12 + qh + 128
    npf = len(F16L.fields)
    fields = _pfields("d", F16L) + _pfields("dmin", F16L) + (Field("scales", 6), Field("mins", 6), Field("codes", bits))
    counts = (1,) * (2 * npf) + (8, 8, 256)
    shift = np.arange(8, dtype=np.uint8)

    def split(b: np.ndarray) -> list[np.ndarray]:
        nb = len(b)
        sc, mn = _k_scales_unpack(b[:, 4:16])
        qs = b[:, 16 + qh :].reshape(nb, 4, 32)
        codes = np.stack([qs & 15, qs >> 4], axis=2)  # (nb, 4, 2, 32): weight 64j + 32i + l
        if qh:  # bit 2j+i of qh[l] is weight 64j + 32i + l's fifth bit
            hb = (b[:, 16 : 16 + qh][:, None, :] >> shift[:, None]) & 1  # (nb, 8, 32)
            codes = codes | (hb.reshape(nb, 4, 2, 32) << 4)
        return [*_psplit(b[:, 0:2], F16L), *_psplit(b[:, 2:4], F16L), sc.reshape(-1), mn.reshape(-1),
                np.ascontiguousarray(codes).reshape(-1)]

    def merge(parts: list[np.ndarray], out: np.ndarray) -> None:
        nb = len(out)
        out[:, 0:2] = _pmerge(parts[:npf], F16L, nb)
        out[:, 2:4] = _pmerge(parts[npf : 2 * npf], F16L, nb)
        out[:, 4:16] = _k_scales_pack(parts[2 * npf].reshape(nb, 8), parts[2 * npf + 1].reshape(nb, 8))
        K.q4k_merge(_u8(parts[-1]), out, 16 + qh, 16 if qh else -1)

    def classes(parts: list[np.ndarray]) -> np.ndarray:
        nb = len(parts[0])
        d, dmin = _f16(parts[:npf], nb), _f16(parts[npf : 2 * npf], nb)
        sc = parts[2 * npf].reshape(nb, 8).astype(np.float64)
        mn = parts[2 * npf + 1].reshape(nb, 8).astype(np.float64)
        return _affine_class((d[:, None] * sc).reshape(-1), (dmin[:, None] * mn).reshape(-1), bits)

    return BlockType(name, bb, 256, fields, counts, split, merge, 32, 1 << bits, classes)


def _q2k_split(b: np.ndarray) -> list[np.ndarray]:
    """Q2_K (84 B: scales[16] (scale | min << 4), qs[64], d, dmin): weight 128n + 32j + l is
    bits 2j of qs[32n + l]."""
    nb = len(b)
    qs = b[:, 16:80].reshape(nb, 2, 1, 32)
    codes = (qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # (nb, 2, 4, 32)
    return [*_psplit(b[:, 80:82], F16L), *_psplit(b[:, 82:84], F16L), (b[:, :16] & 15).reshape(-1),
            (b[:, :16] >> 4).reshape(-1), np.ascontiguousarray(codes).reshape(-1)]


def _q2k_merge(parts: list[np.ndarray], out: np.ndarray) -> None:
    nb, npf = len(out), len(F16L.fields)
    out[:, 80:82] = _pmerge(parts[:npf], F16L, nb)
    out[:, 82:84] = _pmerge(parts[npf : 2 * npf], F16L, nb)
    out[:, :16] = parts[2 * npf].reshape(nb, 16) | (parts[2 * npf + 1].reshape(nb, 16) << 4)
    c = parts[-1].reshape(nb, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    out[:, 16:80] = np.bitwise_or.reduce(c, axis=2).reshape(nb, 64)


def _q2k_classes(parts: list[np.ndarray]) -> np.ndarray:
    npf = len(F16L.fields)
    nb = len(parts[0])
    d, dmin = _f16(parts[:npf], nb), _f16(parts[npf : 2 * npf], nb)
    sc = parts[2 * npf].reshape(nb, 16).astype(np.float64)
    mn = parts[2 * npf + 1].reshape(nb, 16).astype(np.float64)
    return _affine_class((d[:, None] * sc).reshape(-1), (dmin[:, None] * mn).reshape(-1), 2)


def _q3k_split(b: np.ndarray) -> list[np.ndarray]:
    """Q3_K (110 B: hmask[32], qs[64], scales[12], d): weight 128n + 32j + l is bits 2j of
    qs[32n + l] and bit 4n + j of hmask[l] (its third bit); 16 6-bit scales (scale + 32) whose
    low nibbles are bytes 0..7 of ``scales`` and high pairs bytes 8..11."""
    nb = len(b)
    qs = b[:, 32:96].reshape(nb, 2, 1, 32)
    low = (qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # (nb, 2, 4, 32)
    hm = (b[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (nb, 8, 32): bit 4n + j
    codes = low | (hm.reshape(nb, 2, 4, 32) << 2)
    s = b[:, 96:108]
    lo = np.concatenate([s[:, 0:8] & 15, s[:, 0:8] >> 4], axis=1)  # (nb, 16)
    hi = (s[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (nb, 4, 4): scale 4k + i
    sc = lo | (hi.reshape(nb, 16) << 4)
    return [*_psplit(b[:, 108:110], F16L), sc.reshape(-1), np.ascontiguousarray(codes).reshape(-1)]


def _q3k_merge(parts: list[np.ndarray], out: np.ndarray) -> None:
    nb, npf = len(out), len(F16L.fields)
    out[:, 108:110] = _pmerge(parts[:npf], F16L, nb)
    sc = parts[npf].reshape(nb, 16)
    out[:, 96:104] = (sc[:, 0:8] & 15) | ((sc[:, 8:16] & 15) << 4)
    out[:, 104:108] = np.bitwise_or.reduce((sc >> 4).reshape(nb, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[:, None],
                                           axis=1)
    codes = parts[-1].reshape(nb, 2, 4, 32)
    out[:, 32:96] = np.bitwise_or.reduce((codes & 3) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None],
                                         axis=2).reshape(nb, 64)
    out[:, 0:32] = np.bitwise_or.reduce((codes >> 2).reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[:, None], axis=1)


def _q3k_classes(parts: list[np.ndarray]) -> np.ndarray:
    npf = len(F16L.fields)
    nb = len(parts[0])
    d = _f16(parts[:npf], nb)
    return _scale_class((d[:, None] * (parts[npf].reshape(nb, 16).astype(np.float64) - 32)).reshape(-1))


def _q6k_split(b: np.ndarray) -> list[np.ndarray]:
    """Q6_K (210 B: ql[128], qh[64], scales[16] int8, d): weight 128n + 32k + l is the nibble
    k >> 1 of ql[64n + 32(k & 1) + l] and bits 2k of qh[32n + l]."""
    nb = len(b)
    ql = b[:, 0:128].reshape(nb, 2, 2, 32)  # (n, k & 1, l)
    low = np.stack([ql & 15, ql >> 4], axis=2)  # (nb, 2, k >> 1, k & 1, 32)
    low = low.reshape(nb, 2, 4, 32)  # k = 2·(k >> 1) + (k & 1)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)
    hi = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    codes = low | (hi << 4)
    return [*_psplit(b[:, 208:210], F16L), b[:, 192:208].reshape(-1).copy(), np.ascontiguousarray(codes).reshape(-1)]


def _q6k_merge(parts: list[np.ndarray], out: np.ndarray) -> None:
    nb, npf = len(out), len(F16L.fields)
    out[:, 208:210] = _pmerge(parts[:npf], F16L, nb)
    out[:, 192:208] = parts[npf].reshape(nb, 16)
    K.q6k_merge(_u8(parts[-1]), out)


def _q6k_classes(parts: list[np.ndarray]) -> np.ndarray:
    npf = len(F16L.fields)
    nb = len(parts[0])
    d = _f16(parts[:npf], nb)
    return _scale_class((d[:, None] * parts[npf].reshape(nb, 16).view(np.int8).astype(np.float64)).reshape(-1))


def _q8k_split(b: np.ndarray) -> list[np.ndarray]:
    """Q8_K (292 B: d f32, qs[256] int8, bsums[16] int16): each bsum stored as its difference
    (mod 2^16) from the sum of its 16 codes (0 in a well-formed block)."""
    nb = len(b)
    qs = b[:, 4:260]
    sums = qs.view(np.int8).reshape(nb, 16, 16).sum(axis=2, dtype=np.int64)
    bs = np.ascontiguousarray(b[:, 260:292]).view("<u2").astype(np.int64)
    resid = ((bs - sums) & 0xFFFF).astype(np.uint16)
    return [*_psplit(b[:, 0:4], F32L), resid.reshape(-1), np.ascontiguousarray(qs).reshape(-1)]


def _q8k_merge(parts: list[np.ndarray], out: np.ndarray) -> None:
    nb, npf = len(out), len(F32L.fields)
    out[:, 0:4] = _pmerge(parts[:npf], F32L, nb)
    qs = parts[-1].reshape(nb, 256)
    out[:, 4:260] = qs
    sums = qs.view(np.int8).reshape(nb, 16, 16).sum(axis=2, dtype=np.int64)
    bs = ((parts[npf].reshape(nb, 16).astype(np.int64) + sums) & 0xFFFF).astype("<u2")
    out[:, 260:292] = bs.view(np.uint8)


def _q8k_classes(parts: list[np.ndarray]) -> np.ndarray:
    nb = len(parts[0])
    d = _pmerge(parts[: len(F32L.fields)], F32L, nb).reshape(-1).view(np.float32).astype(np.float64)
    return _scale_class(d)


_NPF, _NPF32 = len(F16L.fields), len(F32L.fields)
# ggml block type name -> its fields and split (the covered types; others are raw bytes)
BLOCKS: dict[str, BlockType] = {
    "Q4_0": _legacy("Q4_0", 4, False),
    "Q4_1": _legacy("Q4_1", 4, True),
    "Q5_0": _legacy("Q5_0", 5, False),
    "Q5_1": _legacy("Q5_1", 5, True),
    "Q8_0": _legacy("Q8_0", 8, False),
    "Q2_K": BlockType("Q2_K", 84, 256, _pfields("d", F16L) + _pfields("dmin", F16L)
                      + (Field("scales", 4), Field("mins", 4), Field("codes", 2)),
                      (1,) * (2 * _NPF) + (16, 16, 256), _q2k_split, _q2k_merge, 16, 4, _q2k_classes),
    "Q3_K": BlockType("Q3_K", 110, 256, _pfields("d", F16L) + (Field("scales", 6), Field("codes", 3)),
                      (1,) * _NPF + (16, 256), _q3k_split, _q3k_merge, 16, SCALE_CLASSES, _q3k_classes),
    "Q4_K": _q4k_like("Q4_K", 4),
    "Q5_K": _q4k_like("Q5_K", 5),
    "Q6_K": BlockType("Q6_K", 210, 256, _pfields("d", F16L) + (Field("scales", 8), Field("codes", 6)),
                      (1,) * _NPF + (16, 256), _q6k_split, _q6k_merge, 16, SCALE_CLASSES, _q6k_classes),
    "Q8_K": BlockType("Q8_K", 292, 256, _pfields("d", F32L) + (Field("bsums", 16), Field("codes", 8)),
                      (1,) * _NPF32 + (16, 256), _q8k_split, _q8k_merge, 256, SCALE_CLASSES, _q8k_classes),
}


# the types gguf_kernel.decode_chunk decodes in one call -> (its kind of block, code bits); the kinds'
# numbers are gguf_kernel's (tests/test_lossless_gguf.py checks them). Q8_K (an F32 parameter,
# 16-bit bsums) takes the numpy path.
FUSED: dict[str, tuple[int, int]] = {
    "Q4_0": (0, 4), "Q5_0": (0, 5), "Q8_0": (0, 8), "Q4_1": (1, 4), "Q5_1": (1, 5),
    "Q2_K": (2, 2), "Q3_K": (3, 3), "Q4_K": (4, 4), "Q5_K": (4, 5), "Q6_K": (5, 6),
}


def classes(bt: BlockType, parts: list[np.ndarray]) -> np.ndarray:
    """(units,) class of each code unit, from a chunk's parameter fields ``parts`` (all but the
    codes): float64 arithmetic on exact values, the same in the coder and the decoder."""
    with np.errstate(all="ignore"):
        return bt.classes(parts)


def split(bt: BlockType, raw: np.ndarray) -> list[np.ndarray]:
    """The fields of a chunk of whole blocks ((nb·block_bytes,) uint8)."""
    parts = bt.split(raw.reshape(-1, bt.block_bytes))
    return [np.ascontiguousarray(p) for p in parts]


def merge(bt: BlockType, parts: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Inverse of :func:`split` into ``out`` ((nb·block_bytes,) uint8, C-contiguous)."""
    bt.merge(parts, out.reshape(-1, bt.block_bytes))
    return out


# ---------------------------------------------------------------- segments


def plan_gguf(path: Path) -> list:
    """The segments of a GGUF file (see the module's docstring)."""
    from .segments import Segment

    hdr = read_header(path)
    size = path.stat().st_size
    segs, pos = [Segment("bytes", 0, hdr.data_offset)], hdr.data_offset
    for t in sorted(hdr.tensors, key=lambda t: (t.offset, t.nbytes)):
        if t.offset < pos:
            raise GGUFError(f"{path}: tensor {t.name!r} overlaps the previous one or the header")
        if t.offset > pos:
            segs.append(Segment("bytes", pos, t.offset - pos))
        name, bw, bb = GGML_TYPES[t.type]
        if name in PLAIN:
            seg = Segment("tensor", t.offset, t.nbytes, t.name, PLAIN[name], tuple(reversed(t.dims)))
        elif name in BLOCKS:
            seg = Segment("tensor", t.offset, t.nbytes, t.name, "U8", (t.nbytes // bb, bb), gguf=name)
        else:  # a type whose blocks are not split (IQ*, TQ*...): its bytes
            seg = Segment("tensor", t.offset, t.nbytes, t.name, "U8", (t.nbytes,))
        segs.append(seg)
        pos = t.offset + t.nbytes
    if pos < size:
        segs.append(Segment("bytes", pos, size - pos))
    return segs
