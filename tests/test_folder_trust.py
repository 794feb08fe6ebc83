"""The lossy folder refuses what it does not trust, before reading data or allocating from a meta.

A folder is edited by hand, half copied, or made by someone else: each test below writes one
such folder from a real one and expects a CorruptFileError (or an InputError for what is valid
but not ours to read) naming the file and the tensor, never another exception.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmpress
from llmpress.errors import CorruptFileError, InputError, LlmpressError
from llmpress.io.checksum import sha256_file

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from harness import tiny_source  # noqa: E402  (the fuzz harness's source model: the same folders)

P = "model.layers.0.mlp.up_proj.weight"  # a compressed linear of the tiny model: (out, in) = (96, 64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Real folders written by the pipeline: rtn (4-bit g32), svd (rank 8), svd stored dense."""
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe

    base = tmp_path_factory.mktemp("trust")
    src = tiny_source(base / "src")
    out = {}
    for name, recipe in {"rtn": Recipe.uniform("rtn", bits=4, group_size=32),
                         "svd": Recipe.uniform("svd", rank=8),
                         "dense": Recipe.uniform("svd", energy=1.0)}.items():
        out[name] = base / name
        compress(src, recipe, out[name], progress=False)
    return out


def _copy(folders: dict[str, Path], which: str, tmp: Path) -> Path:
    dst = tmp / which
    shutil.copytree(folders[which], dst)
    return dst


def _manifest(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    p = folder / "llmpress.json"
    m = json.loads(p.read_text())
    r = edit(m)
    p.write_text(json.dumps(m if r is None else r))


def _reseal(folder: Path) -> None:
    """Update the manifest's sha256 of the shard, as someone who edits a shard on purpose would."""
    _manifest(folder, lambda m: m["files"].update({"model.safetensors": sha256_file(folder / "model.safetensors")}))


def _shard(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _reseal(folder)


def _refused(folder: Path, *words: str, kind: type[Exception] = CorruptFileError) -> str:
    with pytest.raises(LlmpressError) as e:
        llmpress.load(folder)
    assert isinstance(e.value, kind), repr(e.value)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_the_real_folders_load(folders):
    for f in folders.values():
        m = llmpress.load(f)
        assert m(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


# ---------------------------------------------------------------------------- shard names
def test_a_shard_outside_the_folder_by_dotdot_is_refused(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path)
    os.replace(f / "model.safetensors", tmp_path / "outside.safetensors")
    _manifest(f, lambda m: m.update(files={"../outside.safetensors": m["files"]["model.safetensors"]}))
    _refused(f, "../outside.safetensors", "llmpress.json")


def test_an_absolute_shard_name_is_refused(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path)
    os.replace(f / "model.safetensors", tmp_path / "abs.safetensors")
    _manifest(f, lambda m: m.update(files={str(tmp_path / "abs.safetensors"): m["files"]["model.safetensors"]}))
    _refused(f, "abs.safetensors")


def test_a_symlink_leaving_the_folder_is_refused(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path)
    os.replace(f / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (f / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    _refused(f, "model.safetensors", "outside")


def test_a_symlink_inside_the_folder_is_fine(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path)
    (f / "data").mkdir()
    os.replace(f / "model.safetensors", f / "data" / "real.safetensors")
    (f / "model.safetensors").symlink_to(Path("data") / "real.safetensors")
    llmpress.load(f)


# ---------------------------------------------------------------------------- the manifest itself
@pytest.mark.parametrize("edit, words", [
    (lambda m: [], ["llmpress.json", "object"]),
    (lambda m: m.update(tensors=[]), ["tensors"]),
    (lambda m: m.update(files={"model.safetensors": 7}), ["model.safetensors", "sha256"]),
    (lambda m: m["tensors"][P].update(meta="x"), [P, "meta"]),
    (lambda m: m["tensors"][P].update(keys="qweight"), [P, "keys"]),
    (lambda m: m["tensors"].update({"model.layers.7.mlp.up_proj.weight": m["tensors"][P]}), ["model.layers.7.mlp.up_proj"]),
])
def test_a_malformed_manifest_is_refused(folders, tmp_path, edit, words):
    f = _copy(folders, "rtn", tmp_path)
    _manifest(f, edit)
    _refused(f, *words)


def test_unknown_codec_and_version_are_refused_by_name(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path)
    _manifest(f, lambda m: m["tensors"][P].update(codec="zzz"))
    _refused(f, "zzz", P, "llmpress.json")
    f = _copy(folders, "svd", tmp_path / "v")
    _manifest(f, lambda m: m.update(version=99))
    _refused(f, "version 99", kind=InputError)
    g = _copy(folders, "rtn", tmp_path / "mv")
    _manifest(g, lambda m: m["tensors"][P]["meta"].update(version=7))
    _refused(g, P, "version 7")


# ---------------------------------------------------------------------------- lying meta
@pytest.mark.parametrize("which, field, value, words", [
    ("rtn", "shape", [1 << 20, 1 << 20], ["shape"]),  # 4 TB of weights from 3 KB of codes
    ("rtn", "shape", [64, 96], ["shape"]),  # transposed
    ("rtn", "bits", 2, ["qweight"]),  # reads fewer bytes: would load silently wrong
    ("rtn", "bits", 8, ["qweight"]),
    ("rtn", "group_size", 64, ["shape"]),
    ("rtn", "group_size", 0, ["shape"]),
    ("rtn", "scale_dtype", "float32", ["float16"]),
    ("svd", "rank", 9, ["'U'"]),
    ("dense", "shape", [1 << 20, 1 << 20], ["shape"]),  # nn.Linear(1M, 1M) would be allocated
])
def test_a_meta_the_stored_tensors_contradict_is_refused(folders, tmp_path, which, field, value, words):
    f = _copy(folders, which, tmp_path)
    _manifest(f, lambda m: m["tensors"][P]["meta"].update({field: value}))
    _refused(f, P, "llmpress.json", *words)


def test_a_stored_tensor_of_the_wrong_dtype_or_shape_is_refused(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path / "a")
    _shard(f, lambda sd: sd.update({f"{P}.qweight": sd[f"{P}.qweight"].float()}))
    _refused(f, P, "qweight", "model.safetensors")
    f = _copy(folders, "rtn", tmp_path / "b")
    _shard(f, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    _refused(f, "model.norm.weight", "model.safetensors")
    f = _copy(folders, "rtn", tmp_path / "c")
    _shard(f, lambda sd: sd.pop(f"{P}.scale"))
    _refused(f, P, "scale")


def test_a_lying_safetensors_header_is_refused(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path)
    raw = (f / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    k = f"{P}.qweight"
    header[k]["data_offsets"][1] += 1 << 40  # past the end of the file
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (f / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    _reseal(f)
    _refused(f, "model.safetensors")
    (f / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])  # a header larger than the file
    _reseal(f)
    _refused(f, "model.safetensors")


def test_sha256_is_checked_by_default(folders, tmp_path):
    f = _copy(folders, "rtn", tmp_path)
    raw = bytearray((f / "model.safetensors").read_bytes())
    raw[-5] ^= 1
    (f / "model.safetensors").write_bytes(bytes(raw))
    _refused(f, "model.safetensors", "checksum")
    llmpress.load(f, verify=False)  # asked for: the bytes are the user's to trust


@pytest.mark.parametrize("value", [-1, 0, 2.5, True])
def test_a_size_in_config_that_is_not_a_positive_integer_is_refused(folders, tmp_path, value):
    """Found by the fuzzer: num_key_value_heads = -1 failed inside transformers after it had allocated."""
    from llmpress.errors import CorruptFileError

    bad = _copy(folders, "rtn", tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFileError, match="num_key_value_heads"):
        llmpress.load(bad)
