"""Deltas: a fine-tune packed against its base (folder, .safetensors or .llmp), restored byte for byte,
a wrong or missing base refused before anything is decoded."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmpress.errors import BaseModelError
from llmpress.lossless import delta as D
from llmpress.lossless.container import open_tensor, pack, unpack, verify
from llmpress.lossless.reader import DELTA_VERSION, Packed


def _digests(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(base, fine-tune) folders: the tiny Llama saved in BF16, then fully fine-tuned a few AdamW
    steps (FP32 master weights) and saved in BF16 with one tensor the base lacks and one file more."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("delta")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base, ft = root / "base", root / "ft"
    model.save_pretrained(base, state_dict={k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(4):
        x = torch.randint(0, model.config.vocab_size, (2, 16))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, base / f.name) if not (base / f.name).exists() else None
    shutil.copytree(base, ft, ignore=shutil.ignore_patterns("*.safetensors"))
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["extra.scale"] = torch.randn(40, dtype=torch.bfloat16)  # no counterpart in the base
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    (ft / "notes.txt").write_text("fine-tuned four steps\n")  # no counterpart either
    return base, ft


def test_pack_unpack_against_a_folder_is_byte_identical_and_smaller(pair, tmp_path):
    base, ft = pair
    alone = pack(ft, tmp_path / "alone.llmp")
    r = pack(ft, tmp_path / "d.llmp", base=base)
    assert r["version"] == DELTA_VERSION and r["base"]["kind"] == "folder"
    assert r["bytes_out"] < alone["bytes_out"] / 2, (r["bytes_out"], alone["bytes_out"])
    assert sum(r["delta_modes"].values()) > 0
    assert not r["tensors"]["extra.scale"]["delta"] and r["tensors"]["model.norm.weight"]["delta"]
    with open(tmp_path / "d.llmp", "rb") as f:
        assert struct.unpack("<I", f.read(12)[8:])[0] == DELTA_VERSION
    with Packed(tmp_path / "d.llmp") as p:
        refs = {f["path"] for f in p.index["files"] if f.get("base")}
        assert "config.json" in refs and "notes.txt" not in refs and "model.safetensors" not in refs
    for threads in (1, 3):
        unpack(tmp_path / "d.llmp", tmp_path / f"out{threads}", base=base, threads=threads)
        assert _digests(tmp_path / f"out{threads}") == _digests(ft)
    assert verify(tmp_path / "d.llmp", base=base)["ok"]
    t = open_tensor(tmp_path / "d.llmp", "model.norm.weight", base=base)
    assert t.dtype == torch.bfloat16 and t.shape == (64,)
    from safetensors.torch import load_file

    import llmpress

    model = llmpress.load(tmp_path / "d.llmp", base=base)  # built in memory from the delta and the base
    want = load_file(str(ft / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.data, want)


@pytest.mark.parametrize("pack_base, unpack_base", [("safetensors", "safetensors"), ("llmp", "llmp"), ("folder", "llmp"),
                                                    ("llmp", "folder")])
def test_base_as_safetensors_or_llmp(pair, tmp_path, pack_base, unpack_base):
    base, ft = pair
    pack(base, tmp_path / "base.llmp")
    given = {"folder": base, "safetensors": base / "model.safetensors", "llmp": tmp_path / "base.llmp"}
    pack(ft, tmp_path / "d.llmp", base=given[pack_base])
    unpack(tmp_path / "d.llmp", tmp_path / "out", base=given[unpack_base])
    assert _digests(tmp_path / "out") == _digests(ft)


def test_a_missing_or_wrong_base_is_refused_before_anything_is_written(pair, tmp_path):
    base, ft = pair
    pack(ft, tmp_path / "d.llmp", base=base)
    with pytest.raises(BaseModelError, match="needs that base model"):
        unpack(tmp_path / "d.llmp", tmp_path / "out")
    with pytest.raises(BaseModelError, match="needs that base model"):
        verify(tmp_path / "d.llmp")
    with pytest.raises(BaseModelError, match=r"tensor 'model\.[^']+'.*sha256 mismatch"):
        unpack(tmp_path / "d.llmp", tmp_path / "out", base=ft)  # the fine-tune itself: every tensor differs
    wrong = tmp_path / "wrong"
    shutil.copytree(base, wrong)
    (wrong / "config.json").write_text((base / "config.json").read_text().replace("{", '{"x": 1, ', 1))
    with pytest.raises(BaseModelError, match="config.json"):
        unpack(tmp_path / "d.llmp", tmp_path / "out", base=wrong)
    with pytest.raises(BaseModelError, match="has no such file"):
        verify(tmp_path / "d.llmp", base=base / "model.safetensors")  # the files were the folder's
    assert not (tmp_path / "out").exists()


def test_a_base_that_does_not_match_writes_a_plain_file(pair, tmp_path, minilm_dir):
    """No tensor or file of the base matches: nothing needs it, the lowest version describes the file."""
    _, ft = pair
    r = pack(ft / "model.safetensors", tmp_path / "d.llmp", base=minilm_dir)
    assert r["version"] < DELTA_VERSION and r["base"] is None
    unpack(tmp_path / "d.llmp", tmp_path / "out.safetensors")  # no base needed


def test_delta_transforms_round_trip_every_bit_pattern():
    rng = np.random.default_rng(0)
    x16 = np.arange(1 << 16, dtype=np.uint16)
    cases = [(x16, rng.permutation(x16)), (x16, x16 ^ np.uint16(0x8000)),
             (rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32),
              rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)),
             (np.repeat(np.arange(256, dtype=np.uint8), 256), np.tile(np.arange(256, dtype=np.uint8), 256))]
    for x, b in cases:
        P = x.itemsize
        for mode in (D.XOR, D.DIFF):
            planes = np.empty((P, len(x)), np.uint8)
            D.DK.delta_planes(x, b, mode, planes)
            out = np.empty_like(x)
            D.DK.merge_planes(planes, b, mode, out)
            assert np.array_equal(out, x), (x.dtype, mode)
    for dtype, (x, b) in (("BF16", cases[0]), ("F32", cases[2]), ("F8_E4M3", cases[3])):
        parts, st = D.encode_delta_parts(x.view(np.uint8), b.view(np.uint8), dtype)
        buf = memoryview(b"".join(bytes(p) for p in parts))
        for compiled in (True, False):
            got = D.decode_delta_chunk(buf, dtype, x.nbytes, b.view(np.uint8), compiled=compiled)
            assert np.array_equal(got, x.view(np.uint8))


def test_the_compiled_backends_are_chunk_kernels():
    from llmpress.lossless import chunk_kernel as CKM

    assert D.COMPILED == {CKM.RAW, CKM.RANS4, CKM.SPLIT, CKM.RANS}


def test_a_skewed_plane_takes_rans_and_a_zstd_plane_still_decodes():
    """Weights that barely moved: plane 1 is almost all zeros and goes to rANS, decoded by the
    compiled kernel (its last words as vectors too); a chunk whose planes are zstd (the ``zstd``
    policy, or an earlier writer's skewed planes) decodes on both paths, byte for byte."""
    rng = np.random.default_rng(2)
    b = (rng.standard_normal(1 << 17).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    x = b + (rng.random(len(b)) < 0.3).astype(np.uint16)
    x[::997] ^= 0x8000  # a few sign flips: large distances
    parts, st = D.encode_delta_parts(x.view(np.uint8), b.view(np.uint8), "BF16")
    assert st.delta == D.DIFF and st.streams.get("zstd", 0) == 0 and st.streams.get("rans", 0) > 0
    buf = memoryview(b"".join(bytes(p) for p in parts))
    assert D._compiled_backends(buf[1:], 2)
    for compiled in (True, False):
        assert np.array_equal(D.decode_delta_chunk(buf, "BF16", x.nbytes, b.view(np.uint8), compiled=compiled), x.view(np.uint8))
    parts, st = D.encode_delta_parts(x.view(np.uint8), b.view(np.uint8), "BF16", policy="zstd")
    assert st.streams.get("zstd", 0) > 0
    buf = memoryview(b"".join(bytes(p) for p in parts))
    assert not D._compiled_backends(buf[1:], 2)
    for compiled in (True, False):
        assert np.array_equal(D.decode_delta_chunk(buf, "BF16", x.nbytes, b.view(np.uint8), compiled=compiled), x.view(np.uint8))


def test_diff_is_the_distance_in_representable_values():
    """One BF16 step up, one step down across zero, −0 to +0: DIFF codes each as a small number."""
    b = np.array([0x3F80, 0x0000, 0x8000, 0x0001], np.uint16)  # 1.0, +0, −0, the smallest subnormal
    x = np.array([0x3F81, 0x8000, 0x0000, 0x8001], np.uint16)  # next above 1.0, −0, +0, −(smallest)
    planes = np.empty((2, 4), np.uint8)
    D.DK.delta_planes(x, b, D.DIFF, planes)
    z = planes[0].astype(int) | planes[1].astype(int) << 8
    assert list(z) == [2, 1, 2, 5]  # +1, −1, +1, −3 zigzagged


def test_cli_pack_unpack_info_with_base(pair, tmp_path):
    import llmpress.cli
    from llmpress.cli import app

    llmpress.cli._load_commands()
    base, ft = pair
    runner = CliRunner()
    r = runner.invoke(app, ["pack", str(ft), "-o", str(tmp_path / "d.llmp"), "--base", str(base)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["unpack", str(tmp_path / "d.llmp"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--base" in r.output and "base model" in r.output
    r = runner.invoke(app, ["unpack", str(tmp_path / "d.llmp"), "-o", str(tmp_path / "out"), "--base", str(base)])
    assert r.exit_code == 0, r.output
    assert _digests(tmp_path / "out") == _digests(ft)
    r = runner.invoke(app, ["info", str(tmp_path / "d.llmp"), "--json"])
    assert r.exit_code == 0, r.output
    b = json.loads(r.output.strip().splitlines()[-1])["base"]
    assert b["name"] == "base" and b["tensors"] > 0 and b["files"] > 0
