"""GGUF files packed as themselves: each tensor's ggml blocks split into fields (lossless/gguf.py),
restored byte for byte; lying headers refused; a corrupted chunk caught."""
from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFWriter, quants

import llmpress
from llmpress.errors import CorruptFileError
from llmpress.lossless import chunk, gguf as GG
from llmpress.lossless.entropy import BY_ID
from llmpress.lossless.chunk import _encode_gguf, decode_chunk
from llmpress.lossless.reader import Packed

# types gguf-py quantizes (quants.quantize); the K-quants get random blocks with finite d/dmin
QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
RANDOM = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
# byte offsets of each K-quant block's F16 (or, for Q8_K, F32) parameters
PARAMS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_K": ()}


def _weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)


def random_blocks(rng: np.random.Generator, name: str, nb: int) -> np.ndarray:
    """(nb, block bytes) random blocks whose float parameters are finite, positive and small."""
    bt = GG.BLOCKS[name]
    b = rng.integers(0, 256, (nb, bt.block_bytes), dtype=np.uint8)
    for o in PARAMS[name]:
        b[:, o : o + 2] = np.abs(rng.standard_normal(nb) * 1e-3).astype(np.float16).view(np.uint8).reshape(nb, 2)
    if name == "Q8_K":
        b[:, 0:4] = np.abs(rng.standard_normal(nb) * 1e-3).astype(np.float32).view(np.uint8).reshape(nb, 4)
        qs = b[:, 4:260].view(np.int8).reshape(nb, 16, 16).sum(axis=2).astype("<i2")
        b[:, 260:292] = qs.view(np.uint8)  # well-formed bsums
    return b


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, T]], align: int | None = None) -> None:
    w = GGUFWriter(str(path), "llama")
    if align:
        w.add_custom_alignment(align)
    w.add_string("general.name", "fixture")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    for name, (data, qt) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fixture_file(tmp_path: Path, rng: np.random.Generator) -> Path:
    t: dict[str, tuple[np.ndarray, T]] = {}
    for name in QUANTIZED:
        qt = getattr(T, name)
        t[f"{name}.weight"] = (quants.quantize(_weights(rng, 48, 256), qt), qt)
    for name in RANDOM:
        t[f"{name}.weight"] = (random_blocks(rng, name, 40), getattr(T, name))
    t["norm.weight"] = (np.ones(256, np.float32), T.F32)
    t["half.weight"] = (_weights(rng, 4, 64).astype(np.float16), T.F16)
    t["iq4.weight"] = (rng.integers(0, 256, (8, 18 * 8), dtype=np.uint8), T.IQ4_NL)  # raw path
    path = tmp_path / "m.gguf"
    write_gguf(path, t)
    return path


@pytest.mark.parametrize("name", sorted(GG.BLOCKS))
def test_fields_are_ggml_values(name: str) -> None:
    """The fields mean what ggml says: values recomputed from them equal gguf-py's dequantization
    (so the codes' order and the unpacked scales are the weights', not merely a bijection)."""
    rng = np.random.default_rng(1)
    bt = GG.BLOCKS[name]
    blocks = quants.quantize(_weights(rng, 8, 512), getattr(T, name)) if name in QUANTIZED else random_blocks(rng, name, 8)
    blocks = np.ascontiguousarray(blocks).reshape(-1, bt.block_bytes)
    nb = len(blocks)
    p = GG.split(bt, blocks.reshape(-1))
    npf = len(GG.F16L.fields)
    f16 = lambda i: GG._f16(p[i * npf : (i + 1) * npf], nb)  # noqa: E731
    q = p[-1].reshape(nb, -1).astype(np.float64)
    if name in ("Q4_0", "Q5_0"):
        v = f16(0)[:, None] * (q - (8 if name == "Q4_0" else 16))
    elif name in ("Q4_1", "Q5_1"):
        v = f16(0)[:, None] * q + f16(1)[:, None]
    elif name == "Q8_0":
        v = f16(0)[:, None] * p[-1].reshape(nb, -1).view(np.int8)
    elif name in ("Q2_K", "Q4_K", "Q5_K"):
        k = 16 if name == "Q2_K" else 8
        sc, mn = p[2 * npf].reshape(nb, k, 1), p[2 * npf + 1].reshape(nb, k, 1)
        v = (f16(0)[:, None, None] * sc * q.reshape(nb, k, -1) - f16(1)[:, None, None] * mn).reshape(nb, -1)
    elif name == "Q3_K":
        sc = p[npf].reshape(nb, 16, 1).astype(np.float64) - 32
        v = (f16(0)[:, None, None] * sc * (q.reshape(nb, 16, 16) - 4)).reshape(nb, -1)
    elif name == "Q6_K":
        sc = p[npf].reshape(nb, 16, 1).view(np.int8).astype(np.float64)
        v = (f16(0)[:, None, None] * sc * (q.reshape(nb, 16, 16) - 32)).reshape(nb, -1)
    else:  # Q8_K
        d = GG._pmerge(p[: len(GG.F32L.fields)], GG.F32L, nb).reshape(-1).view(np.float32).astype(np.float64)
        v = d[:, None] * p[-1].reshape(nb, -1).view(np.int8)
    if name == "Q8_K":  # gguf-py does not dequantize Q8_K (ggml: d · qs, with the block's bsums)
        ref = blocks[:, :4].copy().view(np.float32).astype(np.float64) * blocks[:, 4:260].view(np.int8)
    else:
        ref = quants.dequantize(blocks, getattr(T, name)).reshape(nb, -1)
    np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", sorted(GG.BLOCKS))
@pytest.mark.parametrize("mode", [0, 1])
def test_every_block_pattern_round_trips(name: str, mode: int) -> None:
    """Random bytes (NaN and infinite parameters, inconsistent bsums included) survive the
    split, each coding mode (one model for the codes, or one per class) and the decode."""
    bt = GG.BLOCKS[name]
    raw = np.random.default_rng(2).integers(0, 256, 300 * bt.block_bytes, dtype=np.uint8)
    parts, _ = _encode_gguf(raw, bt, "rans", (mode,))
    buf = b"".join(bytes(p) for p in parts)
    assert buf[0] == mode
    assert np.array_equal(decode_chunk(memoryview(buf), "U8", len(raw), gguf=name), raw)


@pytest.mark.parametrize("name", sorted(GG.FUSED))
@pytest.mark.parametrize("mode", [0, 1])
def test_the_compiled_decode_is_the_numpy_one(name: str, mode: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """gguf_kernel.decode_chunk decodes every covered type by itself (no fall back to the numpy
    path) to the same bytes: random blocks (NaN, infinite and zero parameters, so every class
    rule's edge), gguf-py's quantized ones, and repeated blocks (whose streams zstd codes best:
    decoded by the caller, copied in by the kernel), each coded with and without zstd; a
    truncated chunk is handed back to the numpy path."""
    from llmpress.lossless import gguf_kernel
    from llmpress.lossless.chunk import GK, POLICIES, _fused_args, _zstd_fields

    assert [gguf_kernel.LEGACY_SCALE, gguf_kernel.LEGACY_AFFINE, gguf_kernel.KQ2, gguf_kernel.KQ3,
            gguf_kernel.KQ45, gguf_kernel.KQ6] == list(range(6))
    assert gguf_kernel.SCALE_CLASSES == GG.SCALE_CLASSES
    monkeypatch.setitem(POLICIES, "nozstd", {k: tuple(b for b in v if b != "zstd") for k, v in POLICIES["rans"].items()})
    bt = GG.BLOCKS[name]
    rng = np.random.default_rng(7)
    blocks = [rng.integers(0, 256, 300 * bt.block_bytes, dtype=np.uint8)]
    blocks.append(np.ascontiguousarray(quants.quantize(_weights(rng, 64, 512), getattr(T, name))).reshape(-1)
                  if name in QUANTIZED else random_blocks(rng, name, 300).reshape(-1))
    blocks.append(np.tile(blocks[1][: 3 * bt.block_bytes], 200))
    zstd = 0
    for raw, policy in itertools.product(blocks, ("nozstd", "rans", "smallest")):  # smallest: every stream coded that saves a byte
        parts, _ = _encode_gguf(raw, bt, policy, (mode,))
        buf = np.frombuffer(b"".join(bytes(p) for p in parts), np.uint8)
        nb = len(raw) // bt.block_bytes
        out = np.zeros(len(raw), np.uint8)
        desc, scratch = _fused_args(bt, nb)
        side = _zstd_fields(memoryview(buf), len(raw) * 2)
        zstd += len(side)
        assert GK.decode_chunk(buf, *desc, nb, out, *scratch, side) == 0
        assert np.array_equal(out, raw)
        assert GK.decode_chunk(buf[:-1], *desc, nb, out, *scratch, side) != 0
    assert zstd  # the repeated blocks' codes took zstd


def _backends(parts: list) -> list[str]:
    """The backend of each field of a mode-0/1 GGUF chunk (``u8 mode | u8 nfields | fields``)."""
    buf, pos, out = b"".join(bytes(p) for p in parts), 2, []
    for _ in range(buf[1]):
        bid, ln = struct.unpack_from("<BI", buf, pos)
        out.append(BY_ID[bid].name)
        pos += 5 + ln
    return out


def test_codes_that_save_little_are_stored_raw() -> None:
    """A Q4_0 chunk's codes are rANS-coded where they save GGUF_MIN_SAVING bits a code or more
    (a peaked distribution) and stored raw where they save less (near uniform; decoding them
    would cost far more time than the bytes are worth; the ``smallest`` policy codes them), the
    scales coded either way; grouping by class is kept only where it saves as much again; every
    chunk decodes to its bytes."""
    bt = GG.BLOCKS["Q4_0"]
    rng = np.random.default_rng(3)
    nb = 4000
    d = (np.abs(rng.standard_normal(nb)) * 1e-3).astype(np.float16).view(np.uint8).reshape(nb, 2)
    for p, want in (([0.02] * 2 + [0.08] * 12 + [0.02] * 2, "raw"), ([0.01] * 6 + [0.3, 0.34] + [0.01] * 8, "rans")):
        q = rng.choice(16, size=(nb, 32), p=np.array(p) / sum(p)).astype(np.uint8)
        raw = np.concatenate([d, q[:, :16] | (q[:, 16:] << 4)], axis=1).reshape(-1)
        h = np.bincount(q.reshape(-1), minlength=16) / q.size
        saving = 4 + float((h[h > 0] * np.log2(h[h > 0])).sum())  # bits a code order-0 coding saves
        assert (saving < chunk.GGUF_MIN_SAVING) == (want == "raw")
        for policy in ("rans", "smallest"):
            parts, _ = _encode_gguf(raw, bt, policy)
            assert bytes(parts[0]) == b"\x00"  # codes independent of their scale's class: grouping saves nothing
            *params, codes = _backends(parts)  # d's head and tail, the codes
            assert codes == (want if policy == "rans" else "rans") and all(b.startswith("rans") for b in params)
            assert np.array_equal(decode_chunk(memoryview(b"".join(bytes(x) for x in parts)), "U8", len(raw), gguf="Q4_0"), raw)
    # blocks of two scale octaves, the small-scaled ones' codes all but constant: one model per class saves
    small = np.arange(nb) % 2 == 0
    d2 = np.where(small, 1e-4, 1e-1).astype(np.float16).view(np.uint8).reshape(nb, 2)
    q = np.where(small[:, None], np.where(rng.random((nb, 32)) < 0.97, 8, 9), rng.integers(0, 16, (nb, 32))).astype(np.uint8)
    raw = np.concatenate([d2, q[:, :16] | (q[:, 16:] << 4)], axis=1).reshape(-1)
    parts, _ = _encode_gguf(raw, bt, "rans")
    assert bytes(parts[0]) == b"\x01"
    assert np.array_equal(decode_chunk(memoryview(b"".join(bytes(x) for x in parts)), "U8", len(raw), gguf="Q4_0"), raw)
    # the same with the small-scaled blocks' codes only a little peaked: grouping saves under 0.3 bits a code
    p = np.array([0.04] * 4 + [0.09] * 8 + [0.04] * 4)
    q[small] = rng.choice(16, size=(int(small.sum()), 32), p=p / p.sum())
    raw = np.concatenate([d2, q[:, :16] | (q[:, 16:] << 4)], axis=1).reshape(-1)
    for policy, mode in (("rans", 0), ("smallest", 1)):
        parts, _ = _encode_gguf(raw, bt, policy)
        assert bytes(parts[0]) == bytes((mode,))
        assert np.array_equal(decode_chunk(memoryview(b"".join(bytes(x) for x in parts)), "U8", len(raw), gguf="Q4_0"), raw)


def test_pack_restores_a_gguf_byte_for_byte(tmp_path: Path) -> None:
    src = fixture_file(tmp_path, np.random.default_rng(0))
    out = tmp_path / "m.llmp"
    r = llmpress.pack(src, out, threads=2, chunk_bytes=1 << 13)
    assert r["ratio"] < 1
    with Packed(out) as p:
        assert p.version == 9
        segs = {s["name"]: s for _, s in p.tensors()}
    for name in (*QUANTIZED, *RANDOM):
        s = segs[f"{name}.weight"]
        assert s["gguf"] == name and s["dtype"] == "U8" and s["shape"][1] == GG.BLOCKS[name].block_bytes
        assert set(s["stats"]["field_bits"]) >= {"codes", "d"}
    assert segs["norm.weight"]["dtype"] == "F32" and segs["half.weight"]["shape"] == [4, 64]
    assert "gguf" not in segs["iq4.weight"]
    back = tmp_path / "back.gguf"
    llmpress.unpack(out, back)
    assert back.read_bytes() == src.read_bytes()
    assert llmpress.verify(out)["ok"]
    info = llmpress.info(out)
    assert info["tensors"]["Q4_K.weight"]["gguf"] == "Q4_K"
    assert set(info["tensors"]["Q4_K.weight"]["field_bound_bits"]) == {"d", "dmin", "scales", "mins", "codes"}


def test_a_gguf_of_floats_is_format_1(tmp_path: Path) -> None:
    """The lowest version that describes the file: float tensors only need no GGUF blocks."""
    src = tmp_path / "f.gguf"
    write_gguf(src, {"a": (_weights(np.random.default_rng(0), 16, 64), T.F32)}, align=64)
    out = tmp_path / "f.llmp"
    llmpress.pack(src, out, threads=1)
    with Packed(out) as p:
        assert p.version == 5
    llmpress.unpack(out, tmp_path / "back.gguf")
    assert (tmp_path / "back.gguf").read_bytes() == src.read_bytes()


def _lie(data: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, at, value)
    return bytes(b)


def _tensor_info_at(data: bytes, name: bytes) -> int:
    """Offset of a tensor info's n_dims field (just after its name)."""
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


@pytest.mark.parametrize("lie", ["truncated", "tensor count", "kv count", "string length", "dims",
                                 "offset past the end", "unaligned offset", "type", "overlap", "version"])
def test_lying_headers_are_refused(tmp_path: Path, lie: str) -> None:
    rng = np.random.default_rng(4)
    src = tmp_path / "ok.gguf"
    write_gguf(src, {"a": (quants.quantize(_weights(rng, 4, 64), T.Q4_1), T.Q4_1),
                     "b": (quants.quantize(_weights(rng, 4, 64), T.Q8_0), T.Q8_0)})
    data = src.read_bytes()
    ia, ib = _tensor_info_at(data, b"a"), _tensor_info_at(data, b"b")
    bad = {
        "truncated": data[: ib + 3],
        "tensor count": _lie(data, 8, "Q", 1 << 40),
        "kv count": _lie(data, 16, "Q", 1 << 40),
        "string length": _lie(data, 24, "Q", 1 << 50),  # the first key's length
        "dims": _lie(data, ia, "I", 9),
        "offset past the end": _lie(data, ib + 4 + 16 + 4, "Q", len(data)),
        "unaligned offset": _lie(data, ib + 4 + 16 + 4, "Q", 1000 + 3),
        "type": _lie(data, ib + 4 + 16, "I", 99),
        "overlap": _lie(data, ib + 4 + 16 + 4, "Q", 0),
        "version": _lie(data, 4, "I", 7),
    }[lie]
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    with pytest.raises(CorruptFileError, match="bad.gguf"):
        llmpress.pack(path, tmp_path / "x.llmp", threads=1)
    assert not (tmp_path / "x.llmp").exists()


def test_a_corrupted_chunk_is_detected(tmp_path: Path) -> None:
    src = fixture_file(tmp_path, np.random.default_rng(5))
    out = tmp_path / "m.llmp"
    llmpress.pack(src, out, threads=1, chunk_bytes=1 << 13)
    with Packed(out) as p:
        s = next(s for _, s in p.tensors() if s.get("gguf") == "Q4_1")
    o, ln, _, _ = s["chunks"][0]
    b = bytearray(out.read_bytes())
    b[o + ln // 2] ^= 0x04
    out.write_bytes(bytes(b))
    with pytest.raises(CorruptFileError, match="Q4_1.weight"):
        llmpress.verify(out)
