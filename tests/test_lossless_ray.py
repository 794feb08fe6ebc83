"""``pack --workers``: one Ray task per shard gives the very bytes of the one-process pack; Ray
missing or an address where nothing answers is refused before any output exists."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmpress.cluster import ClusterError
from llmpress.lossless import fanout
from llmpress.lossless.container import pack, unpack


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sharded(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama re-saved as 3 shards with an index json (the middle shard in BF16, so two
    float layouts), its config and tokenizer files beside them."""
    out = tmp_path_factory.mktemp("sharded")
    for f in tiny_llama_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    state = {}
    for f in sorted(tiny_llama_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    names = sorted(state)
    groups = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        tensors = {n: state[n].to(torch.bfloat16) if i == 1 else state[n] for n in group}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: pack finds it started and leaves it up."""
    from llmpress.cluster import ray_cluster

    with ray_cluster(2) as c:
        yield c


def test_workers_pack_is_byte_identical_and_unpacks(sharded, cluster, tmp_path, monkeypatch):
    one = tmp_path / "one.llmp"
    a = pack(sharded, one, threads=2, chunk_bytes=16 << 10)
    monkeypatch.setattr(fanout, "BATCH_BYTES", 16 << 10)  # several batches per shard (shards of ~100 KiB)
    seen: list[int] = []
    two = tmp_path / "two.llmp"
    b = pack(sharded, two, workers=2, threads=1, chunk_bytes=16 << 10, progress=seen.append)
    assert b["workers"] == 2 and a["files"] == b["files"] >= 6
    assert _sha(one) == _sha(two)
    assert sum(seen) == b["bytes_in"] and len(seen) > b["files"]
    back = tmp_path / "back"
    unpack(two, back)
    for f in sharded.rglob("*"):
        if f.is_file():
            assert (back / f.relative_to(sharded)).read_bytes() == f.read_bytes(), f.name


def test_policy_and_chunk_size_travel_to_the_workers(sharded, cluster, tmp_path):
    one, two = tmp_path / "one.llmp", tmp_path / "two.llmp"
    pack(sharded, one, policy="zstd", chunk_bytes=64 << 10, threads=1)
    pack(sharded, two, policy="zstd", chunk_bytes=64 << 10, workers=3, threads=2)
    assert _sha(one) == _sha(two)


def test_workers_import_llmpress_from_the_driver_source(cluster):
    """Local cluster: the driver's source folder first on the workers' path; an existing cluster
    (``--address``): the package shipped with the job (its own Ray session, in a subprocess)."""
    import llmpress

    def where() -> str:  # nested: pickled by value (the workers cannot import this test module)
        import llmpress

        return llmpress.__file__

    here = Path(llmpress.__file__).resolve()
    assert Path(cluster.ray.get(cluster.remote(where).remote())).resolve() == here
    code = ("import ray, llmpress; from llmpress.cluster import runtime_env\n"
            "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False,"
            " runtime_env=runtime_env(remote_cluster=True))\n"
            "print(ray.get(ray.remote(lambda: __import__('llmpress').__file__).remote()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    shipped = Path(r.stdout.strip().splitlines()[-1]).resolve()
    assert shipped != here and shipped.name == "__init__.py" and shipped.parent.name == "llmpress"
    assert (shipped.parent / "lossless" / "fanout.py").read_bytes() == (here.parent / "lossless" / "fanout.py").read_bytes()


def test_a_workers_error_is_the_one_process_error(sharded, cluster, tmp_path):
    from llmpress.lossless.segments import HeaderError

    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    h = json.dumps({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (bad / "zz.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + bytes(100))
    out = tmp_path / "x.llmp"
    with pytest.raises(HeaderError, match="zz.safetensors: tensor 'x'"):
        pack(bad, out, workers=2)
    assert not out.exists() and not list(tmp_path.glob(".x.llmp*"))


def test_a_node_with_other_coding_libraries_is_refused(sharded, cluster, tmp_path, monkeypatch):
    versions = {**fanout.coder_versions(), "zstd": "0.0.1"}
    monkeypatch.setattr(fanout, "coder_versions", lambda: versions)  # the driver's view only
    out = tmp_path / "x.llmp"
    with pytest.raises(ClusterError, match=r"zstd .* \(driver: 0\.0\.1\)"):
        pack(sharded, out, workers=2)
    assert not out.exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_refused_before_output(sharded, tmp_path):
    out = tmp_path / "x.llmp"
    with pytest.raises(ClusterError, match="no Ray cluster answers"):
        pack(sharded, out, address=f"127.0.0.1:{_closed_port()}")
    assert list(tmp_path.iterdir()) == []


def test_missing_ray_refused_before_output(sharded, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    out = tmp_path / "x.llmp"
    with pytest.raises(ClusterError, match="needs Ray"):
        pack(sharded, out, workers=2)
    assert list(tmp_path.iterdir()) == []


def test_cli_names_the_address(sharded, tmp_path):
    import llmpress.cli
    from llmpress.cli import app

    llmpress.cli._load_commands()
    out = tmp_path / "x.llmp"
    addr = f"127.0.0.1:{_closed_port()}"
    r = CliRunner().invoke(app, ["pack", str(sharded), "-o", str(out), "--workers", "2", "--address", addr])
    assert r.exit_code != 0 and addr in r.output and not out.exists()
    r = CliRunner().invoke(app, ["pack", str(sharded), "-o", str(out), "--address", "nonsense"])
    assert r.exit_code != 0 and "host:port" in r.output and not out.exists()
