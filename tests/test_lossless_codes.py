"""Bit-packed quantization codes in the lossless container: one symbol per code (fields.CodesLayout)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpress.lossless.chunk import decode_chunk, encode_chunk
from llmpress.lossless.container import pack, unpack, verify
from llmpress.lossless.fields import CODES
from llmpress.lossless.reader import CODES_VERSION, VERSION, Packed
from llmpress.quant.pack import pack as pack_codes

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from harness import tiny_source  # noqa: E402  (a one-block Llama, random weights)


@given(st.integers(1, 7), st.binary(max_size=300))
@settings(max_examples=60, deadline=None)
def test_codes_layout_round_trips_any_bytes(bits, data):
    """Every byte string, whatever its length, comes back bit for bit (a chunk need not hold whole codes)."""
    raw = np.frombuffer(data, np.uint8)
    (sym,) = CODES[bits].split(raw)
    assert len(sym) == CODES[bits].symbols(len(raw)) and (sym < 1 << bits).all()
    assert np.array_equal(CODES[bits].merge([sym], len(raw)), raw)
    if len(raw):
        buf, _ = encode_chunk(raw, "U8", codes=bits)
        for compiled in (True, False):
            assert np.array_equal(decode_chunk(memoryview(buf), "U8", len(raw), compiled=compiled, codes=bits), raw)


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
def test_symbols_are_the_quantizers_codes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (8 * 37,), generator=g, dtype=torch.uint8)
    (sym,) = CODES[bits].split(pack_codes(codes, bits).numpy())
    assert np.array_equal(sym, codes.numpy())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe

    base = tmp_path_factory.mktemp("codes")
    out = base / "rtn6"
    compress(tiny_source(base / "src"), Recipe.uniform("rtn", bits=6, group_size=32), out, progress=False)
    return out


def test_quantized_folder_packs_its_codes_as_codes(folder, tmp_path, monkeypatch):
    """Each quantized linear's qweight is a codes segment (v6), restores byte for byte, and
    codes smaller than the same bytes packed as bytes, within 3 % of the codes' order-0 entropy
    (random Gaussian weights: their 6-bit codes hold ~5.8 bits of entropy, the bytes' coder
    gets none of it)."""
    import llmpress.lossless.container as container

    res = pack(folder, tmp_path / "codes.llmp", threads=1)
    with Packed(tmp_path / "codes.llmp") as p:
        assert p.version == CODES_VERSION
        segs = {s["name"]: s for _, s in p.tensors()}
    qweights = [n for n in segs if n.endswith(".qweight")]
    assert qweights and all(segs[n].get("codes") == 6 for n in qweights)
    assert not any("codes" in s for n, s in segs.items() if not n.endswith(".qweight"))
    assert verify(tmp_path / "codes.llmp")["ok"]
    unpack(tmp_path / "codes.llmp", tmp_path / "back")
    for f in folder.iterdir():
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes()

    monkeypatch.setattr(container, "quantized_of", lambda root: {})
    plain = pack(folder, tmp_path / "bytes.llmp", threads=1)
    with Packed(tmp_path / "bytes.llmp") as p:
        assert p.version == VERSION  # no codes: older readers still read it
    as_codes = sum(res["tensors"][n]["packed"] for n in qweights)
    as_bytes = sum(plain["tensors"][n]["packed"] for n in qweights)
    from safetensors.numpy import load_file

    shard = load_file(str(folder / "model.safetensors"))
    h0 = 0.0
    for n in qweights:
        (sym,) = CODES[6].split(shard[n])
        c = np.bincount(sym, minlength=64)
        h0 += float(-(c[c > 0] * np.log2(c[c > 0] / len(sym))).sum()) / 8
    assert as_codes < as_bytes and as_codes < 1.03 * h0


def test_codes_on_another_dtype_is_a_lying_index(folder, tmp_path):
    """An index that puts codes on a float segment is refused before anything is decoded."""
    import json

    import zstandard

    from llmpress.lossless.reader import FOOTER, CorruptError, crc32

    path = tmp_path / "c.llmp"
    pack(folder, path, threads=1)
    b = bytearray(path.read_bytes())
    off, ln, _, end = FOOTER.unpack(b[-FOOTER.size:])
    idx = json.loads(zstandard.ZstdDecompressor().decompress(bytes(b[off:off + ln])))
    seg = next(s for f in idx["files"] for s in f["segments"] if s.get("dtype") == "F32")
    seg["codes"] = 6
    blob = zstandard.ZstdCompressor().compress(json.dumps(idx).encode())
    path.write_bytes(bytes(b[:off]) + blob + FOOTER.pack(off, len(blob), crc32(blob), end))
    with pytest.raises(CorruptError, match="codes"):
        Packed(path)


def test_only_codes_below_8_bits_of_an_llmpress_folder_are_codes(folder, tmp_path):
    """8-bit codes are bytes already; a folder without llmpress's manifest, or whose manifest does not
    read, names no codes (its bytes are packed as bytes, and the file stays version 5)."""
    import shutil

    from llmpress.lossless.container import codes_of
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe

    assert codes_of(folder) and set(codes_of(folder).values()) == {6}
    eight = tmp_path / "rtn8"
    compress(tiny_source(tmp_path / "src"), Recipe.uniform("rtn", bits=8, group_size=32), eight, progress=False)
    assert codes_of(eight) == {}
    assert codes_of(tmp_path / "src") == {}
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "llmpress.json").write_text("{not json")
    assert codes_of(broken) == {}
