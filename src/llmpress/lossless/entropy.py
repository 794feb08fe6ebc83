"""Entropy-coding backends for one stream of small symbols (one field of one chunk).

Each backend turns ``sym`` ((n,) uint8/uint16, values < 2**width) into bytes and back. The
chunk coder tries the candidates a policy names and keeps the smallest payload, so "coded or
stored raw, whichever is smaller" holds per stream. Backends, by id (stored in the file; their
bytes are specified in docs/FORMAT.md):

- ``raw`` (0): bit-packed, ``width`` bits a symbol, no model.
- ``ans`` (1): rANS (constriction's ``stack.AnsCoder``) with a static categorical model built
  from this chunk's histogram (present symbols and counts scaled to 16 bits, stored with the
  stream): the ``ans`` policy, kept as a measured alternative; it holds the GIL.
- ``zstd`` (2): zstandard; on a stream without repeats this is zstd's Huffman literal stage
  (the "entropy stage" ZipNN uses); with repeats its LZ stage helps too.
- ``rans`` (7, the default): our 32-lane rANS with one shared word stream (rans32.py, coded and
  decoded eight lanes a vector), 12/13-bit static model from this chunk's histogram, stored in
  ~1.2 bytes a present symbol (freq_model.py); compiled with numba, GIL released. Streams shorter
  than ``WIDE_MIN`` go to ``rans4`` (4): the four-lane coder of kernels.py with the same model
  bytes (32 lanes' states would cost ~130 bytes more).
- ``split`` (6): the stream in 4–32 pieces, each coded on its own (raw or ``rans``): for chunks
  whose parts differ (MiniLM's untrained embedding rows have zero low mantissa bytes).

Ids 3 and 5 belonged to coders of container versions that are no longer read; they are not
reused.

``rans`` and ``ans`` land close to each other and to the per-chunk order-0 entropy; ``rans``
decodes many times faster (compiled, no GIL) and scales with threads; zstd's Huffman stage
rounds each symbol's code to whole bits, which costs a fraction of a bit per exponent
(``bench/lossless.py`` measures all three).
"""
from __future__ import annotations

import struct
from typing import Callable

import constriction
import numpy as np
import zstandard

from ..errors import InputError
from .compiled import Kernels

# the AOT build's kernels where it has them, else numba's, imported at their first call (compiled.py)
K = Kernels("kernels")
M = Kernels("freq_model")
R32 = Kernels("rans32")

# ---------------------------------------------------------------- bit packing (raw backend)


def pack_bits(sym: np.ndarray, width: int) -> bytes:
    """Pack ``width``-bit symbols into ceil(n*width/8) bytes, LSB-first (wider than 8 bits: low bytes first)."""
    if width == 8:
        return sym.astype(np.uint8, copy=False).tobytes()
    if width == 16:
        return sym.astype("<u2", copy=False).tobytes()
    if width > 8:  # the low bytes, then the high (width - 8)-bit parts (docs/FORMAT.md)
        return (sym & 0xFF).astype(np.uint8).tobytes() + K.pack_bits((sym >> 8).astype(np.uint8), width - 8).tobytes()
    return K.pack_bits(np.ascontiguousarray(sym), width).tobytes()


def unpack_bits(buf: bytes | memoryview, n: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`, into ``out`` ((n,) uint8, or uint16 past 8 bits) if given."""
    dt = np.uint8 if width <= 8 else np.uint16
    out = np.empty(n, dt) if out is None else out
    need = (n * width + 7) // 8
    if len(buf) != need:
        raise InputError(f"raw stream holds {len(buf)} bytes, expected {need}")
    if out.shape != (n,):
        raise InputError(f"raw stream: {n} symbols into an array of shape {out.shape}")
    b = np.frombuffer(buf, np.uint8)
    if width in (8, 16):
        out[:] = b if width == 8 else b.view("<u2")
    elif width > 8:
        high = np.empty(n, np.uint16)
        K.unpack_bits(b[n:], width - 8, high)
        out[:] = b[:n].astype(np.uint16) | high << 8
    else:
        K.unpack_bits(b, width, out)
    return out


# ---------------------------------------------------------------- backends

BACKENDS: dict[str, type] = {}
BY_ID: dict[int, type] = {}


def backend(name: str, bid: int) -> Callable[[type], type]:
    """Register a backend class (static ``encode(sym, width)`` / ``decode(buf, n, width)``; a
    backend that can decode into the caller's array also has ``decode_into(buf, n, width, out)``)."""

    def deco(cls: type) -> type:
        cls.name, cls.id = name, bid
        BACKENDS[name] = BY_ID[bid] = cls
        return cls

    return deco


def _symbols(n: int, width: int) -> np.ndarray:
    return np.empty(n, np.uint8 if width <= 8 else np.uint16)


@backend("raw", 0)
class Raw:
    encode = staticmethod(lambda sym, width: pack_bits(sym, width))
    decode = staticmethod(lambda buf, n, width: unpack_bits(buf, n, width))
    decode_into = staticmethod(unpack_bits)


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
            raise InputError("ans stream: truncated model")
        (k,) = struct.unpack_from("<H", buf, 0)
        if k == 0 or 2 + 4 * k > len(buf) or (len(buf) - 2 - 4 * k) % 4:
            raise InputError("ans stream: malformed model")
        present = np.frombuffer(buf, "<u2", k, 2)
        q = np.frombuffer(buf, "<u2", k, 2 + 2 * k)
        dt = np.uint8 if width <= 8 else np.uint16
        if int(present.max()) >= 1 << width or q.min() == 0:
            raise InputError("ans stream: malformed model")
        if k == 1:
            return np.full(n, present[0], dt)
        words = np.frombuffer(buf, "<u4", offset=2 + 4 * k).copy()
        idx = constriction.stream.stack.AnsCoder(words).decode(_model(q), n)
        return present.astype(dt)[idx]


RANS_PB = 12  # default model precision: 2**12 slots (close to H0 on weights). The decode
# tables (6 bytes a slot) then take 24 KiB, inside L1 with room for the streams: 2**13 slots save
# a few hundredths of a per cent of a BF16 file but decode visibly slower, and 2**11 costs more
# bytes for no speed (bench/lossless.py). A layout may ask for more (fields.FloatLayout.head_precision)


def _hist(sym: np.ndarray, width: int, hist: np.ndarray | None) -> np.ndarray:
    return np.bincount(sym, minlength=1 << width).astype(np.int64) if hist is None else hist.astype(np.int64, copy=False)


@backend("rans4", 4)
class Rans4:
    """Our four-lane rANS (kernels.py) for streams shorter than ``WIDE_MIN``: 32 lanes' states
    would cost more than a short stream's decoding time saves.

    Layout: the model in ``freq_model.write_model`` (a bit stream, ~1.2 bytes a present symbol),
    then the u16 word stack (``kernels.rans_encode``). A single-symbol stream is its model
    alone. Encode and decode release the GIL, so chunks code in parallel threads.
    """

    @classmethod
    def encode(cls, sym: np.ndarray, width: int, hist: np.ndarray | None = None, precision: int = RANS_PB) -> bytes:
        """The stream's payload with a model of ``2**precision`` slots (more if the present
        symbols need them)."""
        if len(sym) == 0:
            return b""
        h = _hist(sym, width, hist)
        k = int(np.count_nonzero(h))
        if k <= 1:
            f = np.zeros_like(h)
            f[h > 0] = 1
            return M.write_model(f, 0).tobytes()
        pb = max(precision, (k - 1).bit_length())
        f = K.normalize_freqs(h, pb)
        return M.write_model(f, pb).tobytes() + cls.code(np.ascontiguousarray(sym), f, pb)

    @staticmethod
    def code(sym: np.ndarray, f: np.ndarray, pb: int) -> bytes:
        return K.rans_encode(sym, f, pb).astype("<u2", copy=False).tobytes()

    @classmethod
    def decode(cls, buf: memoryview, n: int, width: int) -> np.ndarray:
        return cls.decode_into(buf, n, width, _symbols(n, width))

    @classmethod
    def decode_into(cls, buf: memoryview, n: int, width: int, out: np.ndarray) -> np.ndarray:
        if n == 0 and len(buf) == 0:
            return out
        b = np.frombuffer(buf, np.uint8)
        f = np.zeros(1 << width, np.int64)
        pb, used = M.read_model(b, 1 << width, f)
        if pb < 0:
            raise InputError("rans stream: malformed model")
        present = np.flatnonzero(f)
        if len(present) == 1:
            if used != len(b):
                raise InputError("rans stream: trailing bytes after a single-symbol model")
            out[:] = present[0]
            return out
        rest = b[used:]
        if len(rest) % 2:
            raise InputError("rans stream: odd number of word bytes")
        dsym, dinfo = K.decode_table(f, pb)
        words = rest.view("<u2")
        rc = K.rans_decode(words if words.flags.aligned else words.copy(), n, dsym, dinfo, pb, out)
        if rc:
            raise InputError(f"rans stream: corrupted (code {rc})")
        return out


@backend("rans", 7)
class Rans(Rans4):
    """Our 32-lane rANS with one shared word stream (rans32.py: a group of eight lanes takes
    its renormalisation words with one load and one shuffle), static model from this stream's
    histogram.

    Layout: the model in ``freq_model.write_model``, then the 32 final states and the shared words
    (``rans32.encode``). A single-symbol stream is its model alone. Encode and decode release
    the GIL, so chunks code in parallel threads.
    """

    @staticmethod
    def code(sym: np.ndarray, f: np.ndarray, pb: int) -> bytes:
        return R32.encode(sym, f, pb).tobytes()

    @classmethod
    def decode_into(cls, buf: memoryview, n: int, width: int, out: np.ndarray) -> np.ndarray:
        if n == 0 and len(buf) == 0:
            return out
        rc = R32.decode_stream(np.frombuffer(buf, np.uint8), 1 << width, out)
        if rc:
            raise InputError(f"rans stream: {'malformed model' if rc == -8 else 'corrupted'} (code {rc})")
        return out


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
            raise InputError(f"zstd stream: {len(out)} bytes, expected {nbytes}")
        return np.frombuffer(out, np.uint8 if width <= 8 else "<u2").astype(np.uint8 if width <= 8 else np.uint16)


# ---------------------------------------------------------------- entropy estimates


def entropy_bits(sym: np.ndarray | None, width: int, hist: np.ndarray | None = None) -> float:
    """n · H0(sym): the order-0 (static, this-stream) entropy in bits (from ``hist`` if given)."""
    c = np.bincount(sym, minlength=1 << width) if hist is None else hist
    return float(K.hist_entropy_bits(np.ascontiguousarray(c, np.int64)))


# streams shorter than this take the four-lane coder: 32 lanes' states cost ~130 bytes more, and a
# short stream is little decoding time
WIDE_MIN = 1 << 15
OVERHEAD = {"rans": 4 * 32 + 8, "rans4": 32, "ans": 16}  # bytes beyond the entropy, ~


def encode_stream(sym: np.ndarray, width: int, candidates: tuple[str, ...],
                  est_bits: float | None = None, hist: np.ndarray | None = None,
                  view: bool = False, precision: int = RANS_PB, min_saving: float = 0.0) -> tuple[int, bytes]:
    """Smallest payload among ``raw`` and the candidates worth trying: (backend id, payload).

    ``ans``/``rans`` are skipped when the order-0 entropy (``est_bits``, computed if not given)
    plus their fixed costs says they cannot beat raw by 1 %; zstd is always tried (its LZ stage
    can beat order-0 on repeats); ``split`` codes the stream in pieces. ``hist`` (the stream's
    symbol counts, if the caller has them) spares a pass; ``precision``: the rANS model's bits.
    ``view``: a raw 8-bit stream comes back as a memoryview of ``sym`` (no copy).

    ``min_saving`` (bits a symbol): a coded payload is kept only where it is at least that much
    smaller than raw per symbol. Decoding a coded symbol costs about the same whatever it saves,
    and a raw one next to nothing, so a stream that saves a few hundredths of its bits (the 4-
    and 5-bit codes of a GGUF, near uniform within their range) is not worth its decoding time.
    """
    n = len(sym)
    raw_len = (n * width + 7) // 8
    best: tuple[int, bytes | None] = (0, None)
    size = raw_len - int(min_saving * n / 8)  # what a coded payload must come under
    if n:
        for name in candidates:
            if name == "rans" and n < WIDE_MIN:
                name = "rans4"
            if name == "ans" or name.startswith("rans"):
                est = entropy_bits(sym, width) if est_bits is None else est_bits
                if est / 8 + OVERHEAD[name] > min(0.99 * raw_len, size):
                    continue
            cls = BACKENDS[name]
            if name == "split":
                payload = cls.encode(sym, width, size, est_bits, min_saving)
            elif name.startswith("rans"):
                payload = cls.encode(sym, width, hist, precision)
            else:
                payload = cls.encode(sym, width)
            if payload is not None and len(payload) < size:
                best, size = (cls.id, payload), len(payload)
    if best[1] is None:
        if view and width == 8 and sym.dtype == np.uint8 and sym.flags.c_contiguous:
            return 0, memoryview(sym).cast("B")
        return 0, pack_bits(sym, width)
    return best  # type: ignore[return-value]


@backend("split", 6)
class Split:
    """A stream cut into ``k`` equal pieces (the last shorter), each coded on its own by
    :func:`encode_stream` (raw or ``rans``, with its own model). Pays where one part of a chunk
    differs from the rest: e.g. the low mantissa bytes of all-MiniLM's untrained embedding
    rows are zero while the trained rows' are uniform; one model for the mixture costs up to a
    bit a symbol more than two.

    Layout: ``u8 k`` then ``k × (u8 backend id | u32 length)``, then the pieces' payloads.
    """

    PIECES = (32, 16, 8, 4)  # tried from their estimates (the coarser from the finer histograms)
    MIN_PIECE = 4096

    @staticmethod
    def _est(h: np.ndarray, lens: np.ndarray, width: int, min_saving: float = 0.0) -> float:
        """Bytes pieces of ``lens`` symbols with counts ``h`` (k, 2**width) should cost: each
        raw, or its order-0 entropy plus the coder's fixed cost and ~1.3 bytes a present symbol
        of model where that saves ``min_saving`` bits a symbol (:func:`encode_stream`)."""
        hf = h.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.nansum(hf * np.log2(hf / lens[:, None]), axis=1) / 8
        fixed = np.where(lens >= WIDE_MIN, OVERHEAD["rans"], OVERHEAD["rans4"]) + 1.3 * np.count_nonzero(h, axis=1)
        raw = (lens * width + 7) / 8
        return float(np.where(ent + fixed < raw - min_saving * lens / 8, ent + fixed, raw).sum())

    @classmethod
    def encode(cls, sym: np.ndarray, width: int, beat: int, est_bits: float | None = None,
               min_saving: float = 0.0) -> bytes | None:
        """The split payload, or None when no piece count is estimated to beat ``beat`` bytes
        (from the pieces' histograms, before any coding). Skipped when the whole stream's
        order-0 entropy ``est_bits`` is within 0.5 % of raw: a part that differs from the rest
        lowers the entropy of the mixture, so near-uniform streams (most tails) cost nothing."""
        n = len(sym)
        if est_bits is not None and est_bits > 0.995 * n * width:
            return None
        k = cls.PIECES[0]
        while k > 1 and n < k * cls.MIN_PIECE:
            k //= 2
        if k < 2:
            return None
        step = -(-n // k)
        A = 1 << width
        hists = np.stack([np.bincount(sym[i : i + step], minlength=A) for i in range(0, n, step)]).astype(np.int64)
        lens = np.array([min(step, n - i) for i in range(0, n, step)], np.int64)
        best, best_k = beat - 1 - 5 * k, 0
        while len(hists) >= 2:
            e = cls._est(hists, lens, width, min_saving) + 1 + 5 * len(hists)
            if e < best:
                best, best_k = e, len(hists)
            if len(hists) % 2:
                break
            hists = hists[0::2] + hists[1::2]
            lens = lens[0::2] + lens[1::2]
        if not best_k:
            return None
        step = -(-n // best_k)
        pieces = [sym[i : i + step] for i in range(0, n, step)]
        coded = [encode_stream(p, width, ("rans",), min_saving=min_saving) for p in pieces]
        head = struct.pack("<B", len(coded)) + b"".join(struct.pack("<BI", b, len(c)) for b, c in coded)
        return head + b"".join(c for _, c in coded)

    @staticmethod
    def decode(buf: memoryview, n: int, width: int) -> np.ndarray:
        return Split.decode_into(buf, n, width, _symbols(n, width))

    @staticmethod
    def decode_into(buf: memoryview, n: int, width: int, out: np.ndarray) -> np.ndarray:
        if len(buf) < 1:
            raise InputError("split stream: truncated")
        k = buf[0]
        if k < 1 or len(buf) < 1 + 5 * k:
            raise InputError("split stream: malformed header")
        step = -(-n // k)
        if (k - 1) * step >= n:
            raise InputError("split stream: more pieces than symbols")
        pos = 1 + 5 * k
        for i in range(k):
            bid, ln = struct.unpack_from("<BI", buf, 1 + 5 * i)
            if bid == Split.id or pos + ln > len(buf):
                raise InputError("split stream: bad piece")
            m = min(step, n - i * step)
            decode_stream(bid, buf[pos : pos + ln], m, width, out[i * step : i * step + m])
            pos += ln
        if pos != len(buf):
            raise InputError("split stream: trailing bytes")
        return out


def decode_stream(bid: int, payload: memoryview, n: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` symbols of one stream; into ``out`` ((n,) uint8, or uint16 past 8 bits) if
    given (decoded in place where the backend can, else copied)."""
    if bid not in BY_ID:
        raise InputError(f"unknown entropy backend id {bid}")
    cls = BY_ID[bid]
    if out is None:
        return cls.decode(payload, n, width)
    into = getattr(cls, "decode_into", None)
    if into is not None:
        return into(payload, n, width, out)
    sym = cls.decode(payload, n, width)
    if sym.shape != out.shape:
        raise InputError("stream decoded to the wrong length")
    out[:] = sym
    return out
