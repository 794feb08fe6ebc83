"""docs/FORMAT.md is enough to read a ``.llmp`` file: a second reader, written from that document
alone (numpy, json, hashlib, zlib, zstandard, xxhash; constriction for the ``ans`` backend, as
the document says), decodes files llmpress writes and the format-1 test vector, byte for byte.

Nothing below imports llmpress's lossless modules: the reader knows the format only as the
document states it. llmpress is used only to write files (its public ``llmpress.pack``), and the
index is validated against docs/llmp-index.schema.json.
"""
from __future__ import annotations

import hashlib
import math
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Callable

import jsonschema
import numpy as np
import pytest
import torch
import xxhash
import zstandard
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "llmp-index.schema.json").read_text())
VECTOR = Path(__file__).parent / "data" / "lossless_v5.llmp"


class FormatError(Exception):
    pass


# ---------------------------------------------------------------- section 1: byte layout, section 2: index


def read_index(buf: bytes) -> dict:
    if buf[:8] != b"LLMPRESS":
        raise FormatError("magic")
    (version,) = struct.unpack_from("<I", buf, 8)
    if version not in (5, 6, 7, 8, 9, 10):
        raise FormatError(f"version {version}")
    off, ln, crc, end = struct.unpack_from("<QQI8s", buf, len(buf) - 28)
    if end != b"LLMPIDX1" or off < 12 or off + ln + 28 != len(buf):
        raise FormatError("footer")
    blob = buf[off : off + ln]
    if zlib.crc32(blob) != crc:
        raise FormatError("index crc32")
    index = json.loads(zstandard.ZstdDecompressor().decompress(blob))
    if index.get("version") != version:
        raise FormatError("index version")
    index["_payload_end"] = off
    return index


# ---------------------------------------------------------------- section 3: fields

FLOATS = {  # dtype: (itemsize, E, M, k, tail piece widths)
    "BF16": (2, 8, 7, 2, [6]),
    "F16": (2, 5, 10, 3, [8]),
    "F32": (4, 8, 23, 2, [8, 8, 6]),
    "F8_E4M3": (1, 4, 3, 3, [1]),
    "F8_E5M2": (1, 5, 2, 2, [1]),
}


def field_widths(dtype: str) -> list[int]:
    if dtype in FLOATS:
        _, E, _, k, tails = FLOATS[dtype]
        return [E + k] + tails
    return [8]


def merge(dtype: str, fields: list[np.ndarray]) -> bytes:
    itemsize, E, M, k, tails = FLOATS[dtype]
    low = M - k
    t = np.zeros(len(fields[0]), np.uint64)
    shift = 0
    for piece, w in zip(fields[1:], tails):
        t |= piece.astype(np.uint64) << np.uint64(shift)
        shift += w
    head = fields[0].astype(np.uint64)
    w = (t >> np.uint64(low)) << np.uint64(E + M) | head << np.uint64(low) | (t & np.uint64((1 << low) - 1))
    return w.astype(f"<u{itemsize}").tobytes()


# ---------------------------------------------------------------- section 4.2: backends


def raw_stream(p: bytes, n: int, W: int) -> np.ndarray:
    if len(p) != (n * W + 7) // 8:
        raise FormatError("raw length")
    b = np.frombuffer(p, np.uint8)
    if W == 8:
        return b.astype(np.int64)
    if W == 16:
        return b.view("<u2").astype(np.int64)
    if W > 8:
        return b[:n].astype(np.int64) | raw_stream(p[n:], n, W - 8) << 8
    bits = np.unpackbits(b, bitorder="little")[: n * W].reshape(n, W).astype(np.int64)
    return (bits << np.arange(W)).sum(1)


def zstd_stream(p: bytes, n: int, W: int) -> np.ndarray:
    out = zstandard.ZstdDecompressor().decompress(p)
    if len(out) != n * (1 if W <= 8 else 2):
        raise FormatError("zstd length")
    return np.frombuffer(out, np.uint8 if W <= 8 else "<u2").astype(np.int64)


def split_stream(p: bytes, n: int, W: int) -> np.ndarray:
    k = p[0]
    step = -(-n // k)
    if k < 1 or (k - 1) * step >= n:
        raise FormatError("split pieces")
    pos = 1 + 5 * k
    out = []
    for i in range(k):
        bid, ln = struct.unpack_from("<BI", p, 1 + 5 * i)
        if bid == 6:
            raise FormatError("split in split")
        out.append(stream(bid, p[pos : pos + ln], min(step, n - i * step), W))
        pos += ln
    if pos != len(p):
        raise FormatError("split length")
    return np.concatenate(out)


def ans_stream(p: bytes, n: int, W: int) -> np.ndarray:
    import constriction

    (K,) = struct.unpack_from("<H", p, 0)
    present = np.frombuffer(p, "<u2", K, 2).astype(np.int64)
    q = np.frombuffer(p, "<u2", K, 2 + 2 * K).astype(np.float64)
    if K == 1:
        return np.full(n, present[0], np.int64)
    words = np.frombuffer(p, "<u4", offset=2 + 4 * K).copy()
    model = constriction.stream.model.Categorical(q / q.sum(), perfect=False)
    return present[constriction.stream.stack.AnsCoder(words).decode(model, n)]


# ---------------------------------------------------------------- section 5: rANS


class Bits:
    """Section 5.1 step 3: bits from each byte's least significant bit up."""

    def __init__(self, p: bytes, pos: int):
        self.p, self.pos, self.acc, self.nacc = p, pos, 0, 0

    def get(self, m: int) -> int:
        while self.nacc < m:
            if self.pos >= len(self.p):
                raise FormatError("model truncated")
            self.acc |= self.p[self.pos] << self.nacc
            self.pos += 1
            self.nacc += 8
        v = self.acc & ((1 << m) - 1)
        self.acc >>= m
        self.nacc -= m
        return v

    def gamma(self) -> int:
        z = 0
        while self.get(1) == 0:
            z += 1
            if z > 24:
                raise FormatError("gamma")
        v = 1
        for _ in range(z):
            v = 2 * v + self.get(1)
        return v


def varint(p: bytes, pos: int) -> tuple[int, int]:
    x = sh = 0
    while True:
        b = p[pos]
        pos += 1
        x |= (b & 0x7F) << sh
        sh += 7
        if b < 0x80:
            return x, pos


def read_model(p: bytes, A: int) -> tuple[int, list[int] | int, int]:
    """(pb, frequencies, first coder byte); pb = 0: (0, the one symbol, end)."""
    pb = p[0]
    if pb == 0:
        s, pos = varint(p, 1)
        return 0, s, pos
    lo, pos = varint(p, 1)
    span, pos = varint(p, pos)
    hi = lo + span
    if span < 1 or hi >= A or pb > 16:
        raise FormatError("model range")
    bits = Bits(p, pos)
    present = [lo]
    if bits.get(1) == 0:
        present += [s for s in range(lo + 1, hi) if bits.get(1)]
    else:
        s = lo
        while True:
            s += bits.gamma()
            if s > hi:
                raise FormatError("model gap")
            if s == hi:
                break
            present.append(s)
    f = [0] * A
    Lp = 7
    for s in present:
        z = bits.gamma() - 1
        L = Lp + (z // 2 if z % 2 == 0 else -(z + 1) // 2)
        if not 1 <= L <= pb:
            raise FormatError("model length")
        f[s] = (1 << (L - 1)) + bits.get(L - 1)
        Lp = L
    f[hi] = (1 << pb) - sum(f)
    if f[hi] < 1:
        raise FormatError("model sum")
    return pb, f, bits.pos


def rans_decode(n: int, pb: int, f: list[int], states: list[int], next_word) -> list[int]:
    """Section 5.2: symbol i on lane i mod len(states); next_word(lane) gives a lane's next word."""
    start, acc = [], 0
    for v in f:
        start.append(acc)
        acc += v
    slot_sym = np.repeat(np.arange(len(f)), f).tolist()  # slot -> symbol
    mask, lanes, x = (1 << pb) - 1, len(states), list(states)
    out = [0] * n
    for i in range(n):
        j = i % lanes
        slot = x[j] & mask
        s = slot_sym[slot]
        out[i] = s
        v = f[s] * (x[j] >> pb) + slot - start[s]
        if v < 1 << 16:
            v = (v << 16) | next_word(j)
        x[j] = v
    if any(v != 1 << 16 for v in x):
        raise FormatError("final states")
    return out


def rans_stream(p: bytes, n: int, W: int, lanes: int) -> np.ndarray:
    if n == 0 and not p:
        return np.zeros(0, np.int64)
    pb, f, pos = read_model(p, 1 << W)
    if pb == 0:
        if pos != len(p):
            raise FormatError("bytes after a single-symbol model")
        return np.full(n, f, np.int64)
    if lanes == 32:
        states = list(struct.unpack_from("<32I", p, pos))
        words = np.frombuffer(p, "<u2", offset=pos + 128).tolist()
        at = [0]

        def next_word(_lane: int) -> int:
            at[0] += 1
            return words[at[0] - 1]

        out = rans_decode(n, pb, f, states, next_word)
        if at[0] != len(words):
            raise FormatError("words left over")
    else:
        w = np.frombuffer(p, "<u2", offset=pos).tolist()
        lens = [w[2 * j] | w[2 * j + 1] << 16 for j in range(4)]
        if sum(lens) != len(w) - 8:
            raise FormatError("lane lengths")
        begin = [8 + sum(lens[:j]) for j in range(4)]
        states = [w[b] | w[b + 1] << 16 for b in begin]
        at = [b + 2 for b in begin]

        def next_word(lane: int) -> int:
            at[lane] += 1
            return w[at[lane] - 1]

        out = rans_decode(n, pb, f, states, next_word)
        if at != [b + ln for b, ln in zip(begin, lens)]:
            raise FormatError("words left over")
    return np.array(out, np.int64)


def stream(bid: int, p: bytes, n: int, W: int) -> np.ndarray:
    backends = {
        0: raw_stream,
        1: ans_stream,
        2: zstd_stream,
        4: lambda p, n, W: rans_stream(p, n, W, 4),
        6: split_stream,
        7: lambda p, n, W: rans_stream(p, n, W, 32),
    }
    if bid not in backends:
        raise FormatError(f"backend id {bid}")
    out = backends[bid](p, n, W)
    if len(out) != n or (n and out.max() >= 1 << W):
        raise FormatError("stream length")
    return out


# ---------------------------------------------------------------- section 4.1: chunks; section 6: checksums


def split_codes(symbols: np.ndarray, b: int, raw: int) -> bytes:
    """Section 3.1: the b low bits of each symbol, least significant first, the first 8·raw of
    them packed into bytes least significant bit first."""
    bits = [(int(s) >> j) & 1 for s in symbols for j in range(b)][: 8 * raw]
    return bytes(sum(bits[8 * i + j] << j for j in range(8)) for i in range(raw))


def decode_chunk(p: bytes, dtype: str, raw: int, codes: int = 0) -> bytes:
    widths = [codes] if codes else field_widths(dtype)
    n = -(-8 * raw // codes) if codes else raw // FLOATS[dtype][0] if dtype in FLOATS else raw
    if p[0] != len(widths):
        raise FormatError("field count")
    pos, fields = 1, []
    for W in widths:
        bid, ln = struct.unpack_from("<BI", p, pos)
        fields.append(stream(bid, p[pos + 5 : pos + 5 + ln], n, W))
        pos += 5 + ln
    if pos != len(p):
        raise FormatError("chunk length")
    if codes:
        return split_codes(fields[0], codes, raw)
    return merge(dtype, fields) if dtype in FLOATS else fields[0].astype(np.uint8).tobytes()


def param_floats(words: bytes, params: str) -> np.ndarray:
    """Section 3.2: parameters widened exactly to float32."""
    if params == "F16":
        return np.frombuffer(words, "<f2").astype(np.float32)
    if params == "BF16":
        return (np.frombuffer(words, "<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.frombuffer(words, "<f4").astype(np.float32)


def decode_grid_chunk(p: bytes, grid: dict, raw: int) -> bytes:
    """Sections 3.2 and 4.1: a mode byte, then float fields (0) or the grid's fields (1)."""
    if p[0] == 0:
        return decode_chunk(p[1:], "F32", raw)
    if p[0] != 1:
        raise FormatError("mode")
    B, params, bits = grid["block"], grid["params"], grid["bits"]
    n = raw // 4
    nb, pw = n // B, field_widths(params)
    P = 2 if grid["formula"] == "affine" else 1
    widths, counts = [bits] + pw * P, [n] + [nb] * len(pw) * P
    if raw % (4 * B) or p[1] != len(widths):
        raise FormatError("grid chunk")
    pos, fields = 2, []
    for W, c in zip(widths, counts):
        bid, ln = struct.unpack_from("<BI", p, pos)
        fields.append(stream(bid, p[pos + 5 : pos + 5 + ln], c, W))
        pos += 5 + ln
    if pos != len(p):
        raise FormatError("chunk length")
    vals = [param_floats(merge(params, fields[1 + i * len(pw) : 1 + (i + 1) * len(pw)]), params) for i in range(P)]
    s = fields[0].reshape(nb, B)
    if grid["formula"] == "scale":
        x = vals[0][:, None] * (s - grid["zero"]).astype(np.float32)
    else:
        x = (vals[0][:, None] * s.astype(np.float32)) + vals[1][:, None]
    return x.astype("<f4").tobytes()


ZERO_DTYPES = {"F16": "<f2", "F32": "<f4", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4",
               "I32": "<i4", "U64": "<u8", "I64": "<i8"}


def zero_points(zs: dict, data: bytes, packing: str, b: int) -> list[list[int]]:
    """Section 3.4: the table Z[r][g] of a zero-point tensor's decoded bytes."""
    R0, G = zs["shape"]
    if packing == "value":
        if zs["dtype"] == "BF16":
            v = (np.frombuffer(data, "<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            v = np.frombuffer(data, ZERO_DTYPES[zs["dtype"]])
        v = v.reshape(R0, G).tolist()
        if any(x != int(x) or not 0 <= x < 1 << b for row in v for x in row):
            raise FormatError("zero point")
        return [[int(x) for x in row] for row in v]
    assert packing == "packed" and zs["dtype"] in ("I32", "U32")
    words = np.frombuffer(data, "<u4").reshape(R0, G)
    R = 32 * R0 // b
    table = [[0] * G for _ in range(R)]
    for g in range(G):
        col = int.from_bytes(b"".join(int(w).to_bytes(4, "little") for w in words[:, g]), "little")
        for r in range(R):
            table[r][g] = (col >> (r * b)) & ((1 << b) - 1)
    return table


def decode_zero_chunk(p: bytes, s: dict, raw: int, i0: int, table: list[list[int]]) -> bytes:
    """Section 3.4: a mode byte, then the codes (0) or the codes less their zero points (1)."""
    b, z = s["codes"], s["zero"]
    if p[0] not in (0, 1, 2, 3):
        raise FormatError("mode")
    as_bytes, less = p[0] >> 1, p[0] & 1
    m = raw if as_bytes else -(-8 * raw // b)
    if p[1] != 1:
        raise FormatError("field count")
    bid, ln = struct.unpack_from("<BI", p, 2)
    if 7 + ln != len(p):
        raise FormatError("chunk length")
    sym = stream(bid, p[7:], m, 8 if as_bytes else b)
    R, G = len(table), len(table[0]) if table else 0

    def zp(j: int) -> int:
        i = i0 + j
        r, g = i // z["row"], (i % z["row"]) // z["group"]
        return table[r][g] if r < R and g < G else 0

    if not as_bytes:
        if less:
            sym = np.array([(d + zp(j)) % (1 << b) for j, d in enumerate(sym.tolist())])
        return split_codes(sym, b, raw)
    data = bytes(sym.astype(np.uint8))
    if not less:
        return data
    bits = int.from_bytes(data, "little")
    for j in range(8 * raw // b):
        d = (bits >> (j * b)) & ((1 << b) - 1)
        bits ^= (d ^ ((d + zp(j)) % (1 << b))) << (j * b)
    return bits.to_bytes(raw, "little")


# ---------------------------------------------------------------- section 3.3: GGUF blocks


def _nib(q: int) -> Callable:  # Q4_0, Q4_1 codes; and the low bits of Q5_0, Q5_1
    return lambda i, b: (q + i % 16, 4 * (i // 16) + b)


def _q5(h: int, q: int) -> Callable:
    return lambda i, b: (q + i % 16, 4 * (i // 16) + b) if b < 4 else (h + i // 8, i % 8)


def _q3k_code(i: int, b: int) -> tuple[int, int]:
    n, j, l = i // 128, i % 128 // 32, i % 32
    return (32 + 32 * n + l, 2 * j + b) if b < 2 else (l, 4 * n + j)


def _q3k_scale(s: int, b: int) -> tuple[int, int]:
    return (96 + s % 8, 4 * (s // 8) + b) if b < 4 else (104 + s % 4, 2 * (s // 4) + b - 4)


def _k4_scale(j: int, b: int) -> tuple[int, int]:
    return (4 + j, b) if j < 4 else (8 + j, b) if b < 4 else (j, b + 2)


def _k4_min(j: int, b: int) -> tuple[int, int]:
    return (8 + j, b) if j < 4 else (8 + j, b + 4) if b < 4 else (4 + j, b + 2)


def _k4_code(q: int) -> Callable:
    def pos(i: int, b: int) -> tuple[int, int]:
        j, h, l = i // 64, i % 64 // 32, i % 32
        return (q + 32 * j + l, 4 * h + b) if b < 4 else (16 + l, 2 * j + h)
    return pos


def _q6k_code(i: int, b: int) -> tuple[int, int]:
    n, k, l = i // 128, i % 128 // 32, i % 32
    return (64 * n + 32 * (k % 2) + l, 4 * (k // 2) + b) if b < 4 else (128 + 32 * n + l, 2 * k + b - 4)


# type -> (block bytes, parameters [(name, byte offset, dtype)], fields [(name, width, count, position)],
# grouping (unit, classes, "affine" | "scaled"))
GGUF = {
    "Q4_0": (18, [("d", 0, "F16")], [("codes", 4, 32, _nib(2))], (32, 8, "scaled")),
    "Q4_1": (20, [("d", 0, "F16"), ("m", 2, "F16")], [("codes", 4, 32, _nib(4))], (32, 16, "affine")),
    "Q5_0": (22, [("d", 0, "F16")], [("codes", 5, 32, _q5(2, 6))], (32, 8, "scaled")),
    "Q5_1": (24, [("d", 0, "F16"), ("m", 2, "F16")], [("codes", 5, 32, _q5(4, 8))], (32, 32, "affine")),
    "Q8_0": (34, [("d", 0, "F16")], [("codes", 8, 32, lambda i, b: (2 + i, b))], (32, 8, "scaled")),
    "Q2_K": (84, [("d", 80, "F16"), ("dmin", 82, "F16")],
             [("scales", 4, 16, lambda j, b: (j, b)), ("mins", 4, 16, lambda j, b: (j, 4 + b)),
              ("codes", 2, 256, lambda i, b: (16 + 32 * (i // 128) + i % 32, 2 * (i % 128 // 32) + b))], (16, 4, "affine")),
    "Q3_K": (110, [("d", 108, "F16")], [("scales", 6, 16, _q3k_scale), ("codes", 3, 256, _q3k_code)], (16, 8, "scaled")),
    "Q4_K": (144, [("d", 0, "F16"), ("dmin", 2, "F16")],
             [("scales", 6, 8, _k4_scale), ("mins", 6, 8, _k4_min), ("codes", 4, 256, _k4_code(16))], (32, 16, "affine")),
    "Q5_K": (176, [("d", 0, "F16"), ("dmin", 2, "F16")],
             [("scales", 6, 8, _k4_scale), ("mins", 6, 8, _k4_min), ("codes", 5, 256, _k4_code(48))], (32, 32, "affine")),
    "Q6_K": (210, [("d", 208, "F16")], [("scales", 8, 16, lambda s, b: (192 + s, b)), ("codes", 6, 256, _q6k_code)],
             (16, 8, "scaled")),
    "Q8_K": (292, [("d", 0, "F32")], [("bsums", 16, 16, None), ("codes", 8, 256, lambda i, b: (4 + i, b))],
             (256, 8, "scaled")),
}


def _gguf_unit_values(qtype: str, params: dict[str, np.ndarray], fields: dict[str, np.ndarray]) -> tuple:
    """Section 3.3's (v, m') of each unit (m' None for a scaled type), in binary64."""
    d = params["d"].astype(np.float64)
    if qtype in ("Q4_1", "Q5_1"):
        return d, -params["m"].astype(np.float64)
    if qtype in ("Q2_K", "Q4_K", "Q5_K"):
        sc, mn = fields["scales"].astype(np.float64), fields["mins"].astype(np.float64)
        return (d[:, None] * sc).reshape(-1), (params["dmin"].astype(np.float64)[:, None] * mn).reshape(-1)
    if qtype == "Q3_K":
        return (d[:, None] * (fields["scales"].astype(np.float64) - 32)).reshape(-1), None
    if qtype == "Q6_K":
        return (d[:, None] * fields["scales"].astype(np.uint8).view(np.int8).astype(np.float64)).reshape(-1), None
    return d, None


def _gguf_classes(v: np.ndarray, m: np.ndarray | None, C: int) -> np.ndarray:
    if m is not None:  # affine: the code of zero
        with np.errstate(all="ignore"):
            z = np.rint(m / v)
        return np.clip(np.where(np.isfinite(z), z, 0), 0, C - 1).astype(np.int64)
    e = np.array([math.frexp(abs(x))[1] if math.isfinite(x) else 0 for x in v], np.int64)
    counts: dict[int, int] = {}
    for x in e:
        counts[int(x)] = counts.get(int(x), 0) + 1
    E = min(k for k, c in counts.items() if c == max(counts.values())) if counts else 0
    return np.clip(e - E + 4, 0, 7)


def decode_gguf_chunk(p: bytes, qtype: str, raw: int) -> bytes:
    """Sections 3.3 and 4.1: a mode byte, then the block type's fields, codes in one field (0)
    or one per class (1); every symbol's bits placed where the table says."""
    bb, params, others, (unit, C, kind) = GGUF[qtype]
    nb = raw // bb
    if raw % bb or p[0] not in (0, 1):
        raise FormatError("gguf chunk")
    layout = [(f"{name}.{j}", W, nb) for name, _, dt in params for j, W in enumerate(field_widths(dt))]
    layout += [(name, W, c * nb) for name, W, c, _ in others[:-1]]
    code_w, code_n = others[-1][1], others[-1][2] * nb
    ncode = 1 if p[0] == 0 else C
    if p[1] != len(layout) + ncode:
        raise FormatError("field count")
    pos, f = 2, {}

    def read(n: int, W: int) -> np.ndarray:
        nonlocal pos
        bid, ln = struct.unpack_from("<BI", p, pos)
        out = stream(bid, p[pos + 5 : pos + 5 + ln], n, W)
        pos += 5 + ln
        return out

    for name, W, n in layout:
        f[name] = read(n, W)
    pv = {name: np.frombuffer(merge(dt, [f[f"{name}.{j}"] for j in range(len(field_widths(dt)))]),
                              "<f2" if dt == "F16" else "<f4") for name, _, dt in params}
    fields = {name: f[name].reshape(nb, -1) for name, _, _, _ in others[:-1]}
    if p[0] == 0:
        codes = read(code_n, code_w)
    else:
        cls = _gguf_classes(*_gguf_unit_values(qtype, pv, fields), C)
        units = np.zeros((len(cls), unit), np.int64)
        for c in range(C):
            where = np.flatnonzero(cls == c)
            units[where] = read(len(where) * unit, code_w).reshape(-1, unit)
        codes = units.reshape(-1)
    if pos != len(p):
        raise FormatError("chunk length")
    fields["codes"] = codes.reshape(nb, -1)
    block = np.zeros((nb, bb), np.uint8)
    for name, off, dt in params:
        size = 2 if dt == "F16" else 4
        block[:, off : off + size] = np.frombuffer(pv[name].tobytes(), np.uint8).reshape(nb, size)
    for name, W, c, at in others:
        if at is None:
            continue
        sym = fields[name].astype(np.int64)
        for i in range(c):
            for b in range(W):
                byte, bit = at(i, b)
                block[:, byte] |= (((sym[:, i] >> b) & 1) << bit).astype(np.uint8)
    if qtype == "Q8_K":
        sums = block[:, 4:260].view(np.int8).reshape(nb, 16, 16).astype(np.int64).sum(axis=2)
        block[:, 260:292] = ((fields["bsums"].astype(np.int64) + sums) % 65536).astype("<u2").view(np.uint8)
    return block.tobytes()


def decode_delta_chunk(p: bytes, dtype: str, raw: int, base: bytes) -> bytes:
    """Sections 3.5 and 4.1: a mode byte, then float fields (0) or P byte planes of x XOR b (1) or
    of the zigzagged difference of the ordered words (2)."""
    if p[0] == 0:
        return decode_chunk(p[1:], dtype, raw)
    P = FLOATS[dtype][0]
    n, B = raw // P, 8 * P
    if p[0] not in (1, 2) or p[1] != P or len(base) != raw:
        raise FormatError("delta chunk")
    v, pos = np.zeros(n, np.int64), 2
    for j in range(P):
        bid, ln = struct.unpack_from("<BI", p, pos)
        v |= stream(bid, p[pos + 5 : pos + 5 + ln], n, 8).astype(np.int64) << (8 * j)
        pos += 5 + ln
    if pos != len(p):
        raise FormatError("chunk length")
    b = np.frombuffer(base, f"<u{P}").astype(np.int64)
    if p[0] == 1:
        x = v ^ b
    else:
        d = (v >> 1) ^ -(v & 1)
        mag = b & ((1 << (B - 1)) - 1)
        o = ((np.where(b >> (B - 1) == 1, -1 - mag, mag) + d + (1 << (B - 1))) % (1 << B)) - (1 << (B - 1))
        x = np.where(o >= 0, o, (-1 - o) | (1 << (B - 1)))
    return x.astype(f"<u{P}").tobytes()


def read_safetensors(data: bytes) -> dict[str, bytes]:
    """A safetensors file's tensors' bytes by name (its format: u64 N, N bytes of JSON, data)."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    return {k: data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}


def read_llmp(path: Path, base: Path | None = None) -> tuple[dict, dict[str, bytes], set[int]]:
    """(index, {path: decoded bytes}, backend ids seen), every checksum checked; ``base``: the base
    model's folder (section 3.5)."""
    buf = path.read_bytes()
    index = read_index(buf)
    end = index.pop("_payload_end")
    jsonschema.Draft202012Validator(SCHEMA).validate(index)
    base_files = {q.relative_to(base).as_posix(): q.read_bytes() for q in base.rglob("*") if q.is_file()} if base else {}
    base_tensors = {k: v for rel, data in base_files.items() if rel.endswith(".safetensors")
                    for k, v in read_safetensors(data).items()}
    files, seen = {}, set()
    for f in index["files"]:
        segs, pos = {}, 0  # segment number -> its decoded bytes
        if f.get("base"):  # a file identical to the base's: no segments (section 3.5)
            assert index["version"] >= 8 and f["segments"] == []
            pos = f["size"]
        for s in f["segments"]:
            assert s["offset"] == pos
            pos += s["length"]
        # codes against zero points last: their zero-point tensors decoded first (section 3.4)
        for k, s in sorted(enumerate(f["segments"]), key=lambda ks: "zero" in ks[1]):
            table = None
            if "zero" in s:
                assert index["version"] >= 10 and s["zero"]["tensor"] != s["name"]
                zk, zs = next((k2, t) for k2, t in enumerate(f["segments"]) if t.get("name") == s["zero"]["tensor"])
                assert "zero" not in zs
                table = zero_points(zs, segs[zk], s["zero"]["packing"], s["codes"])
            if "base" in s:
                bt = base_tensors[s["name"]]
                assert index["version"] >= 8 and hashlib.sha256(bt).hexdigest() == s["base"]
            parts, done = [], 0  # done: the chunk's offset in the segment
            for off, ln, raw, check in s["chunks"]:
                assert 12 <= off and off + ln <= end
                p = buf[off : off + ln]
                q = 2 if "grid" in s or "zero" in s or "gguf" in s or "base" in s else 1
                for _ in range(p[q - 1]):
                    seen.add(p[q])
                    q += 5 + struct.unpack_from("<I", p, q + 1)[0]
                if "grid" in s:
                    assert index["version"] >= 7 and s["dtype"] == "F32" and s["shape"][-1] % s["grid"]["block"] == 0
                    data = decode_grid_chunk(p, s["grid"], raw)
                elif "zero" in s:
                    assert done % s["codes"] == 0
                    data = decode_zero_chunk(p, s, raw, 8 * done // s["codes"], table)
                elif "gguf" in s:
                    assert index["version"] >= 9 and s["dtype"] == "U8" and s["shape"][1] == GGUF[s["gguf"]][0]
                    data = decode_gguf_chunk(p, s["gguf"], raw)
                elif "base" in s:
                    data = decode_delta_chunk(p, s["dtype"], raw, bt[done : done + raw])
                else:
                    assert "codes" not in s or s["dtype"] == "U8" or index["version"] >= 10
                    data = decode_chunk(p, s["dtype"], raw, s.get("codes", 0))
                assert len(data) == raw and xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF == check
                parts.append(data)
                done += raw
            segs[k] = b"".join(parts)
        out = base_files[f["path"]] if f.get("base") else b"".join(segs[k] for k in range(len(f["segments"])))
        assert len(out) == f["size"] == pos and hashlib.sha256(out).hexdigest() == f["sha256"]
        files[f["path"]] = out
    return index, files, seen


# ---------------------------------------------------------------- the checks


def _source(d: Path) -> Path:
    """A small model folder with every float layout, integers, a bool and a config."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(200, 200, generator=g) * 0.02
    w[:100] = w[:100].to(torch.bfloat16).float()  # zero low mantissa bytes in half the rows: split tails
    d.mkdir()
    save_file({
        "w.bf16": (torch.randn(160, 256, generator=g) * 0.02).to(torch.bfloat16),  # 40960 heads: rans
        "small.bf16": (torch.randn(30, 64, generator=g) * 0.02).to(torch.bfloat16),  # rans4
        "w.f32": w,
        "w.f16": (torch.randn(64, 96, generator=g) * 0.1).half(),
        "w.f8": (torch.randn(40, 64, generator=g)).to(torch.float8_e4m3fn),
        "w.f8e5": torch.cat([torch.randn(999, generator=g).to(torch.float8_e5m2),  # + every bit pattern
                             torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2)]),
        "w.f8.scale": torch.rand(40, 1, generator=g),  # an FP8 release's per-channel scale
        "ids": torch.arange(300, dtype=torch.int32) % 17,
        "mask": torch.rand(100, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "test", "hidden_size": 200}))
    (d / "empty.txt").write_bytes(b"")
    return d


@pytest.mark.parametrize("policy", ["rans", "zstd", "ans"])
def test_second_reader_decodes_what_llmpress_writes(tmp_path, policy):
    import llmpress

    src = _source(tmp_path / "src")
    out = tmp_path / "m.llmp"
    llmpress.pack(src, out, policy=policy, chunk_bytes=1 << 16, threads=1)  # BF16: a 32768-word chunk and a short one
    index, files, seen = read_llmp(out)
    assert index["policy"] == policy and index["root"] == "folder"
    assert sorted(files) == sorted(p.name for p in src.iterdir())
    for name, data in files.items():
        assert data == (src / name).read_bytes(), name
    expect = {"rans": {0, 2, 4, 6, 7}, "zstd": {0, 2}, "ans": {0, 1, 2}}[policy]
    assert seen <= {0, 1, 2, 4, 6, 7} and expect <= seen, seen


def test_second_reader_decodes_codes_segments(tmp_path):
    """Format 2: a quantized llmpress folder's bit-packed codes (section 3.1), decoded by the second
    reader byte for byte."""
    import llmpress
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe

    sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
    from harness import tiny_source

    q = tmp_path / "q"
    compress(tiny_source(tmp_path / "src"), Recipe.uniform("rtn", bits=3, group_size=32), q, progress=False)
    out = tmp_path / "q.llmp"
    llmpress.pack(q, out, threads=1)
    index, files, _ = read_llmp(out)
    assert index["version"] == 6 and {s.get("codes") for f in index["files"] for s in f["segments"]} >= {3}
    for name, data in files.items():
        assert data == (q / name).read_bytes(), name


def test_second_reader_decodes_codes_against_zero_points(tmp_path):
    """Format 6: an llmpress asymz folder (zero points as F16 values), its compressed-tensors export
    (int32 codes, zero points packed along the rows) and a 3-bit one, decoded by the second reader
    byte for byte, chunks coded against their zero points among them."""
    import llmpress
    from llmpress.targets.api import export

    sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
    from harness import tiny_source

    q = tmp_path / "q"
    llmpress.quantize(tiny_source(tmp_path / "src"), q, method="rtn", bits=4, group_size=32, grid="asymz", progress=False)
    export(q, tmp_path / "ct", format="compressed-tensors")
    q3 = tmp_path / "q3"  # 3-bit codes: one symbol a code (modes 0 and 1)
    llmpress.quantize(tmp_path / "src", q3, method="rtn", bits=3, group_size=32, grid="asymz", progress=False)
    for folder, packing in ((q, "value"), (tmp_path / "ct", "packed"), (q3, "value")):
        out = tmp_path / f"{folder.name}.llmp"
        llmpress.pack(folder, out, threads=1, chunk_bytes=1000)  # chunks that start mid-row
        index, files, _ = read_llmp(out)
        zsegs = [s for f in index["files"] for s in f["segments"] if "zero" in s]
        assert index["version"] == 10 and zsegs and {s["zero"]["packing"] for s in zsegs} == {packing}
        buf = out.read_bytes()
        modes = {buf[c[0]] for s in zsegs for c in s["chunks"]}
        assert (1 if folder == q3 else 3) in modes  # less their zero points: a symbol a code, or as bytes
        for name, data in files.items():
            assert data == (folder / name).read_bytes(), name


def test_second_reader_decodes_grid_segments(tmp_path):
    """Format 3: float32 tensors dequantized from GGUF blocks (section 3.2), one of them with a
    value one ulp off (its chunk in mode 0), decoded by the second reader byte for byte."""
    import llmpress
    from gguf import GGMLQuantizationType, quants
    from safetensors.numpy import save_file as save_np

    rng = np.random.default_rng(3)
    t = {}
    for name in ("Q4_1", "Q8_0", "Q5_0"):
        w = rng.standard_normal((64, 512)).astype(np.float32) * 0.02
        qt = getattr(GGMLQuantizationType, name)
        t[name] = quants.dequantize(quants.quantize(w, qt), qt).astype(np.float32).reshape(w.shape)
    t["Q4_1"].reshape(-1)[-5] = np.nextafter(t["Q4_1"].reshape(-1)[-5], np.float32(1))
    src = tmp_path / "g.safetensors"
    save_np(t, str(src))
    out = tmp_path / "g.llmp"
    llmpress.pack(src, out, chunk_bytes=1 << 14, threads=1)
    index, files, _ = read_llmp(out)
    assert index["version"] == 7 and files["g.safetensors"] == src.read_bytes()
    grids = {s["name"]: s["grid"] for s in index["files"][0]["segments"] if "grid" in s}
    assert set(grids) == {"Q4_1", "Q8_0", "Q5_0"}
    modes = [out.read_bytes()[c[0]] for s in index["files"][0]["segments"] if s.get("name") == "Q4_1" for c in s["chunks"]]
    assert modes[-1] == 0 and set(modes[:-1]) == {1}


def test_second_reader_decodes_deltas(tmp_path):
    """Format 4: a fine-tune packed against its base (section 3.5): BF16, F32, F16 and FP8 tensors
    moved a little (DIFF chunks), one replaced outright, one without a counterpart, the config a
    reference to the base's; decoded by the second reader byte for byte."""
    import llmpress
    from safetensors.torch import load_file

    base = _source(tmp_path / "base")
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.json").write_bytes((base / "config.json").read_bytes())
    g = torch.Generator().manual_seed(8)
    t = load_file(str(base / "model.safetensors"))
    for k in ("w.bf16", "small.bf16", "w.f32", "w.f16"):
        t[k] = (t[k].float() * (1 + 1e-3 * torch.randn(t[k].shape, generator=g))).to(t[k].dtype)
    t["w.f8"] = torch.randn(40, 64, generator=g).to(torch.float8_e4m3fn)
    t["new.bf16"] = torch.randn(10, 16, generator=g).to(torch.bfloat16)
    save_file(t, str(ft / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "d.llmp"
    llmpress.pack(ft, out, base=base, chunk_bytes=1 << 14, threads=1)
    index, files, _ = read_llmp(out, base)
    assert index["version"] == 8 and index["base"]["kind"] == "folder"
    assert files["config.json"] == (ft / "config.json").read_bytes() and files.keys() == {"config.json", "model.safetensors"}
    assert files["model.safetensors"] == (ft / "model.safetensors").read_bytes()
    segs = {s["name"]: s for s in index["files"][1]["segments"] if s["kind"] == "tensor"}
    assert "base" not in segs["new.bf16"] and "base" not in segs["ids"] and "base" in segs["w.f8"]
    modes = {out.read_bytes()[c[0]] for s in segs.values() if "base" in s for c in s["chunks"]}
    assert 2 in modes and modes <= {0, 1, 2}
    with pytest.raises((AssertionError, KeyError)):  # the fine-tune is not its own base
        read_llmp(out, ft)


def test_second_reader_decodes_the_test_vector():
    """tests/data/lossless_v5.llmp (format 1): its tensors, generated again from their seeds,
    equal what the second reader decodes."""
    _, files, seen = read_llmp(VECTOR)
    assert seen == {0, 2, 4, 6, 7}
    data = files["model.safetensors"]
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(128, 256, generator=g) * 0.02).to(torch.bfloat16)
    small = (torch.randn(96, 64, generator=g) * 0.02).to(torch.bfloat16)
    f = torch.randn(50, generator=g)
    gg = torch.randn(64, 256, generator=g) * 0.05
    gg[:32] = gg[:32].to(torch.bfloat16).float()
    h = (torch.randn(64, 64, generator=g) * 0.1).to(torch.float16)
    i = torch.arange(100, dtype=torch.int64) * 3
    for name, t in {"w": w, "small": small, "f": f, "g": gg, "h": h, "i": i}.items():
        b, e = header[name]["data_offsets"]
        assert data[8 + n + b : 8 + n + e] == t.contiguous().view(torch.uint8).numpy().tobytes(), name
    assert json.loads(files["config.json"]) == {"model_type": "fixture", "hidden_size": 160}


def test_schema_refuses_a_bad_index():
    index = read_index(VECTOR.read_bytes())
    index.pop("_payload_end")
    v = jsonschema.Draft202012Validator(SCHEMA)
    assert v.is_valid(index)
    for path, value in ((("version",), 4), (("files", 0, "path"), "../x"), (("files", 0, "sha256"), "00"),
                        (("files", 1, "segments", 1, "dtype"), "bytes"),
                        (("files", 1, "segments", 1, "chunks", 0), [12, 1, 0, 0])):
        bad = json.loads(json.dumps(index))
        at = bad
        for k in path[:-1]:
            at = at[k]
        at[path[-1]] = value
        assert not v.is_valid(bad), path


def test_second_reader_catches_a_flipped_bit(tmp_path):
    """The reader is no rubber stamp: a flipped bit in a chunk fails its decoding or its checksum."""
    buf = bytearray(VECTOR.read_bytes())
    index = read_index(bytes(buf))
    seg = next(s for s in index["files"][1]["segments"] if s.get("name") == "w")  # BF16, rans (7)
    off, ln, _, _ = seg["chunks"][0]
    buf[off + ln // 2] ^= 0x10
    bad = tmp_path / "bad.llmp"
    bad.write_bytes(bytes(buf))
    with pytest.raises((FormatError, AssertionError)):
        read_llmp(bad)


@pytest.mark.parametrize("forced", [None, 1])
def test_second_reader_decodes_gguf_segments(tmp_path, monkeypatch, forced):
    """Format 5: a GGUF file of every block type of section 3.3 (gguf-py's quantizer where it
    has one, random blocks with finite parameters elsewhere), F32 and an IQ4_NL tensor, decoded
    by the second reader byte for byte; ``forced``: the writer made to group every chunk's codes
    (mode 1), so that every type's classes are checked against section 3.3."""
    import functools

    import llmpress
    from gguf import GGMLQuantizationType as T, GGUFWriter, quants

    if forced is not None:  # the writer's choice, not the reader: the reader stays llmpress-free
        import llmpress.lossless.chunk as writer

        monkeypatch.setattr(writer, "_encode_gguf", functools.partial(writer._encode_gguf, modes=(forced,)))
    rng = np.random.default_rng(8)
    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for name in GGUF:
        qt = getattr(T, name)
        if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            data = quants.quantize((rng.standard_normal((8, 512)) * 0.02).astype(np.float32), qt)
        else:
            bb, params = GGUF[name][0], GGUF[name][1]
            data = rng.integers(0, 256, (24, bb), dtype=np.uint8)
            for _, off, dt in params:
                v = np.abs(rng.standard_normal(24) * 1e-3).astype("<f2" if dt == "F16" else "<f4")
                data[:, off : off + v.itemsize] = v.view(np.uint8).reshape(24, -1)
        w.add_tensor(name, data, raw_dtype=qt)
    w.add_tensor("norm", np.ones(64, np.float32))
    w.add_tensor("iq", rng.integers(0, 256, (2, 18 * 4), dtype=np.uint8), raw_dtype=T.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "m.llmp"
    llmpress.pack(tmp_path / "m.gguf", out, chunk_bytes=1 << 12, threads=1)
    index, files, _ = read_llmp(out)
    assert index["version"] == 9 and files["m.gguf"] == (tmp_path / "m.gguf").read_bytes()
    segs = {s["name"]: s for s in index["files"][0]["segments"] if s["kind"] == "tensor"}
    assert {n for n, s in segs.items() if "gguf" in s} == set(GGUF)
    if forced:
        buf = out.read_bytes()
        assert {buf[c[0]] for s in segs.values() if "gguf" in s for c in s["chunks"]} == {1}
