"""Lossless codec: field split, backends, chunks, container round trips and bad input."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from llmpress.lossless.chunk import decode_chunk, encode_chunk
from llmpress.lossless.container import load_packed, open_tensor, pack, unpack, verify
from llmpress.lossless.entropy import pack_bits, unpack_bits
from llmpress.lossless.fields import LAYOUTS
from llmpress.lossless.reader import CorruptError, Packed
from llmpress.lossless.segments import HeaderError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I8": torch.int8, "BOOL": torch.bool, "F64": torch.float64}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@given(st.integers(1, 16), st.lists(st.integers(0, 65535), max_size=70))
@settings(deadline=None)  # the first call loads the compiled kernels
def test_bit_packing_round_trip(width, xs):
    sym = np.array([x % (1 << width) for x in xs], dtype=np.uint16 if width > 8 else np.uint8)
    buf = pack_bits(sym, width)
    assert len(buf) == (len(sym) * width + 7) // 8
    assert (unpack_bits(buf, len(sym), width) == sym).all()


@pytest.mark.parametrize("dtype", sorted(LAYOUTS))
@given(data=st.binary(min_size=0, max_size=600))
@settings(max_examples=25, deadline=None)
def test_fields_round_trip_every_bit_pattern(dtype, data):
    lay = LAYOUTS[dtype]
    raw = np.frombuffer(data[: len(data) // lay.itemsize * lay.itemsize], np.uint8)
    parts = lay.split(raw)
    assert all(int(p.max(initial=0)) < 1 << f.width for f, p in zip(lay.fields, parts))
    assert lay.merge(parts, len(raw) // lay.itemsize).tobytes() == raw.tobytes()


@pytest.mark.parametrize("policy", ["rans", "ans", "zstd"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_chunk_round_trip_and_no_mutation(dtype, policy):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3001, generator=g) * 0.05).to(DTYPES[dtype]) if dtype not in ("I64", "I8", "BOOL") else \
        torch.randint(0, 3, (3001,), generator=g).to(DTYPES[dtype])
    raw = t.view(torch.uint8).numpy().copy()
    before = raw.copy()
    payload, st_ = encode_chunk(raw, dtype, policy)
    assert (raw == before).all()  # the caller's buffer is untouched
    assert decode_chunk(memoryview(payload), dtype, len(raw)).tobytes() == raw.tobytes()
    out = np.full(len(raw), 0xA5, np.uint8)  # into the caller's array, every byte rewritten
    assert decode_chunk(memoryview(payload), dtype, len(raw), out) is not None and out.tobytes() == raw.tobytes()
    if dtype in ("BF16", "F32"):
        assert len(payload) < (0.85 if dtype == "BF16" else 0.92) * len(raw)  # gaussian weights compress
        assert st_.bound_bits / 8 <= len(payload) * 1.02


def _odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "empty": torch.zeros(0, 7),
        "scalar": torch.tensor(3.5),
        "odd.bf16": (torch.randn(17, 3, generator=g)).to(torch.bfloat16),
        "odd.f16": torch.randn(5, 1, 3, generator=g).half(),
        "big.bf16": (torch.randn(700, 1100, generator=g) * 0.02).to(torch.bfloat16),  # > 1 chunk
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45, -float("inf")]),
        "fp8": torch.randn(33, generator=g).to(torch.float8_e4m3fn),
        "ids": torch.arange(13, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture()
def st_file(tmp_path) -> Path:
    p = tmp_path / "m.safetensors"
    save_file(_odd_tensors(), str(p), metadata={"format": "pt", "note": "odd"})
    return p


def test_single_file_round_trip(st_file, tmp_path):
    out = tmp_path / "m.llmp"
    r = pack(st_file, out, threads=2)
    assert r["bytes_out"] < r["bytes_in"]
    unpack(out, tmp_path / "back.safetensors")
    assert sha(tmp_path / "back.safetensors") == sha(st_file)
    ref = _odd_tensors()
    for name in ("scalar", "empty", "big.bf16", "ids", "mask", "nan_inf"):
        got = open_tensor(out, name)
        assert got.dtype == ref[name].dtype and got.shape == ref[name].shape
        assert got.reshape(-1).view(torch.uint8).numpy().tobytes() == ref[name].reshape(-1).view(torch.uint8).numpy().tobytes()
    assert verify(out)["ok"]


def test_output_not_overwritten_without_force(st_file, tmp_path):
    out = tmp_path / "m.llmp"
    pack(st_file, out)
    from llmpress.io.atomic import OutputExistsError

    with pytest.raises(OutputExistsError):
        pack(st_file, out)
    pack(st_file, out, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_multi_shard_folder_with_index(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    t = _odd_tensors()
    save_file({k: t[k] for k in ("empty", "scalar", "odd.bf16")}, str(src / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in ("big.bf16", "ids")}, str(src / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in ("empty", "scalar", "odd.bf16")}
    wm.update({k: "model-00002-of-00002.safetensors" for k in ("big.bf16", "ids")})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "sub" / "tokenizer.model").write_bytes(bytes(range(256)) * 3)
    pack(src, tmp_path / "s.llmp", threads=2)
    unpack(tmp_path / "s.llmp", tmp_path / "back")
    from llmpress.io.checksum import tree_sha256

    assert tree_sha256(tmp_path / "back") == tree_sha256(src)


def test_pack_reports_every_tensor(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    t = _odd_tensors()
    save_file({k: t[k] for k in ("empty", "scalar", "odd.bf16")}, str(src / "a.safetensors"))
    save_file({k: t[k] for k in ("big.bf16", "ids")}, str(src / "b.safetensors"))
    r = pack(src, tmp_path / "s.llmp")
    ts = r["tensors"]
    assert set(ts) == {"empty", "scalar", "odd.bf16", "big.bf16", "ids"}
    assert ts["big.bf16"]["file"] == "b.safetensors" and ts["scalar"]["file"] == "a.safetensors"
    for name, rec in ts.items():
        assert rec["bytes"] == t[name].numel() * t[name].element_size()
        assert 0 <= rec["bound_bits"] <= 8 * rec["bytes"]
    with Packed(tmp_path / "s.llmp") as p:  # packed = the tensor's chunk payload bytes in the file
        for f, s in p.tensors():
            assert ts[s["name"]]["packed"] == sum(c[1] for c in s["chunks"])
    assert ts["big.bf16"]["packed"] < ts["big.bf16"]["bytes"]
    assert sum(v["packed"] for v in ts.values()) == r["tensor_bytes_out"]


# ------------------------------------------------------------------ bad input


def test_flipped_byte_in_a_chunk_names_the_tensor(st_file, tmp_path):
    out = tmp_path / "m.llmp"
    pack(st_file, out)
    with Packed(out) as p:
        seg = next(s for _, s in p.tensors() if s["name"] == "big.bf16")
        off = seg["chunks"][1][0] + 10
    b = bytearray(out.read_bytes())
    b[off] ^= 0x40
    out.write_bytes(bytes(b))
    with pytest.raises(CorruptError, match=r"tensor 'big.bf16', chunk 1: checksum mismatch"):
        verify(out)
    with pytest.raises(CorruptError, match="big.bf16"):
        open_tensor(out, "big.bf16")
    assert open_tensor(out, "scalar").item() == 3.5  # other tensors still readable
    with pytest.raises(CorruptError):
        unpack(out, tmp_path / "back.safetensors")
    assert not (tmp_path / "back.safetensors").exists()


@pytest.mark.parametrize("cut", [5, 30, 1000])
def test_truncated_container(st_file, tmp_path, cut):
    out = tmp_path / "m.llmp"
    pack(st_file, out)
    out.write_bytes(out.read_bytes()[:-cut])
    with pytest.raises(CorruptError, match=str(out)):
        Packed(out)


def test_foreign_files_refused(tmp_path):
    f = tmp_path / "x.llmp"
    f.write_bytes(b"PK\x03\x04 not ours" * 10)
    with pytest.raises(CorruptError, match="not an llmpress container"):
        Packed(f)
    f.write_bytes(b"")
    with pytest.raises(CorruptError):
        Packed(f)


def _lying(tmp_path: Path, header: dict, data: bytes = b"\0" * 16) -> Path:
    h = json.dumps(header).encode()
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return p


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}},
        {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}},
        {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
        {"w": {"dtype": "XX", "shape": [4], "data_offsets": [0, 16]}},
    ],
)
def test_lying_safetensors_header_refused(tmp_path, header):
    with pytest.raises(HeaderError, match="lie.safetensors"):
        pack(_lying(tmp_path, header), tmp_path / "o.llmp")
    assert not (tmp_path / "o.llmp").exists()


def test_header_length_beyond_file(tmp_path):
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 50) + b"{}")
    with pytest.raises(HeaderError, match="exceeds the file"):
        pack(p, tmp_path / "o.llmp")


def test_lying_index_refused(st_file, tmp_path):
    """An index whose chunks point beyond the file is refused before decoding."""
    import zstandard

    from llmpress.lossless.reader import END, FOOTER

    out = tmp_path / "m.llmp"
    pack(st_file, out)
    with Packed(out) as p:
        idx, data_end = p.index, p.data_end
    idx["files"][0]["segments"][1]["chunks"] = [[12, 1 << 40, 1 << 20, 0]] if idx["files"][0]["segments"][1]["chunks"] else []
    seg = next(s for s in idx["files"][0]["segments"] if s.get("name") == "big.bf16")
    seg["chunks"][0][1] = 1 << 40
    blob = zstandard.ZstdCompressor().compress(json.dumps(idx).encode())
    body = out.read_bytes()[:data_end]
    import zlib

    out.write_bytes(body + blob + FOOTER.pack(len(body), len(blob), zlib.crc32(blob), END))
    with pytest.raises(CorruptError, match="outside the file"):
        Packed(out)


def _reseal(out: Path, idx: dict, data_end: int) -> None:
    import zlib

    import zstandard

    from llmpress.lossless.reader import END, FOOTER

    blob = zstandard.ZstdCompressor().compress(json.dumps(idx).encode())
    body = out.read_bytes()[:data_end]
    out.write_bytes(body + blob + FOOTER.pack(len(body), len(blob), zlib.crc32(blob), END))


@pytest.mark.parametrize("path", ["model.safetensors", "./model.safetensors", "sub/../model.safetensors", "", "."])
def test_repeated_or_empty_file_path_refused(st_file, tmp_path, path):
    """Two index entries for one path (found by the fuzzer: config.json renamed model.safetensors
    was accepted, and the file's bytes depended on which entry a reader took) or an empty path."""
    src = tmp_path / "src"
    src.mkdir()
    st_file.rename(src / "model.safetensors")
    (src / "config.json").write_text('{"note": "odd"}')
    out = tmp_path / "m.llmp"
    pack(src, out)
    with Packed(out) as p:
        idx, data_end = p.index, p.data_end
    verify(out)  # intact, it is read
    assert len(idx["files"]) == 2
    first = idx["files"][0]["path"]
    idx["files"][1]["path"] = path.replace("model.safetensors", first)
    _reseal(out, idx, data_end)
    with pytest.raises(CorruptError, match="appears twice|is empty|unsafe"):
        verify(out)


# ------------------------------------------------------------------ real model, load


@pytest.mark.slow
def test_minilm_whole_file_identity_and_load(minilm_dir, tmp_path):
    out = tmp_path / "minilm.llmp"
    r = pack(minilm_dir, out, threads=2)
    assert r["tensor_bytes_out"] / r["tensor_bytes_in"] < 0.82  # FP32: exponent + mantissa-top coding
    assert r["tensor_bytes_out"] <= r["bound_bytes"] * 1.005  # within 0.5 % of the chunk bound
    unpack(out, tmp_path / "back")
    from llmpress.io.checksum import tree_sha256

    assert tree_sha256(tmp_path / "back") == tree_sha256(minilm_dir)
    model = load_packed(out)
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(minilm_dir)).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)
    import llmpress

    assert type(llmpress.load(out)).__name__ == type(ref).__name__
