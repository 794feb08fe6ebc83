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
from llmpress.lossless.reader import Packed


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
    head = ((w >> 5) & 0x3FF).astype(np.uint16)  # exponent ‖ 2 top mantissa bits, as fields.py
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


def test_rans_is_the_default(tmp_path):
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


# ---------------------------------------------------------------- compact model bytes (freq_model.py)

from llmpress.lossless import freq_model as M  # noqa: E402
from llmpress.lossless.entropy import Rans4  # noqa: E402


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
    buf = M.write_model(f, pb)
    got = np.zeros(A, np.int64)
    rpb, used = M.read_model(buf, A, got)
    assert rpb == pb and used == len(buf) and (got == f).all()


def test_compact_model_is_smaller_and_rejects_garbage():
    rng = np.random.default_rng(3)
    x = ((torch.randn(1 << 16, generator=torch.Generator().manual_seed(3)) * 0.02)
         .view(torch.int32).numpy().view(np.uint32) >> 21 & 0x3FF).astype(np.uint16)
    f = K.normalize_freqs(np.bincount(x, minlength=1024).astype(np.int64), 12)
    buf = M.write_model(f, 12)
    assert len(buf) < 1.5 * np.count_nonzero(f) + 8  # ~1.2 bytes a present symbol
    for bad in (buf[:-1], buf[:1], np.r_[np.uint8(17), buf[1:]].astype(np.uint8), np.zeros(1, np.uint8)):
        assert M.read_model(bad, 1024, np.zeros(1024, np.int64))[0] < 0
    assert M.read_model(buf, 256, np.zeros(256, np.int64))[0] < 0  # symbols outside the alphabet
    caught = 0
    for _ in range(300):  # random bit flips: a clear error or a valid model, never a crash
        bad = buf.copy()
        bad[rng.integers(0, len(bad))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        got = np.zeros(1024, np.int64)
        pb, used = M.read_model(bad, 1024, got)
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
def test_short_stream_backend_round_trips(ws):
    """rans4, the four-lane coder short streams take."""
    width, sym = ws
    assert (Rans4.decode(memoryview(Rans4.encode(sym, width)), len(sym), width) == sym).all()


FIXTURE = Path(__file__).parent / "data" / "lossless_v5.llmp"


def fixture_tensors() -> dict[str, torch.Tensor]:
    """The tensors of ``data/lossless_v5.llmp``'s model.safetensors (format 1, written by
    ``pack(folder, out, threads=1)`` on a folder holding them and a config.json): BF16 with a
    32-lane and a four-lane head, F32 with split tails and a raw chunk, F16, I64."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(128, 256, generator=g) * 0.02).to(torch.bfloat16)
    small = (torch.randn(96, 64, generator=g) * 0.02).to(torch.bfloat16)
    f = torch.randn(50, generator=g)
    gg = torch.randn(64, 256, generator=g) * 0.05
    gg[:32] = gg[:32].to(torch.bfloat16).float()  # zero low mantissa bytes in half the rows: split
    h = (torch.randn(64, 64, generator=g) * 0.1).to(torch.float16)
    i = torch.arange(100, dtype=torch.int64) * 3
    return {"w": w, "small": small, "f": f, "g": gg, "h": h, "i": i}


def test_format1_test_vector_reads_bit_for_bit():
    """The format-1 test vector (container version 5) decodes to its tensors, every checksum
    holding; it uses every backend the default policy writes."""
    with Packed(FIXTURE) as p:
        assert p.version == 5 and p.index["version"] == 5
        ids = set()
        for _, s in p.tensors():
            for o, ln, _, _ in s["chunks"]:
                b, pos = bytes(p._read(o, ln)), 1
                for _ in range(b[0]):
                    ids.add(b[pos])
                    pos += 5 + int.from_bytes(b[pos + 1 : pos + 5], "little")
    assert {BACKENDS[k].id for k in ("raw", "zstd", "rans4", "split", "rans")} == ids
    assert verify(FIXTURE)["ok"]
    for name, t in fixture_tensors().items():
        assert torch.equal(open_tensor(FIXTURE, name).view(torch.uint8), t.view(torch.uint8)), name


def test_the_writer_still_writes_the_test_vectors_streams(tmp_path):
    """Format 1 is frozen: packing the test vector's tensors again gives the same chunk payloads
    for every float tensor (our own coders' bytes; zstd's and the safetensors header's bytes
    may move with those libraries' versions, so they are left out)."""
    src = tmp_path / "src"
    src.mkdir()
    save_file(fixture_tensors(), str(src / "model.safetensors"), metadata={"format": "pt"})
    pack(src, tmp_path / "again.llmp", threads=1)

    def payloads(path: Path) -> dict[str, list[bytes]]:
        with Packed(path) as p:
            return {s["name"]: [bytes(p._read(o, ln)) for o, ln, _, _ in s["chunks"]]
                    for _, s in p.tensors() if s["dtype"] in ("BF16", "F16", "F32")}

    old, new = payloads(FIXTURE), payloads(tmp_path / "again.llmp")
    assert sorted(old) == ["f", "g", "h", "small", "w"] and old == new


@pytest.mark.parametrize("version", [1, 2, 3, 4, 11, 99])
def test_other_container_versions_are_refused(tmp_path, version):
    """Versions 1-4 (before format 1 was frozen) are no longer read; a newer one is not either:
    each a clear UnsupportedFormatError naming the version, before any decoding."""
    from llmpress.errors import UnsupportedFormatError

    data = bytearray(FIXTURE.read_bytes())
    data[8:12] = struct.pack("<I", version)
    bad = tmp_path / f"v{version}.llmp"
    bad.write_bytes(bytes(data))
    what = "is no longer read" if version < 5 else "reads versions 5 to 10"
    with pytest.raises(UnsupportedFormatError, match=f"container version {version}.*{what}"):
        verify(bad)
