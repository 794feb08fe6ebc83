"""Grid detection (lossless/grid.py): float tensors dequantized from a block grid are packed as
codes + parameters and restored bit for bit; anything that does not reproduce takes the float path."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from safetensors.numpy import save_file

from llmpress.lossless import grid as G
from llmpress.lossless.container import pack, unpack
from llmpress.lossless.reader import GRID_VERSION, VERSION, CorruptError, Packed

GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _dequantized(qtype: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A float32 tensor as gguf-py dequantizes it from ``qtype``."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02
    t = getattr(GGMLQuantizationType, qtype)
    return quants.dequantize(quants.quantize(w, t), t).astype(np.float32).reshape(shape)


def _round_trip(tmp_path: Path, tensors: dict[str, np.ndarray], chunk_bytes: int = 1 << 16) -> tuple[dict, Packed]:
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "m.llmp"
    r = pack(src, out, threads=2, chunk_bytes=chunk_bytes)
    back = tmp_path / "back.safetensors"
    unpack(out, back, threads=2)
    assert _sha(back) == _sha(src)
    return r, Packed(out)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_formulas_found_and_exact(tmp_path: Path, qtype: str) -> None:
    x = _dequantized(qtype, (96, 512))
    g = G.detect(x.reshape(-1).view(np.uint32), x.shape)
    assert g is not None and G.GGUF_NAMES[(g.formula, g.bits, g.zero, g.block, g.params)] == qtype
    r, p = _round_trip(tmp_path, {"w": x})
    with p:
        assert p.version == GRID_VERSION
        (_, s), = p.tensors()
        assert G.Grid.from_index(s["grid"]) == g
        assert all(p._read(c[0], 1)[0] == 1 for c in s["chunks"])  # every chunk on the grid
    bits = 8 * r["tensor_bytes_out"] / x.size
    assert bits < g.bits + 1.0  # codes + fp16 params, far below the float path's ~16+ bits


@pytest.mark.parametrize("params", ["BF16", "F32"])
def test_affine_grid_other_params(tmp_path: Path, params: str) -> None:
    """d and m as BF16 or F32, block 64, 3-bit codes, computed in float32 as gguf-py does."""
    rng = np.random.default_rng(1)
    nb, B, bits = 2048, 64, 3
    d = rng.uniform(1e-3, 2e-2, nb).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, nb).astype(np.float32)
    if params == "BF16":  # outside float16's range, or F16 params would be found first
        d, m = d * np.float32(1e-6), m * np.float32(1e-6)
        d = ((d.view(np.uint32) >> 16) << 16).view(np.float32)
        m = ((m.view(np.uint32) >> 16) << 16).view(np.float32)
    q = rng.integers(0, 1 << bits, (nb, B))
    q[:, 0], q[:, 1] = 0, (1 << bits) - 1  # as min-max quantization leaves them
    x = ((d[:, None] * q.astype(np.float32)) + m[:, None]).astype(np.float32).reshape(256, -1)
    g = G.detect(x.reshape(-1).view(np.uint32), x.shape)
    assert g == G.Grid("affine", B, params, bits, 0)
    _round_trip(tmp_path, {"w": x})


def test_one_ulp_off_falls_back_exactly(tmp_path: Path) -> None:
    """A gridded tensor with one value one ulp off: that chunk takes the float path, the others
    stay on the grid, and the file restores bit for bit."""
    x = _dequantized("Q4_1", (128, 1024))
    flat = x.reshape(-1).view(np.uint32)
    k = flat.size - 1000  # in the last chunk, away from the detection sample
    flat[k] += 1
    r, p = _round_trip(tmp_path, {"w": x})
    with p:
        (_, s), = p.tensors()
        modes = [p._read(c[0], 1)[0] for c in s["chunks"]]
    assert modes[-1] == 0 and all(m == 1 for m in modes[:-1])
    assert G.split(G.Grid.from_index(s["grid"]), flat[-(s["chunks"][-1][2] // 4):].view(np.uint8)) is None


def test_not_gridded_is_untouched(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    assert G.detect(w.reshape(-1).view(np.uint32), w.shape) is None
    off = _dequantized("Q4_0", (64, 256))
    off.reshape(-1)[5] = np.nextafter(off.reshape(-1)[5], np.float32(1))  # in the first block
    assert G.detect(off.reshape(-1).view(np.uint32), off.shape) is None
    _, p = _round_trip(tmp_path, {"w": w, "off": off})
    with p:
        assert p.version == VERSION and not any("grid" in s for _, s in p.tensors())


def test_special_values_exact() -> None:
    """−0, +0 and all-zero blocks on a scale grid (Q4_0's negative d gives −0), NaN refused."""
    x = _dequantized("Q4_0", (8, 256))
    x[0, :32] = 0.0
    x[1, :32] = -0.0
    g = G.Grid("scale", 32, "F16", 4, 8)
    raw = x.reshape(-1).view(np.uint8)
    parts = G.split(g, raw)
    assert parts is not None
    out = np.empty_like(raw)
    G.merge(g, parts, out)
    assert (out == raw).all()
    x[2, 3] = np.nan
    assert G.split(g, x.reshape(-1).view(np.uint8)) is None


def test_lying_grid_refused(tmp_path: Path) -> None:
    x = _dequantized("Q8_0", (64, 256))
    _, p = _round_trip(tmp_path, {"w": x})
    p.close()
    path = tmp_path / "m.llmp"
    buf = bytearray(path.read_bytes())
    off, ln, _, end = struct.unpack_from("<QQI8s", buf, len(buf) - 28)
    import zlib
    import zstandard

    index = json.loads(zstandard.ZstdDecompressor().decompress(bytes(buf[off : off + ln])))
    index["files"][0]["segments"][1]["grid"]["block"] = 48
    blob = zstandard.ZstdCompressor().compress(json.dumps(index).encode())
    bad = bytes(buf[:off]) + blob + struct.pack("<QQI8s", off, len(blob), zlib.crc32(blob), end)
    path.write_bytes(bad)
    with pytest.raises(CorruptError, match="grid"):
        Packed(path)


def test_real_smollm2_tensors(tmp_path: Path, smollm_dir: Path) -> None:
    """Three tensors of the embedded SmolLM2 (a Q4_1 linear, a norm, embedding rows on Q8_0):
    found, packed below the GGUF's bits, restored bit for bit."""
    from safetensors import safe_open

    with safe_open(str(smollm_dir / "model.safetensors"), "np") as f:
        t = {"q": f.get_tensor("model.layers.2.self_attn.q_proj.weight"),
             "norm": f.get_tensor("model.layers.2.input_layernorm.weight"),
             "emb": f.get_slice("model.embed_tokens.weight")[:2048]}
    r, p = _round_trip(tmp_path, t, chunk_bytes=512 << 10)
    with p:
        found = {s["name"]: G.Grid.from_index(s["grid"]).describe() for _, s in p.tensors() if "grid" in s}
    assert "GGUF Q4_1" in found["q"] and "GGUF Q8_0" in found["emb"] and "norm" not in found
    q_bits = 8 * r["tensors"]["q"]["packed"] / t["q"].size
    assert q_bits < 5.0  # Q4_1 in the GGUF: 5 bits a parameter


@pytest.mark.slow
def test_real_smollm2_whole(tmp_path: Path, smollm_dir: Path) -> None:
    """The whole embedded SmolLM2 FP32: below its GGUF's 5.74 bits a parameter, bit-exact."""
    out = tmp_path / "s.llmp"
    r = pack(smollm_dir, out, threads=2)
    assert 8 * r["bytes_out"] / (r["tensor_bytes_in"] / 4) < 5.6
    unpack(out, tmp_path / "back", threads=2)
    for f in smollm_dir.rglob("*"):
        if f.is_file():
            assert _sha(tmp_path / "back" / f.relative_to(smollm_dir)) == _sha(f)


def test_no_grids_takes_the_float_path(tmp_path: Path) -> None:
    x = _dequantized("Q4_1", (64, 256))
    src = tmp_path / "m.safetensors"
    save_file({"w": x}, str(src))
    on = pack(src, tmp_path / "on.llmp", threads=1)
    off = pack(src, tmp_path / "off.llmp", threads=1, grids=False)
    with Packed(tmp_path / "off.llmp") as p:
        assert p.version == VERSION and not any("grid" in s for _, s in p.tensors())
    assert on["tensor_bytes_out"] < 0.5 * off["tensor_bytes_out"]
    unpack(tmp_path / "off.llmp", tmp_path / "back.safetensors")
    assert _sha(tmp_path / "back.safetensors") == _sha(src)


@pytest.mark.parametrize("where", ["mode", "codes"])
def test_corrupt_grid_chunk_refused(tmp_path: Path, where: str) -> None:
    from llmpress.lossless.container import verify

    x = _dequantized("Q4_1", (64, 256))
    _, p = _round_trip(tmp_path, {"w": x})
    with p:
        (_, s), = p.tensors()
        off, ln = s["chunks"][0][:2]
    path = tmp_path / "m.llmp"
    buf = bytearray(path.read_bytes())
    if where == "mode":
        buf[off] = 2
    else:
        buf[off + ln // 3] ^= 0x20  # inside the codes stream
    path.write_bytes(bytes(buf))
    with pytest.raises(CorruptError):
        verify(path, sha256=False)


def test_flipped_bytes_never_decode_wrong(tmp_path: Path) -> None:
    """Random byte flips in grid chunks' payloads: each read either refuses the file or gives
    the original bytes back."""
    from llmpress.lossless.container import verify

    x = _dequantized("Q4_1", (64, 512))
    y = _dequantized("Q8_0", (32, 512), seed=1)
    _, p = _round_trip(tmp_path, {"w": x, "e": y}, chunk_bytes=1 << 14)
    with p:
        spans = [(c[0], c[1]) for _, s in p.tensors() for c in s["chunks"]]
    path = tmp_path / "m.llmp"
    clean = path.read_bytes()
    rng = np.random.default_rng(5)
    for i in range(25):
        off, ln = spans[rng.integers(len(spans))]
        buf = bytearray(clean)
        k = off + int(rng.integers(ln))
        buf[k] ^= 1 << int(rng.integers(8))
        bad = tmp_path / f"bad{i}.llmp"
        bad.write_bytes(bytes(buf))
        try:
            verify(bad, sha256=True)
        except CorruptError:
            continue


def test_chunks_not_whole_blocks_take_the_float_path(tmp_path: Path) -> None:
    x = _dequantized("Q4_1", (64, 256))
    r, p = _round_trip(tmp_path, {"w": x}, chunk_bytes=1000)  # 500-word chunks: not whole blocks of 32
    with p:
        assert p.version == VERSION and not any("grid" in s for _, s in p.tensors())
