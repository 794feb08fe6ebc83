"""CLI of the lossless codec: pack / verify / info / unpack, --json, clear errors."""
from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import llmpress.cli
from llmpress.cli import app

llmpress.cli._load_commands()
runner = CliRunner()


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_round_trip_and_errors(tmp_path):
    src = tmp_path / "w.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"a": (torch.randn(300, 200, generator=g) * 0.02).to(torch.bfloat16), "b": torch.arange(5)}, str(src))
    out = tmp_path / "w.llmp"
    r = runner.invoke(app, ["pack", str(src), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    j = _last_json(r.stdout)
    assert j["ratio"] == j["bytes_out"] / j["bytes_in"] and j["ratio"] < 0.8

    r = runner.invoke(app, ["pack", str(src), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.output

    r = runner.invoke(app, ["verify", str(out), "--json"])
    assert r.exit_code == 0 and _last_json(r.stdout)["ok"] is True

    r = runner.invoke(app, ["info", str(out), "--json"])
    j = _last_json(r.stdout)
    assert j["tensors"]["a"]["exp_entropy"] < 4 and j["packed_bytes"] >= j["bound_chunk_bytes"] * 0.99

    r = runner.invoke(app, ["info", str(src), "--json"])
    assert r.exit_code == 0 and _last_json(r.stdout)["params"] == 300 * 200 + 5

    back = tmp_path / "back.safetensors"
    r = runner.invoke(app, ["unpack", str(out), "-o", str(back), "--json"])
    assert r.exit_code == 0, r.output
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()

    from llmpress.lossless.reader import Packed

    with Packed(out) as p:
        off = next(s for _, s in p.tensors() if s["name"] == "a")["chunks"][0][0] + 100
    data = bytearray(out.read_bytes())
    data[off] ^= 1
    out.write_bytes(bytes(data))
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 2 and "tensor 'a', chunk 0" in r.output.replace("\n", " ") and "Traceback" not in r.output

    (tmp_path / "junk.llmp").write_bytes(b"hello world" * 9)
    r = runner.invoke(app, ["unpack", str(tmp_path / "junk.llmp"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not an llmpress container" in r.output


def test_cli_refuses_a_retired_container_version(tmp_path):
    """A pre-format-1 file (container version 3 here) gets one clear line and exit code 2."""
    import struct
    from pathlib import Path

    data = bytearray((Path(__file__).parent / "data" / "lossless_v5.llmp").read_bytes())
    data[8:12] = struct.pack("<I", 3)
    old = tmp_path / "old.llmp"
    old.write_bytes(bytes(data))
    for cmd in (["verify", str(old)], ["unpack", str(old), "-o", str(tmp_path / "out")]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, r.output
        assert "container version 3 is no longer read" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
