"""Our rANS kernel (kernels.py, backend ``rans``): exact round trips, model bounds, bad streams."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from llmpress.lossless import kernels as K
from llmpress.lossless.container import open_tensor, pack, verify
from llmpress.lossless.entropy import BACKENDS, Rans, decode_stream, encode_stream, entropy_bits
from llmpress.lossless.reader import CorruptError, Packed


def _stream(draw_widths=st.integers(1, 16)):
    """(width, symbols): uniform, skewed (few symbols dominate) or single-symbol streams."""

    @st.composite
    def build(draw):
        width = draw(draw_widths)
        n = draw(st.integers(0, 3000))
        kind = draw(st.sampled_from(["uniform", "skewed", "single", "two"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        top = 1 << width
        if kind == "uniform":
            x = rng.integers(0, top, n)
        elif kind == "skewed":
            x = np.minimum(rng.geometric(draw(st.floats(0.05, 0.95)), n) - 1 + draw(st.integers(0, top - 1)), top - 1)
        elif kind == "single":
            x = np.full(n, draw(st.integers(0, top - 1)))
        else:
            x = np.where(rng.random(n) < 0.999, 0, top - 1)
        return width, x.astype(np.uint8 if width <= 8 else np.uint16)

    return build()


@given(_stream())
@settings(max_examples=150, deadline=None)
def test_rans_round_trip_random_streams(ws):
    width, sym = ws
    payload = Rans.encode(sym, width)
    out = Rans.decode(memoryview(payload), len(sym), width)
    assert out.dtype == (np.uint8 if width <= 8 else np.uint16)
    assert (out == sym).all() and len(out) == len(sym)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9])
def test_rans_tiny_and_empty_streams(n):
    sym = (np.arange(n) % 3).astype(np.uint8)
    assert (Rans.decode(memoryview(Rans.encode(sym, 2)), n, 2) == sym).all()
    bid, payload = encode_stream(sym, 2, ("rans",))  # empty / tiny: stored raw, still exact
    assert (decode_stream(bid, memoryview(payload), n, 2) == sym).all()


def test_rans_max_width_alphabet_all_symbols_present():
    rng = np.random.default_rng(0)
    sym = rng.permutation(np.arange(1 << 16).repeat(2)).astype(np.uint16)  # 65536 symbols: pb = 16
    payload = Rans.encode(sym, 16)
    assert (Rans.decode(memoryview(payload), len(sym), 16) == sym).all()


def test_rans_close_to_entropy_on_weight_exponents():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1 << 18, generator=g) * 0.02).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    head = ((w >> 5) & 0x3FF).astype(np.uint16)  # exponent ‖ 2 top mantissa bits, as planes.py
    payload = Rans.encode(head, 10)
    h = entropy_bits(head, 10) / 8
    assert len(payload) < h * 1.003 + 600  # within 0.3 % of n·H0, model included
    assert (Rans.decode(memoryview(payload), len(head), 10) == head).all()


@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=300), st.integers(9, 16))
@settings(max_examples=60, deadline=None)
def test_normalized_freqs_sum_and_cover(counts, pb):
    h = np.array(counts, np.int64)
    if np.count_nonzero(h) == 0 or np.count_nonzero(h) > 1 << pb:
        return
    f = K.normalize_freqs(h, pb)
    assert f.sum() == 1 << pb
    assert ((f > 0) == (h > 0)).all()


def test_model_bytes_round_trip_and_rejects_garbage():
    f = np.zeros(1024, np.int64)
    f[[3, 4, 500, 1023]] = [4000, 90, 5, 1]
    buf = K.write_model(f, 12)
    got = np.zeros(1024, np.int64)
    pb, used = K.read_model(buf, 1024, got)
    assert pb == 12 and used == len(buf) and (got == f).all()
    for bad in (buf[:-1], np.r_[np.uint8(17), buf[1:]].astype(np.uint8), np.zeros(1, np.uint8)):
        assert K.read_model(bad, 1024, np.zeros(1024, np.int64))[0] < 0
    assert K.read_model(buf, 512, np.zeros(512, np.int64))[0] < 0  # symbol 1023 outside the alphabet


def test_corrupted_rans_streams_raise_never_crash():
    rng = np.random.default_rng(1)
    sym = np.minimum(rng.geometric(0.2, 5000), 255).astype(np.uint8)
    payload = bytearray(Rans.encode(sym, 8))
    caught = 0
    for trial in range(300):
        bad = bytearray(payload)
        if trial % 3 == 0:
            bad = bad[: rng.integers(0, len(bad))]
        else:
            pos = rng.integers(0, len(bad))
            bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = Rans.decode(memoryview(bytes(bad)), len(sym), 8)
        except ValueError:
            caught += 1
            continue
        assert len(out) == len(sym)  # a flip the final-state check cannot see must still be in bounds
    assert caught > 250
    with pytest.raises(ValueError):
        Rans.decode(memoryview(bytes(payload)), len(sym) + 1, 8)  # wrong length: the states do not end at L


def test_rans_is_the_default_and_old_versions(tmp_path):
    assert "rans" in BACKENDS
    src = tmp_path / "w.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"w": (torch.randn(400, 300, generator=g) * 0.02).to(torch.bfloat16)}, str(src))
    out = tmp_path / "w.llmp"
    r = pack(src, out)
    assert r["policy"] == "rans" and r["ratio"] < 0.75
    with Packed(out) as p:
        bids = {p._read(c[0], c[1])[1] for _, s in p.tensors() for c in s["chunks"]}  # head stream's backend id
    assert bids == {BACKENDS["rans"].id}
    assert verify(out)["ok"] and verify(out, threads=0, sha256=False)["ok"]  # pool and inline decoding
    # a v1 file (written by the v1 code: constriction ANS, payload and segment crc32s) still
    # reads bit for bit; an unknown version is refused with a clear message
    v1 = Path(__file__).parent / "data" / "lossless_v1.llmp"
    assert verify(v1)["ok"]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=g) * 0.02).to(torch.bfloat16)
    f = torch.randn(50, generator=g)
    assert torch.equal(open_tensor(v1, "w").view(torch.int16), w.view(torch.int16))
    assert torch.equal(open_tensor(v1, "f").view(torch.int32), f.view(torch.int32))
    data = bytearray(v1.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    bad = tmp_path / "v99.llmp"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptError, match="version 99"):
        verify(bad)


# ---------------------------------------------------------------- v3 compact model bytes (model.py)

from llmpress.lossless import model as M  # noqa: E402
from llmpress.lossless.entropy import RansV2  # noqa: E402


@st.composite
def _freq_table(draw):
    """(alphabet size, pb, freqs): a normalised model with 1..A present symbols, dense or sparse."""
    width = draw(st.integers(1, 12))
    A = 1 << width
    pb = draw(st.integers(max(1, width), 16))
    k = draw(st.integers(1, A))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    present = np.sort(rng.choice(A, k, replace=False))
    h = np.zeros(A, np.int64)
    h[present] = rng.geometric(draw(st.floats(0.001, 0.9)), k)
    f = np.zeros(A, np.int64)
    if k == 1:
        f[present] = 1
        return A, 0, f
    return A, pb, K.normalize_freqs(h, pb)


@given(_freq_table())
@settings(max_examples=200, deadline=None)
def test_compact_model_round_trip(t):
    A, pb, f = t
    buf = M.write_model2(f, pb)
    got = np.zeros(A, np.int64)
    rpb, used = M.read_model2(buf, A, got)
    assert rpb == pb and used == len(buf) and (got == f).all()


def test_compact_model_is_smaller_and_rejects_garbage():
    rng = np.random.default_rng(3)
    x = ((torch.randn(1 << 16, generator=torch.Generator().manual_seed(3)) * 0.02)
         .view(torch.int32).numpy().view(np.uint32) >> 21 & 0x3FF).astype(np.uint16)
    f = K.normalize_freqs(np.bincount(x, minlength=1024).astype(np.int64), 12)
    buf = M.write_model2(f, 12)
    assert len(buf) < 0.6 * len(K.write_model(f, 12))  # the point of v3: half the model bytes
    for bad in (buf[:-1], buf[:1], np.r_[np.uint8(17), buf[1:]].astype(np.uint8), np.zeros(1, np.uint8)):
        assert M.read_model2(bad, 1024, np.zeros(1024, np.int64))[0] < 0
    assert M.read_model2(buf, 256, np.zeros(256, np.int64))[0] < 0  # symbols outside the alphabet
    caught = 0
    for _ in range(300):  # random bit flips: a clear error or a valid model, never a crash
        bad = buf.copy()
        bad[rng.integers(0, len(bad))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        got = np.zeros(1024, np.int64)
        pb, used = M.read_model2(bad, 1024, got)
        if pb < 0:
            caught += 1
        else:
            assert pb == 0 or got.sum() == 1 << pb
    assert caught > 100
    sym = x[:5000]
    payload = bytearray(Rans.encode(sym, 10))
    payload[1] ^= 0xFF  # lo of the model: out of the alphabet or inconsistent
    with pytest.raises(ValueError, match="rans stream"):
        Rans.decode(memoryview(bytes(payload)), len(sym), 10)


@given(_stream(st.integers(1, 12)))
@settings(max_examples=80, deadline=None)
def test_v2_backend_still_round_trips(ws):
    width, sym = ws
    assert (RansV2.decode(memoryview(RansV2.encode(sym, width)), len(sym), width) == sym).all()


@pytest.mark.parametrize("version, bid, rows, what", [
    (2, 3, 96, "four-lane rans id 3, varint models"),
    (3, 4, 96, "four-lane rans id 4, compact models, crc32 chunk checksums"),
    (4, 5, 256, "32 lanes with a word stream each: rans_v4, id 5; xxh3 chunk checksums"),
])
def test_older_files_still_read(version, bid, rows, what):
    """A container v2 / v3 / v4 file (``what``), written by that version's code, reads bit for bit."""
    path = Path(__file__).parent / "data" / f"lossless_v{version}.llmp"
    with Packed(path) as p:
        assert p.version == version
        assert bid in {p._read(c[0], c[1])[1] for _, s in p.tensors() for c in s["chunks"]}
    assert verify(path)["ok"]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, 64 if version < 4 else 160, generator=g) * 0.02).to(torch.bfloat16)
    f = torch.randn(50, generator=g)
    assert torch.equal(open_tensor(path, "w").view(torch.int16), w.view(torch.int16))
    assert torch.equal(open_tensor(path, "f").view(torch.int32), f.view(torch.int32))
