"""Quantized folders' codes coded against their group's zero point (.llmp format 6, zeros.py):
llmpress asymz folders (RTN, GPTQ, AWQ), compressed-tensors pack-quantized folders."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

import llmpress
from llmpress.lossless.chunk import _decode_codes, decode_chunk, encode_chunk
from llmpress.lossless.container import pack, unpack, verify
from llmpress.lossless.delta import COMPILED
from llmpress.lossless.fields import CODES
from llmpress.lossless.quantized import quantized_of
from llmpress.lossless.reader import FOOTER, ZEROS_VERSION, CorruptError, Packed, crc32
from llmpress.lossless.zeros import ChunkZeros, ZeroRef, chunk_zeros, zero_table

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from harness import tiny_source  # noqa: E402  (a one-block Llama, random weights)


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _round_trip(folder: Path, tmp: Path) -> Packed:
    out = tmp / "x.llmp"
    pack(folder, out, threads=2)
    assert verify(out)["ok"]
    unpack(out, tmp / "back")
    assert _sha(tmp / "back") == _sha(folder)
    return Packed(out)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return tiny_source(tmp_path_factory.mktemp("zsrc") / "src")


@pytest.fixture(scope="module")
def asymz(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("asymz") / "rtn4"
    llmpress.quantize(src, out, method="rtn", bits=4, group_size=32, grid="asymz", progress=False)
    return out


@pytest.fixture(scope="module")
def ct(asymz, tmp_path_factory) -> Path:
    from llmpress.targets.api import export

    out = tmp_path_factory.mktemp("ct") / "ct"
    export(asymz, out, format="compressed-tensors")
    return out


def test_llmpress_asymz_folder_codes_against_zero_points(asymz, tmp_path):
    found = quantized_of(asymz)
    assert found and all(s.bits == 4 and s.zero is not None and s.zero.packing == "value" for s in found.values())
    with _round_trip(asymz, tmp_path) as p:
        assert p.version == ZEROS_VERSION
        segs = {s["name"]: s for _, s in p.tensors()}
        for name, spec in found.items():
            assert segs[name]["codes"] == 4 and segs[name]["zero"] == spec.zero.to_index()
            assert segs[spec.zero.tensor]["dtype"] == "F16" and "codes" not in segs[spec.zero.tensor]


def test_compressed_tensors_folder_codes_are_symbols(ct, tmp_path):
    """weight_packed int32 words are codes segments (4 bits), their zero points the packed
    weight_zero_point; restored byte for byte."""
    found = quantized_of(ct)
    assert found and all(n.endswith(".weight_packed") for n in found)
    assert all(s.bits == 4 and s.zero is not None and s.zero.packing == "packed" for s in found.values())
    with _round_trip(ct, tmp_path) as p:
        assert p.version == ZEROS_VERSION
        segs = {s["name"]: s for _, s in p.tensors()}
        assert all(segs[n]["dtype"] == "I32" and segs[n]["codes"] == 4 for n in found)


def test_packed_zero_points_read_as_compressed_tensors_packs_them(asymz, ct):
    """zero_table('packed') of a weight_zero_point equals llmpress's own integer zero points."""
    from safetensors.numpy import load_file

    mine, theirs = load_file(str(asymz / "model.safetensors")), load_file(str(ct / "model.safetensors"))
    found = quantized_of(ct)
    name = next(iter(found))
    module = name[: -len(".weight_packed")]
    z = theirs[f"{module}.weight_zero_point"]
    table = zero_table(np.ascontiguousarray(z).view(np.uint8).reshape(-1), "I32", z.shape, "packed", 4)
    ref = mine[f"{module}.weight.zero"].astype(np.float32).astype(np.uint8)  # (out, groups)
    assert np.array_equal(table[: len(ref)], ref)


def test_awq_and_gptq_folders_take_the_same_path(tiny_llama_dir, tmp_path):
    """GPTQ and AWQ on the integer-zero-point grid: codes against their zero points (format 6); AWQ on
    its default grid (a float offset, no integer zero point): codes one symbol each (format 2)."""
    from llmpress.lossless.reader import CODES_VERSION

    for method, grid in (("awq", "asymz"), ("gptq", "asymz"), ("awq", None)):
        out = tmp_path / f"{method}-{grid}"
        llmpress.quantize(tiny_llama_dir, out, method=method, bits=4, group_size=32, samples=2, seq_len=32,
                          progress=False, **({"grid": grid} if grid else {}))
        found = quantized_of(out)
        assert found and all((s.zero is not None) == (grid == "asymz") and s.bits == 4 for s in found.values())
        with _round_trip(out, tmp_path / f"{method}-{grid}-rt") as p:
            assert p.version == (ZEROS_VERSION if grid else CODES_VERSION)
            assert sum("zero" in s for _, s in p.tensors()) == (len(found) if grid else 0)
            assert sum("codes" in s for _, s in p.tensors()) == len(found)


def test_chunk_modes_round_trip_any_codes():
    """Both modes decode back bit for bit, whichever the writer chose; the zero points of a chunk
    that starts mid-row come from the right rows and groups."""
    g = np.random.default_rng(0)
    table = g.integers(0, 16, (7, 3)).astype(np.uint8)  # (rows, groups)
    ref = ZeroRef("z", 40, 16, "value")  # rows of 40 codes: groups of 16, 16, 8
    full = np.repeat(table, 16, axis=1)[:, :40].reshape(-1)
    assert np.array_equal(chunk_zeros(table, ref, 52, 100), full[52:152])
    z = chunk_zeros(table, ref, 0, 280)
    for codes in ((z + g.integers(-2, 3, 280)) & 15, g.integers(0, 16, 280)):  # near z (mode 1), uniform
        raw = (codes[0::2] | codes[1::2] << 4).astype(np.uint8)
        buf, _ = encode_chunk(raw, "U8", codes=4, zeros=z)
        back = decode_chunk(memoryview(buf), "U8", len(raw), codes=4, zeros=ChunkZeros(lambda: table, ref, 0))
        assert np.array_equal(back, raw)
    assert buf[0] in (2, 3)  # 4-bit codes go as bytes (chunk.AS_BYTES)
    for bits in (3, 4):  # the codes one symbol each (3 bits), as bytes (4 bits); against zero points
        zb = chunk_zeros(table, ref, 0, 280)[: 8 * 105 // bits]
        codes = (zb + g.integers(-1, 2, len(zb))) & ((1 << bits) - 1)
        raw = CODES[bits].merge([codes.astype(np.uint8)], len(codes) * bits // 8)
        buf, _ = encode_chunk(raw, "U8", codes=bits, zeros=zb)
        assert buf[0] == (1 if bits == 3 else 3)
        back = decode_chunk(memoryview(buf), "U8", len(raw), codes=bits, zeros=ChunkZeros(lambda: zb.reshape(1, -1), ZeroRef("z", len(zb), 1, "value"), 0))
        assert np.array_equal(back, raw)


@pytest.mark.parametrize("bits", range(1, 8))
def test_compiled_codes_chunks_match_the_generic_path(bits):
    """codes_kernel.decode_codes (one compiled call) gives the generic path's bytes for every
    width, with zero points (both modes, a chunk starting mid-row and mid-group, a table smaller
    than the segment) and without (format 2), on byte counts that end mid-code, and under every
    policy (zstd streams fall back to the generic path)."""
    g = np.random.default_rng(bits)
    mask = (1 << bits) - 1
    table = g.integers(0, 1 << bits, (5, 4)).astype(np.uint8)  # (rows, groups)
    ref = ZeroRef("z", 50, 16, "value")  # rows of 50 codes: groups of 16, 16, 16, 2
    for nbytes in (1, 7, 123, 4001):
        m = -(-8 * nbytes // bits)
        first = 37
        z = chunk_zeros(table, ref, first, m)
        for codes in ((z.astype(np.int64) + g.integers(-1, 2, m)) & mask, g.integers(0, 1 << bits, m)):
            raw = CODES[bits].merge([codes.astype(np.uint8)], nbytes)
            for policy in ("rans", "zstd"):
                for zeros in (z, None):
                    buf, _ = encode_chunk(raw, "U8", policy, codes=bits, zeros=zeros)
                    cz = (lambda: ChunkZeros(lambda: table, ref, first)) if zeros is not None else (lambda: None)
                    fast = decode_chunk(memoryview(buf), "U8", nbytes, codes=bits, zeros=cz())
                    slow = decode_chunk(memoryview(buf), "U8", nbytes, codes=bits, zeros=cz(), compiled=False)
                    assert np.array_equal(fast, raw) and np.array_equal(slow, raw), (nbytes, policy, zeros is None)
                    if buf[2 if zeros is not None else 1] in COMPILED:  # the compiled call itself decodes it
                        out = np.empty(nbytes, np.uint8)
                        assert _decode_codes(memoryview(buf), bits, m, out, cz()) == 0 and np.array_equal(out, raw)


def test_compiled_bytes_chunks_match_the_generic_path():
    """A chunk of raw bytes (compressed-tensors' packed zero points: I32) decodes in one compiled
    call (codes_kernel.decode_bytes) to the generic path's bytes, under every policy."""
    from llmpress.lossless.chunk import CDK

    g = np.random.default_rng(3)
    for dtype, raw in (("I32", g.integers(0, 1 << 31, 3001).astype("<i4").view(np.uint8)),
                       ("U8", (g.random(20_000) < 0.02).astype(np.uint8))):
        for policy in ("rans", "zstd"):
            buf, _ = encode_chunk(raw, dtype, policy)
            fast = decode_chunk(memoryview(buf), dtype, len(raw))
            slow = decode_chunk(memoryview(buf), dtype, len(raw), compiled=False)
            assert np.array_equal(fast, raw) and np.array_equal(slow, raw)
            if buf[1] in COMPILED:
                out = np.empty(len(raw), np.uint8)
                assert CDK.decode_bytes(np.frombuffer(buf, np.uint8), out) == 0 and np.array_equal(out, raw)


def test_zero_points_that_are_not_integers_are_not_used():
    """A float zero point (not an integer 0..2^b−1) is no context: zero_table refuses it (and the
    writer, container._zero_tables, then codes those codes without zero points)."""
    with pytest.raises(ValueError, match="integers"):
        zero_table(np.array([0.5, 3], np.float16).view(np.uint8), "F16", (1, 2), "value", 4)
    with pytest.raises(ValueError, match="integers"):
        zero_table(np.array([16], np.float16).view(np.uint8), "F16", (1, 1), "value", 4)


def _edit_index(path: Path, edit) -> None:
    b = bytearray(path.read_bytes())
    off, ln, _, end = FOOTER.unpack(b[-FOOTER.size:])
    idx = json.loads(zstandard.ZstdDecompressor().decompress(bytes(b[off:off + ln])))
    edit(idx)
    blob = zstandard.ZstdCompressor().compress(json.dumps(idx).encode())
    path.write_bytes(bytes(b[:off]) + blob + FOOTER.pack(off, len(blob), crc32(blob), end))


def test_corrupted_inputs_are_refused(asymz, tmp_path):
    out = tmp_path / "x.llmp"
    pack(asymz, out, threads=1)
    with Packed(out) as p:
        seg = next(s for _, s in p.tensors() if "zero" in s)
        zseg = next(s for _, s in p.tensors() if s["name"] == seg["zero"]["tensor"])
        o, ln = seg["chunks"][0][:2]
        zo = zseg["chunks"][0][0]
    # a flipped byte inside a codes chunk coded against its zero points
    bad = tmp_path / "payload.llmp"
    b = bytearray(out.read_bytes())
    b[o + ln // 2] ^= 0x5A
    bad.write_bytes(bytes(b))
    with pytest.raises(CorruptError):
        verify(bad)
    # a corrupted zero-point tensor: its own chunk fails its checksum, and the codes with it
    bad2 = tmp_path / "zero.llmp"
    b = bytearray(out.read_bytes())
    b[zo + 7] ^= 0xFF
    bad2.write_bytes(bytes(b))
    with pytest.raises(CorruptError):
        verify(bad2)
    # index lies: zero points in a tensor that does not exist, a record with extra keys, a
    # format-3 file that claims zero points
    for edit, match in (
        (lambda idx: _seg(idx, seg["name"])["zero"].update(tensor="nope"), "zero points"),
        (lambda idx: _seg(idx, seg["name"])["zero"].update(extra=1), "zero record"),
        (lambda idx: _seg(idx, seg["name"])["zero"].update(row=0), "zero record"),
    ):
        lie = tmp_path / "lie.llmp"
        lie.write_bytes(out.read_bytes())
        _edit_index(lie, edit)
        with pytest.raises(CorruptError, match=match):
            Packed(lie)


def _seg(idx: dict, name: str) -> dict:
    return next(s for f in idx["files"] for s in f["segments"] if s.get("name") == name)


def test_codes_in_int32_need_format_6(ct, tmp_path):
    """An I32 codes segment in a file whose version says format 2 is a lying index."""
    out = tmp_path / "x.llmp"
    pack(ct, out, threads=1)
    b = bytearray(out.read_bytes())
    b[8:12] = (6).to_bytes(4, "little")

    def edit(idx):
        idx["version"] = 6
        for f in idx["files"]:
            for s in f["segments"]:
                s.pop("zero", None)
    out.write_bytes(bytes(b))
    _edit_index(out, edit)
    with pytest.raises(CorruptError, match="codes of 4 bits in a I32"):
        Packed(out)


def test_zero_table_bf16_and_ints():
    assert np.array_equal(zero_table(np.array([1, 2, 15], np.int32).view(np.uint8), "I32", (3, 1), "value", 4),
                          np.array([[1], [2], [15]], np.uint8))
    bf = torch.tensor([[3.0, 7.0]], dtype=torch.bfloat16).view(torch.uint16).numpy().view(np.uint8).reshape(-1)
    assert np.array_equal(zero_table(bf, "BF16", (1, 2), "value", 3), np.array([[3, 7]], np.uint8))


@pytest.mark.parametrize("kind", ["asymz", "ct"])
def test_info_reports_the_codes_bound(kind, request, tmp_path):
    """`info` on a quantized folder and on its .llmp: the codes' chunk bound in bits a code (below
    their 4 stored bits, the same from the folder as from what pack recorded; pack lands just above
    it), counted in the file's bound; the CLI prints it."""
    from typer.testing import CliRunner

    import llmpress.cli
    from llmpress.cli import app

    llmpress.cli._load_commands()
    from llmpress.lossless.bounds import info

    folder = request.getfixturevalue(kind)
    r = info(folder)
    c = r["codes"]
    found = quantized_of(folder)
    assert c["tensors"] == len(found) and c["bits"] == [4] and c["bits_per_code"] == 4.0
    assert 0 < c["bits_per_code_bound"] < 4 and c["ratio_bound"] == pytest.approx(c["bits_per_code_bound"] / 4)
    rows = [r["tensors"][n] for n in found]
    assert all(x["codes"] == 4 and x["bound_chunk_bytes"] < x["bytes"] for x in rows)
    assert r["bound_chunk_bytes"] < r["bytes"] - sum(x["bytes"] for x in rows) + c["bound_chunk_bytes"] + 1
    out = tmp_path / "x.llmp"
    pack(folder, out, threads=2)
    p = info(out)
    assert p["codes"]["bits_per_code_bound"] == pytest.approx(c["bits_per_code_bound"], abs=1e-3)
    packed = sum(p["tensors"][n]["packed_bytes"] for n in found)
    assert c["bound_chunk_bytes"] <= packed < 1.1 * c["bound_chunk_bytes"] + 2000 * len(found)
    res = CliRunner().invoke(app, ["info", str(out)])
    assert res.exit_code == 0 and "bits/code" in res.output, res.output
    assert info(tmp_path / "x.llmp")["codes"] == p["codes"]
