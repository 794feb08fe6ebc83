"""The 32-lane rANS coder (rans32.py, backend ``rans``) and the ``split`` backend: exact round
trips, the vector, portable and scalar paths agree bit for bit, bad streams are refused."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpress.lossless import kernels as K
from llmpress.lossless import rans32 as S
from llmpress.lossless.entropy import (
    BACKENDS,
    Rans,
    Rans4,
    Split,
    decode_stream,
    encode_stream,
)


def _skewed(n: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.minimum(rng.geometric(0.2, n) - 1, (1 << width) - 1)
    return x.astype(np.uint8 if width <= 8 else np.uint16)


@given(st.integers(0, 3000), st.sampled_from([3, 6, 8, 10]), st.integers(0, 2**31), st.sampled_from([12, 13]))
@settings(max_examples=80, deadline=None)
def test_shared_stream_paths_agree(n, width, seed, pb):
    """rans32: the vector encoder (with and without vpermd) writes the scalar reference's
    bytes; every decoder (vector, portable vector, scalar) gives the symbols back, through
    the vector loop's hand-over to the checked one-lane tail at every remainder."""
    sym = _skewed(n, width, seed)
    h = np.bincount(sym, minlength=1 << width).astype(np.int64)
    if np.count_nonzero(h) < 2:
        return
    f = K.normalize_freqs(h, pb)
    b = S.encode(sym, f, pb)
    assert (b == S.encode_portable(sym, f, pb)).all() and (b == S.encode_scalar(sym, f, pb)).all()
    dsym, dinfo = K.decode_table(f, pb)
    for dec in (S.decode, S.decode_portable, S.decode_scalar):
        out = np.empty(n, sym.dtype)
        assert dec(b, n, dsym, dinfo, pb, out) == 0 and (out == sym).all()


def test_shared_stream_hostile_input_never_reads_outside():
    """Random bytes, truncations and flips of a real stream: the vector decoders give the
    code and the symbols of the scalar reference, whose every read is checked; so the vector
    loop hands over to it before reading past the stream, wherever the words run out."""
    rng = np.random.default_rng(5)
    sym = _skewed(20_000, 8, 5)
    f = K.normalize_freqs(np.bincount(sym, minlength=256).astype(np.int64), 12)
    dsym, dinfo = K.decode_table(f, 12)
    good = S.encode(sym, f, 12)
    cases = [rng.integers(0, 256, int(m)).astype(np.uint8) for m in rng.integers(0, 400, 40)]
    cases += [good[:m].copy() for m in (0, 2, 128, 130, 192, len(good) - 2)]
    for _ in range(40):
        bad = good.copy()
        bad[rng.integers(0, len(bad))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        cases.append(bad)
    for b in cases:
        ref = np.zeros(len(sym), np.uint8)
        rc = S.decode_scalar(b, len(sym), dsym, dinfo, 12, ref)
        for dec in (S.decode, S.decode_portable):
            out = np.zeros(len(sym), np.uint8)
            assert dec(b, len(sym), dsym, dinfo, 12, out) == rc
            assert (out == ref).all()
        assert rc != 0 or not (ref == sym).all() or len(b) == len(good)
    assert S.decode(good, len(sym), dsym, dinfo, 12, np.empty(len(sym), np.uint8)) == 0
    assert S.decode(good, len(sym), dsym, dinfo, 12, np.empty(len(sym) - 1, np.uint8)) == -1  # out too short
    from numba.core.errors import TypingError

    with pytest.raises(TypingError, match="C-contiguous"):  # the loops address arrays by pointer
        S.decode(good, len(sym), dsym, dinfo, 12, np.empty(2 * len(sym), np.uint8)[::2])


def test_a_skewed_streams_last_words_decode_as_the_reference():
    """A stream almost all one symbol: its last 32 words hold thousands of steps, which the vector
    decoders run on a padded copy; symbols and codes match the scalar reference, for the stream,
    its truncations and its flips (reads past the end read 0 there too)."""
    rng = np.random.default_rng(7)
    n = 100_003
    sym = ((rng.random(n) < 0.002) * rng.integers(1, 9, n)).astype(np.uint8)
    f = K.normalize_freqs(np.bincount(sym, minlength=256).astype(np.int64), 12)
    dsym, dinfo = K.decode_table(f, 12)
    good = S.encode(sym, f, 12)
    assert (len(good) - S.STATE_BYTES) // 2 < n // S.LANES  # fewer words than steps: the tail is most of it
    cases = [good, good[:-2].copy(), good[:-64].copy()]
    for _ in range(10):
        bad = good.copy()
        bad[rng.integers(0, len(bad))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        cases.append(bad)
    for b in cases:
        ref = np.zeros(n, np.uint8)
        rc = S.decode_scalar(b, n, dsym, dinfo, 12, ref)
        for dec in (S.decode, S.decode_portable):
            out = np.zeros(n, np.uint8)
            assert dec(b, n, dsym, dinfo, 12, out) == rc
            assert (out == ref).all()
    assert S.decode_scalar(good, n, dsym, dinfo, 12, np.empty(n, np.uint8)) == 0


def test_two_streams_decode_together_as_each_alone():
    """rans8.decode2 (two streams in one loop, packed tables): for good streams of different
    lengths and skews, truncations and flips, each stream's code and symbols are the scalar
    reference's; decode_streams2 reads the models too (and falls back to rans32 past 2**12 slots)."""
    from llmpress.lossless import rans8 as R8

    rng = np.random.default_rng(11)
    streams = []
    for n, p in ((70_001, 0.3), (50_000, 0.003), (31, 0.5), (4_000, 0.9)):
        sym = ((rng.random(n) < p) * rng.integers(1, 200, n)).astype(np.uint8)
        f = K.normalize_freqs(np.bincount(sym, minlength=256).astype(np.int64), 12)
        streams.append((sym, f, S.encode(sym, f, 12)))
    cases = []
    for sym, f, good in streams:
        cases.append((sym, f, good))
        cases.append((sym, f, good[: len(good) - 2 * int(rng.integers(1, 40))].copy()))
        bad = good.copy()
        bad[rng.integers(0, len(bad))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        cases.append((sym, f, bad))
    for (sa, fa, ba), (sb, fb, bb) in zip(cases, cases[3:] + cases[:3]):
        refs = []
        for s, f, b in ((sa, fa, ba), (sb, fb, bb)):
            dsym, dinfo = K.decode_table(f, 12)
            r = np.zeros(len(s), np.uint8)
            refs.append((S.decode_scalar(b, len(s), dsym, dinfo, 12, r), r))
        for dec in (R8.decode2, R8.decode2_portable):
            oa, ob = np.zeros(len(sa), np.uint8), np.zeros(len(sb), np.uint8)
            rc = dec(ba, len(sa), R8.decode_table8(fa, 12), 12, oa, bb, len(sb), R8.decode_table8(fb, 12), 12, ob)
            assert rc == (refs[0][0], refs[1][0]) and (oa == refs[0][1]).all() and (ob == refs[1][1]).all()
    (sa, _, _), (sb, _, _) = streams[0], streams[1]
    pa, pb = Rans.encode(sa, 8, precision=12), Rans.encode(sb, 8, precision=13)  # 2**13 slots: rans32's decoder
    oa, ob = np.zeros(len(sa), np.uint8), np.zeros(len(sb), np.uint8)
    assert R8.decode_streams2(np.frombuffer(pa, np.uint8), np.frombuffer(pb, np.uint8), 256, oa, ob) == 0
    assert (oa == sa).all() and (ob == sb).all() and pb[0] == 13


def test_rans_backend_round_trip_and_short_streams():
    sym = _skewed(200_000, 10, 1)
    payload = Rans.encode(sym, 10)
    assert (Rans.decode(memoryview(payload), len(sym), 10) == sym).all()
    bid, p = encode_stream(sym, 10, ("rans",))
    assert bid == BACKENDS["rans"].id
    bid, p = encode_stream(sym[:1000], 10, ("rans",))  # short: the four-lane coder (fewer bytes of lanes)
    assert bid == BACKENDS["rans4"].id and (decode_stream(bid, memoryview(p), 1000, 10) == sym[:1000]).all()


@pytest.mark.parametrize("cls", [Rans, Rans4])
def test_rans_corruption_is_refused(cls):
    sym = _skewed(50_000, 10, 2)
    payload = bytearray(cls.encode(sym, 10))
    for pos in (len(payload) // 2, len(payload) - 1):
        bad = bytearray(payload)
        bad[pos] ^= 0x5A
        try:
            out = cls.decode(memoryview(bytes(bad)), len(sym), 10)
        except ValueError:
            continue
        assert not (out == sym).all()  # a flip that still decodes must not give the input back
    with pytest.raises(ValueError, match="rans stream"):
        cls.decode(memoryview(bytes(payload[:-2])), len(sym), 10)  # truncated
    with pytest.raises(ValueError, match="rans stream"):
        cls.decode(memoryview(bytes(payload)), len(sym) + 1, 10)  # wrong length


def test_split_codes_a_mixed_stream_in_pieces():
    """Half zeros, half uniform bytes: one model for the mixture costs ~1 bit a symbol more
    than a model for each part; the split payload wins and decodes exactly."""
    rng = np.random.default_rng(3)
    sym = np.concatenate([np.zeros(1 << 17, np.uint8), rng.integers(0, 256, 1 << 17).astype(np.uint8)])
    whole = encode_stream(sym, 8, ("rans",))[1]
    bid, p = encode_stream(sym, 8, ("rans", "split"))
    assert bid == Split.id and len(p) < 0.85 * len(whole)  # ~5 bits -> ~4 bits a symbol
    assert (decode_stream(bid, memoryview(p), len(sym), 8) == sym).all()
    assert Split.encode(rng.integers(0, 256, 1 << 18).astype(np.uint8), 8, 1 << 18, 8.0 * (1 << 18)) is None
    bad = bytearray(p)
    bad[0] = 200  # a wrong piece count: pieces' headers and payloads no longer line up
    with pytest.raises(ValueError, match="stream"):
        decode_stream(bid, memoryview(bytes(bad)), len(sym), 8)


def test_compiled_chunk_decoder_matches_the_generic_path(tmp_path):
    """chunk_kernel.py: every float chunk of a packed file (BF16, FP32 with split tails, F16)
    decodes its fields in the one compiled call (code 0), merged to the generic path's bytes; its backend ids
    are entropy.py's; a corrupted chunk falls back to the generic path's clear error."""
    import torch
    from safetensors.torch import save_file

    from llmpress.lossless import chunk_kernel as CK
    from llmpress.lossless.chunk import _scratch_fields, decode_chunk
    from llmpress.lossless.container import pack
    from llmpress.lossless.fields import layout
    from llmpress.lossless.reader import Packed

    assert (CK.RAW, CK.RANS4, CK.SPLIT, CK.RANS) == tuple(BACKENDS[k].id for k in ("raw", "rans4", "split", "rans"))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(700, 300, generator=g) * 0.02
    w[:350] = 0.02 * torch.randint(-3, 4, (350, 300), generator=g).float()  # two halves: split tails
    src = tmp_path / "m.safetensors"
    save_file({"a": w, "b": w.to(torch.bfloat16), "c": w.half()}, str(src))
    pack(src, tmp_path / "m.llmp", chunk_bytes=1 << 18)
    seen = set()
    with Packed(tmp_path / "m.llmp") as p:
        for _, s in p.tensors():
            lay = layout(s["dtype"])
            for o, ln, raw, _ in s["chunks"]:
                buf = np.frombuffer(p._read(o, ln), np.uint8)
                fields = _scratch_fields(lay, raw // lay.itemsize)
                t = fields[1:] + [fields[1]] * (4 - len(fields))
                x = np.empty(raw, np.uint8)
                assert CK.decode_fields(buf, lay.fields[0].width, lay.tail_w, fields[0], *t) == 0
                lay.merge_kernel(fields[0], *t, x.view(lay.word))
                assert (x == decode_chunk(memoryview(buf), s["dtype"], raw, compiled=False)).all()
                pos = 1
                for _ in lay.fields:
                    seen.add(int(buf[pos]))
                    pos += 5 + int.from_bytes(buf[pos + 1 : pos + 5].tobytes(), "little")
                bad = buf.copy()
                bad[len(bad) // 2] ^= 0x40
                try:
                    got = decode_chunk(memoryview(bad), s["dtype"], raw)
                except ValueError:
                    continue
                assert not (got == x).all()  # (the chunk checksum catches what decodes)
    assert {BACKENDS["rans"].id, BACKENDS["raw"].id, BACKENDS["split"].id} <= seen
