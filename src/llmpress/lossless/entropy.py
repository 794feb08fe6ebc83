"""Entropy-coding backends for one stream of small symbols (one field of one chunk).

Each backend turns ``sym`` ((n,) uint8/uint16, values < 2**width) into bytes and back. The
chunk coder tries the candidates a policy names and keeps the smallest payload, so "coded or
stored raw, whichever is smaller" holds per stream. Backends, by id (stored in the file):

- ``raw`` (0): bit-packed, ``width`` bits a symbol, no model.
- ``ans`` (1): rANS (constriction's ``stack.AnsCoder``) with a static categorical model built
  from this chunk's histogram: the adaptive-per-chunk order-0 model. The model (present
  symbols and their counts scaled to 16 bits) is stored with the stream, so the decoder builds
  the identical quantized model.
- ``zstd`` (2): zstandard; on a stream without repeats this is zstd's Huffman literal stage
  (the "entropy stage" ZipNN uses); with repeats its LZ stage helps too.

Measured on all-MiniLM-L6-v2 (see bench/lossless.py): ``ans`` reaches the per-chunk order-0
entropy within ~0.1 %, zstd's Huffman stage costs ~0.04-0.1 bit more per exponent but decodes
~10x faster (constriction holds the GIL, so its decode does not scale with threads).
"""
from __future__ import annotations

import struct
from typing import Callable

import constriction
import numpy as np
import zstandard

# ---------------------------------------------------------------- bit packing (raw backend)


def pack_bits(sym: np.ndarray, width: int) -> bytes:
    """Pack ``width``-bit symbols little-endian into ceil(n*width/8) bytes."""
    n = len(sym)
    if width in (8, 16):
        return sym.astype(np.uint8 if width == 8 else "<u2").tobytes()
    if width > 8:  # low bytes, then the high (width - 8)-bit parts
        return (sym & 0xFF).astype(np.uint8).tobytes() + pack_bits((sym >> 8).astype(np.uint8), width - 8)
    g = 8 // np.gcd(8, width)  # symbols per group; a group is g*width/8 whole bytes
    nb = g * width // 8
    pad = (-n) % g
    x = np.concatenate([sym.astype(np.uint64), np.zeros(pad, np.uint64)]).reshape(-1, g)
    acc = np.zeros(len(x), np.uint64)
    for i in range(g):
        acc |= x[:, i] << np.uint64(width * i)
    out = acc.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :nb]
    return out.tobytes()[: (n * width + 7) // 8]


def unpack_bits(buf: bytes | memoryview, n: int, width: int) -> np.ndarray:
    dt = np.uint8 if width <= 8 else np.uint16
    need = (n * width + 7) // 8
    if len(buf) != need:
        raise ValueError(f"raw stream holds {len(buf)} bytes, expected {need}")
    if width in (8, 16):
        return np.frombuffer(buf, np.uint8 if width == 8 else "<u2").astype(dt)
    if width > 8:
        low = np.frombuffer(buf, np.uint8, n).astype(np.uint16)
        return low | unpack_bits(buf[n:], n, width - 8).astype(np.uint16) << 8
    g = 8 // np.gcd(8, width)
    nb = g * width // 8
    groups = -(-n // g)
    b = np.zeros((groups, 8), np.uint8)
    flat = np.zeros(groups * nb, np.uint8)
    flat[: len(buf)] = np.frombuffer(buf, np.uint8)
    b[:, :nb] = flat.reshape(groups, nb)
    acc = b.view("<u8").reshape(groups)
    mask = np.uint64((1 << width) - 1)
    out = np.empty((groups, g), dt)
    for i in range(g):
        out[:, i] = (acc >> np.uint64(width * i)) & mask
    return out.reshape(-1)[:n]


# ---------------------------------------------------------------- backends

BACKENDS: dict[str, type] = {}
BY_ID: dict[int, type] = {}


def backend(name: str, bid: int) -> Callable[[type], type]:
    """Register a backend class (static ``encode(sym, width)`` / ``decode(buf, n, width)``)."""

    def deco(cls: type) -> type:
        cls.name, cls.id = name, bid
        BACKENDS[name] = BY_ID[bid] = cls
        return cls

    return deco


@backend("raw", 0)
class Raw:
    encode = staticmethod(lambda sym, width: pack_bits(sym, width))
    decode = staticmethod(lambda buf, n, width: unpack_bits(buf, n, width))


def scaled_counts(sym: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Present symbols and their counts scaled to 1..65535 (the stored model)."""
    c = np.bincount(sym, minlength=1 << width)
    present = np.flatnonzero(c)
    cnt = c[present].astype(np.float64)
    q = np.maximum(1, np.round(cnt * (65535.0 / cnt.max()))).astype(np.uint16)
    return present.astype(np.uint16), q


def _model(q: np.ndarray) -> "constriction.stream.model.Categorical":
    p = q.astype(np.float64)
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False)


@backend("ans", 1)
class Ans:
    """Layout: u16 k | k × u16 symbol | k × u16 scaled count | u32 words of the ANS stack."""

    @staticmethod
    def encode(sym: np.ndarray, width: int) -> bytes:
        present, q = scaled_counts(sym, width)
        head = struct.pack("<H", len(present)) + present.astype("<u2").tobytes() + q.astype("<u2").tobytes()
        if len(present) == 1:
            return head
        lut = np.zeros(1 << width, np.int32)
        lut[present] = np.arange(len(present), dtype=np.int32)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(lut[sym], _model(q))
        return head + coder.get_compressed().astype("<u4").tobytes()

    @staticmethod
    def decode(buf: memoryview, n: int, width: int) -> np.ndarray:
        if len(buf) < 2:
            raise ValueError("ans stream: truncated model")
        (k,) = struct.unpack_from("<H", buf, 0)
        if k == 0 or 2 + 4 * k > len(buf) or (len(buf) - 2 - 4 * k) % 4:
            raise ValueError("ans stream: malformed model")
        present = np.frombuffer(buf, "<u2", k, 2)
        q = np.frombuffer(buf, "<u2", k, 2 + 2 * k)
        dt = np.uint8 if width <= 8 else np.uint16
        if int(present.max()) >= 1 << width or q.min() == 0:
            raise ValueError("ans stream: malformed model")
        if k == 1:
            return np.full(n, present[0], dt)
        words = np.frombuffer(buf, "<u4", offset=2 + 4 * k).copy()
        idx = constriction.stream.stack.AnsCoder(words).decode(_model(q), n)
        return present.astype(dt)[idx]


ZSTD_LEVEL = 3


@backend("zstd", 2)
class Zstd:
    @staticmethod
    def encode(sym: np.ndarray, width: int) -> bytes:
        data = sym.astype(np.uint8 if width <= 8 else "<u2").tobytes()
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)

    @staticmethod
    def decode(buf: memoryview, n: int, width: int) -> np.ndarray:
        nbytes = n * (1 if width <= 8 else 2)
        out = zstandard.ZstdDecompressor().decompress(bytes(buf), max_output_size=nbytes)
        if len(out) != nbytes:
            raise ValueError(f"zstd stream: {len(out)} bytes, expected {nbytes}")
        return np.frombuffer(out, np.uint8 if width <= 8 else "<u2").astype(np.uint8 if width <= 8 else np.uint16)


# ---------------------------------------------------------------- entropy estimates


def entropy_bits(sym: np.ndarray, width: int) -> float:
    """n · H0(sym): the order-0 (static, this-stream) entropy in bits."""
    if len(sym) == 0:
        return 0.0
    c = np.bincount(sym, minlength=1 << width)
    c = c[c > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum())


def encode_stream(sym: np.ndarray, width: int, candidates: tuple[str, ...],
                  est_bits: float | None = None) -> tuple[int, bytes]:
    """Smallest payload among ``raw`` and the candidates worth trying: (backend id, payload).

    ``ans`` is skipped when the order-0 entropy (``est_bits``, computed if not given) says it
    cannot beat raw by 1 %; zstd is always tried (its LZ stage can beat order-0 on repeats).
    """
    raw_len = (len(sym) * width + 7) // 8
    best: tuple[int, bytes | None] = (0, None)
    size = raw_len
    if len(sym):
        for name in candidates:
            if name == "ans":
                est = entropy_bits(sym, width) if est_bits is None else est_bits
                if est / 8 > 0.99 * raw_len:
                    continue
            payload = BACKENDS[name].encode(sym, width)
            if len(payload) < size:
                best, size = (BACKENDS[name].id, payload), len(payload)
    if best[1] is None:
        return 0, pack_bits(sym, width)
    return best  # type: ignore[return-value]


def decode_stream(bid: int, payload: memoryview, n: int, width: int) -> np.ndarray:
    if bid not in BY_ID:
        raise ValueError(f"unknown entropy backend id {bid}")
    return BY_ID[bid].decode(payload, n, width)
