"""FP8 checkpoints in .llmp: e4m3fn and e5m2 weights with the scale tensors real releases store
beside them, restored byte for byte (every bit pattern: e4m3fn's NaNs at 0x7F/0xFF, e5m2's
infinities and NaNs, subnormals, −0), coded as fields (exponent ‖ mantissa head, sign tail)."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llmpress.lossless.chunk import decode_chunk, encode_chunk
from llmpress.lossless.container import pack, unpack, verify
from llmpress.lossless.fields import LAYOUTS, FloatLayout
from llmpress.lossless.reader import Packed
from llmpress.lossless.segments import plan_file

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _cast(w: torch.Tensor, dtype: torch.dtype, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale) as FP8 releases store them: w ≈ q · scale, the scale absmax/max
    per output channel ((out, 1)) or per tensor (a scalar)."""
    a = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    s = (a / MAX[dtype]).clamp(min=1e-12).float()
    return (w / s).to(dtype), s


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    every = torch.arange(256, dtype=torch.uint8)  # (256,): every byte, NaN/inf encodings included
    w1, s1 = _cast(torch.randn(256, 257, generator=g) * 0.02, torch.float8_e4m3fn, per_channel=True)
    w2, s2 = _cast(torch.randn(37, 51, generator=g) * 0.05, torch.float8_e5m2, per_channel=False)
    w3, _ = _cast(torch.randn(3, 5001, generator=g), torch.float8_e4m3fn, per_channel=False)
    return {
        "every.e4m3": every.view(torch.float8_e4m3fn),
        "every.e5m2": every.flip(0).view(torch.float8_e5m2),
        "layers.0.q_proj.weight": w1,  # (256, 257) e4m3, a per-channel F32 scale beside
        "layers.0.q_proj.weight_scale": s1,  # (256, 1) F32
        "layers.0.q_proj.input_scale": torch.tensor(0.0625),  # () F32
        "layers.0.k_proj.weight": w2,  # (37, 51) e5m2, odd size
        "layers.0.k_proj.weight_scale_inv": (1 / s2).to(torch.bfloat16).reshape(1, 1),  # BF16 (1, 1)
        "many_chunks.e4m3": w3,  # (3, 5001): several chunks at the small chunk size, a short last one
        "one.e5m2": torch.tensor([-0.0]).to(torch.float8_e5m2),
        "empty.e4m3": torch.zeros(0, 3).to(torch.float8_e4m3fn),
        "norm": torch.ones(7, dtype=torch.bfloat16),
    }


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fp8") / "model.safetensors"
    save_file(_tensors(), str(p), metadata={"format": "pt", "quant_method": "fp8"})
    return p


def test_fp8_special_values_are_where_the_tests_assume():
    every = torch.arange(256, dtype=torch.uint8)
    e4 = every.view(torch.float8_e4m3fn).float()
    assert set(torch.nonzero(e4.isnan()).flatten().tolist()) == {0x7F, 0xFF}  # e4m3fn: no inf
    assert not e4.isinf().any()
    e5 = every.view(torch.float8_e5m2).float()
    assert set(torch.nonzero(e5.isinf()).flatten().tolist()) == {0x7C, 0xFC}
    assert set(torch.nonzero(e5.isnan()).flatten().tolist()) == {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}


def test_segments_read_the_fp8_dtypes(fp8_file):
    segs = {s.name: s for s in plan_file(fp8_file) if s.kind == "tensor"}
    ref = _tensors()
    for name, t in ref.items():
        want = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float32: "F32",
                torch.bfloat16: "BF16"}[t.dtype]
        assert segs[name].dtype == want and segs[name].shape == tuple(t.shape), name
        assert segs[name].length == t.numel() * t.element_size()
    assert all(isinstance(LAYOUTS[d], FloatLayout) and LAYOUTS[d].itemsize == 1 for d in FP8)


@pytest.mark.parametrize("threads", [1, 2])
def test_fp8_file_round_trips_bit_exact(fp8_file, tmp_path, threads):
    out = tmp_path / "m.llmp"
    r = pack(fp8_file, out, threads=threads, chunk_bytes=1 << 12)  # FP8 chunks of 2048 words
    assert r["bytes_out"] < r["bytes_in"]
    back = tmp_path / "back.safetensors"
    unpack(out, back)
    assert _sha(back) == _sha(fp8_file)
    verify(out)
    with Packed(out) as pk:
        segs = {s["name"]: s for _, s in pk.tensors()}
        assert pk.index["version"] == 5  # FP8 fields are format 1: no new container version
    assert len(segs["many_chunks.e4m3"]["chunks"]) == 8  # 15003 bytes in 2048-word chunks
    assert segs["many_chunks.e4m3"]["chunks"][-1][2] == 15003 - 7 * 2048
    assert segs["empty.e4m3"]["chunks"] == []
    assert {segs[n]["dtype"] for n in segs if n.startswith("every")} == set(FP8)


@pytest.mark.parametrize("dtype", sorted(FP8))
def test_fp8_chunk_fields_and_size(dtype):
    """A realistic FP8 weight codes as head (exponent ‖ mantissa) + sign tail, near its bound;
    every byte pattern decodes back through both decode paths."""
    g = torch.Generator().manual_seed(5)
    w, _ = _cast(torch.randn(512, 256, generator=g), FP8[dtype], per_channel=True)
    raw = w.view(torch.uint8).numpy().reshape(-1)
    payload, st = encode_chunk(raw, dtype)
    assert payload[0] == 2  # head + one tail piece (the sign)
    h_len = struct.unpack_from("<I", payload, 2)[0]
    assert payload[6 + h_len] == 0 and struct.unpack_from("<I", payload, 7 + h_len)[0] == len(raw) // 8  # sign: raw bits
    assert st.bound_bits / 8 <= len(payload) <= st.bound_bits / 8 * 1.01 + 300
    assert len(payload) < (0.84 if dtype == "F8_E4M3" else 0.72) * len(raw)  # the mantissa bits stay
    assert decode_chunk(memoryview(payload), dtype, len(raw)).tobytes() == raw.tobytes()
    every = np.arange(256, dtype=np.uint8).repeat(3)[::-1].copy()
    p2, _ = encode_chunk(every, dtype)
    for compiled in (True, False):
        assert decode_chunk(memoryview(p2), dtype, len(every), compiled=compiled).tobytes() == every.tobytes()


def test_fp8_folder_with_config_round_trips(tmp_path):
    """A compressed-tensors-like FP8 folder: shards, an index and a config beside them."""
    src = tmp_path / "src"
    src.mkdir()
    t = _tensors()
    names = sorted(t)
    save_file({k: t[k] for k in names[:5]}, str(src / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in names[5:]}, str(src / "model-00002-of-00002.safetensors"))
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                          "weight_block_size": None}}))
    out = tmp_path / "m.llmp"
    pack(src, out, threads=1)
    unpack(out, tmp_path / "back")
    for p in src.iterdir():
        assert _sha(tmp_path / "back" / p.name) == _sha(p), p.name


def test_sign_field_bits_are_lsb_first():
    """The 1-bit raw stream (FP8's sign field, unrolled in kernels) is numpy's little-endian packbits."""
    from llmpress.lossless.entropy import pack_bits, unpack_bits

    rng = np.random.default_rng(2)
    for n in (0, 1, 8, 13, 4099):
        s = rng.integers(0, 2, n).astype(np.uint8)
        buf = pack_bits(s, 1)
        assert buf == np.packbits(s, bitorder="little").tobytes()
        assert (unpack_bits(buf, n, 1) == s).all()
