"""Field split of a tensor's raw words: where the redundancy of a float checkpoint lives.

A trained weight's exponent carries ~2.6 bits of information in its 8 bits; its sign and
mantissa are close to uniform, except for the top mantissa bits, whose distribution within an
octave is skewed (a bell-shaped density falls across the octave [2^e, 2^(e+1))), so they are
predictable *given* the exponent. A float word is therefore split into

- ``head`` = exponent ‖ top ``k`` mantissa bits: one symbol, entropy-coded jointly, so the
  coder learns H(exponent) + H(top bits | exponent) from one per-chunk histogram;
- ``tail`` pieces = sign ‖ remaining mantissa bits, cut into bytes from the least significant
  end (the top piece may be narrower): coded when that pays, stored bit-packed otherwise.

FP8 (``F8_E4M3``, ``F8_E5M2``) is the same split with every mantissa bit in the head (k = M): the
head is the byte's magnitude (exponent ‖ mantissa, 7 bits) and the tail the sign alone (1 bit,
stored bit-packed: it carries a full bit). A weight's sign is independent of its magnitude, so this
is the whole byte's entropy without a 256-symbol model, and the mantissa, skewed within each
octave, is coded given its exponent (a sign ‖ exponent head with the mantissa as a tail loses
that); ``bench/lossless.py --files FP8 SmolLM2-FP8`` measures the three splits against each other.
An FP8 release's scales (``weight_scale``, ``weight_scale_inv``: F32 or BF16 tensors beside each
FP8 weight) are ordinary float tensors. Every byte pattern round-trips (e4m3fn's NaNs 0x7F/0xFF,
e5m2's infinities and NaNs).

Types that are not floats (integers, bool, F64...) are one field of raw bytes, except a
quantized folder's bit-packed codes (a ``U8`` tensor the pack was told holds ``b``-bit codes,
``b`` < 8, in :mod:`llmpress.quant.pack`'s little-endian stream): one field of ``b``-bit symbols,
one per code, so the coder sees the codes' own distribution rather than bytes that straddle
codes. ``split`` and ``merge`` are exact inverses on every bit pattern (NaN payloads,
subnormals, -0 included; any byte length for the codes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import compiled
from .entropy import RANS_PB

K = compiled.Kernels("kernels")  # numba's module, imported at the first JIT kernel a process calls


@dataclass(frozen=True)
class Field:
    name: str
    width: int  # bits per symbol (1..16)


class Layout:
    """How the words of one dtype split into fields (each an array of small unsigned ints)."""

    itemsize: int = 1
    fields: tuple[Field, ...] = (Field("bytes", 8),)

    def split(self, raw: np.ndarray) -> list[np.ndarray]:  # raw: (nbytes,) uint8
        return [raw]

    def merge(self, parts: list[np.ndarray], n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The words of the fields ``parts``: (n*itemsize,) uint8, written into ``out`` if given."""
        if out is None or out is parts[0]:
            return parts[0]
        out[:] = parts[0]
        return out

    def split_hist(self, raw: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``split`` plus each field's symbol counts ((2**width,) int64 each)."""
        return [raw], [np.bincount(raw, minlength=256).astype(np.int64)]

    def symbols(self, nbytes: int) -> int:
        """Symbols in each field of a chunk of ``nbytes`` raw bytes."""
        return nbytes // self.itemsize


class CodesLayout(Layout):
    """``bits``-bit integer codes bit-packed little-endian (code i in bits [b·i, b·i + b) of the
    byte stream) → one ``codes`` field of ``bits``-bit symbols. A chunk of L bytes holds
    ⌈8L/b⌉ symbols, the last one's bits past the chunk zero; merge keeps the first 8L bits, so
    any bytes round-trip (chunks cut on multiples of ``bits`` bytes keep whole codes)."""

    def __init__(self, bits: int):
        if not 1 <= bits < 8:
            raise ValueError(f"codes of {bits} bits: 1..7 only (8-bit codes are bytes)")
        self.bits = bits
        self.fields = (Field("codes", bits),)

    def symbols(self, nbytes: int) -> int:
        return -(-8 * nbytes // self.bits)

    def split_hist(self, raw: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        sym = self.codes(raw)
        return [sym], [np.bincount(sym, minlength=1 << self.bits).astype(np.int64)]

    def codes(self, raw: np.ndarray) -> np.ndarray:
        """The chunk's symbols (m,) uint8: the bytes read as an LSB-first stream of b-bit symbols
        (kernels.unpack_bits, compiled; bits past the chunk read as 0)."""
        sym = np.empty(self.symbols(len(raw)), np.uint8)
        K.unpack_bits(np.ascontiguousarray(raw, np.uint8), self.bits, sym)
        return sym

    def split(self, raw: np.ndarray) -> list[np.ndarray]:
        return self.split_hist(raw)[0]

    def merge(self, parts: list[np.ndarray], n: int, out: np.ndarray | None = None) -> np.ndarray:
        """``n``: the chunk's raw bytes (not its symbols): the first 8n bits of the symbols' LSB-first
        stream (kernels.pack_bits, compiled)."""
        raw = K.pack_bits(np.ascontiguousarray(parts[0], np.uint8), self.bits)[:n]
        if out is None:
            return raw
        out[:] = raw
        return out


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


class FloatLayout(Layout):
    """IEEE-like float with ``E`` exponent bits and ``M`` mantissa bits in an ``itemsize`` word."""

    def __init__(self, itemsize: int, exp_bits: int, man_bits: int, k: int, head_precision: int = RANS_PB):
        self.itemsize, self.E, self.M, self.k = itemsize, exp_bits, man_bits, k
        self.head_precision = head_precision  # the head's rANS model: 2**head_precision slots
        self.word = _UINT[itemsize]
        tail = 1 + man_bits - k  # sign + low mantissa bits
        widths = [8] * (tail // 8) + ([tail % 8] if tail % 8 else [])
        self.tail_widths = widths  # least significant piece first
        self.tail_w = np.array(widths, np.int64)  # the same, for compiled callers
        self.head_dtype = np.uint16 if exp_bits + k > 8 else np.uint8
        self._jit: tuple | None = None  # numba's (split, merge), made at first use (jit_kernels)
        self._kernels: tuple | None = None  # the (split, merge) called: the AOT build's, where it has them
        self.fields = (Field("head", exp_bits + k),) + tuple(Field(f"tail{i}", w) for i, w in enumerate(widths))

    def jit_kernels(self) -> tuple:
        """numba's compiled ``(split, merge)`` for this layout (kernels.float_kernels), at first use."""
        if self._jit is None:
            self._jit = K.float_kernels(self.E, self.M, self.k, tuple(self.tail_widths))
        return self._jit

    def kernels(self) -> tuple:
        """The ``(split, merge)`` called: the AOT build's where it has this layout (compiled.py), else numba's."""
        if self._kernels is None:
            self._kernels = compiled.layout_kernels(self)
        return self._kernels

    @property
    def merge_kernel(self):  # (head, t0, t1, t2, x): the compiled merge, for callers that hold the fields
        return self.kernels()[1]

    def split_hist(self, raw: np.ndarray, head: np.ndarray | None = None,
                   tails: np.ndarray | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``split`` plus counts; the head (n,) and tails (p, n) go into the given arrays, if any."""
        x = raw.view(self.word)  # (n,)
        n, p = len(x), len(self.tail_widths)
        head = np.empty(n, self.head_dtype) if head is None else head
        tails = np.empty((p, n), np.uint8) if tails is None else tails
        hh = np.zeros(1 << (self.E + self.k), np.int64)
        th = np.zeros((p, 256), np.int64)
        self.kernels()[0](x, head, tails, hh, th)
        return [head, *tails], [hh, *(th[j, : 1 << w] for j, w in enumerate(self.tail_widths))]

    def split(self, raw: np.ndarray) -> list[np.ndarray]:
        return self.split_hist(raw)[0]

    def merge(self, parts: list[np.ndarray], n: int, out: np.ndarray | None = None) -> np.ndarray:
        x = np.empty(n, self.word) if out is None else out.view(self.word)
        t = [np.ascontiguousarray(q, np.uint8) for q in parts[1:]]
        t += [t[0]] * (3 - len(t))
        self.merge_kernel(parts[0], t[0], t[1], t[2], x)
        return x.view(np.uint8)


# safetensors dtype name -> layout. k (top mantissa bits in the head) is chosen so the head's
# alphabet stays small (per-chunk model cost) while catching most of the mantissa skew. The
# head's model takes 2**12 slots (entropy.RANS_PB: decode tables in L1), FP32's 2**13: its head
# is a quarter of the word's bytes, so the larger tables cost half as much a decoded byte as in
# BF16, and the finer model saves a little more than they cost there
LAYOUTS: dict[str, Layout] = {
    "BF16": FloatLayout(2, 8, 7, 2),
    "F16": FloatLayout(2, 5, 10, 3),
    "F32": FloatLayout(4, 8, 23, 2, head_precision=13),
    "F8_E4M3": FloatLayout(1, 4, 3, 3),
    "F8_E5M2": FloatLayout(1, 5, 2, 2),
}
RAW = Layout()

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


# bit-packed codes of b bits (b < 8) in a U8 tensor (format 2) or any integer tensor (format 6:
# compressed-tensors' int32 words): the segment's ``codes`` in the index
CODES_DTYPES = ("U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")
CODES: dict[int, CodesLayout] = {b: CodesLayout(b) for b in range(1, 8)}


def layout(dtype: str, codes: int = 0) -> Layout:
    """How a segment's words split: by its dtype, or as ``codes``-bit codes where it holds them."""
    return CODES[codes] if codes else LAYOUTS.get(dtype, RAW)


def exponent(raw: np.ndarray, dtype: str) -> np.ndarray | None:
    """The exponent field of a float tensor's words (None for non-floats)."""
    lay = LAYOUTS.get(dtype)
    if not isinstance(lay, FloatLayout):
        return None
    x = raw.view(lay.word)
    return ((x >> lay.M) & ((1 << lay.E) - 1)).astype(np.uint8)
