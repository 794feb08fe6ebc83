"""Start-up of the lossless path as a user sees it: a fresh process that packs, unpacks, verifies
or describes a file imports neither torch nor the lossy stack (bench/startup.py times it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Modules a lossless command must never import (each costs seconds or more to import).
HEAVY = ("torch", "transformers", "scipy", "ray", "llmpress.quant", "llmpress.pipeline")


def _bf16_file(path: Path) -> Path:
    """A small safetensors file (a BF16 matrix and an I64 vector), written without torch."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((64, 300), dtype=np.float32) * 0.02).view(np.uint32)
    a = (a >> 16).astype(np.uint16).tobytes()  # BF16: the top half of each FP32 word
    b = np.arange(5, dtype=np.int64).tobytes()
    header = {"a": {"dtype": "BF16", "shape": [64, 300], "data_offsets": [0, len(a)]},
              "b": {"dtype": "I64", "shape": [5], "data_offsets": [len(a), len(a) + len(b)]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + a + b)
    return path


def _fresh(code: str, tmp_path: Path) -> list[str]:
    """Run ``code`` in a fresh interpreter; it prints the heavy modules it ended up importing."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


CLI = "import sys\nfrom llmpress.cli import main\nsys.argv = ['llmpress', *{args!r}]\ntry:\n    main()\n" \
      "except SystemExit as e:\n    assert not e.code, e.code"


@pytest.mark.parametrize("verb", ["pack", "unpack", "verify", "info", "info-llmp"])
def test_lossless_cli_does_not_import_torch(tmp_path, verb):
    src = _bf16_file(tmp_path / "w.safetensors")
    packed = tmp_path / "w.llmp"
    if verb != "pack":
        assert _fresh(CLI.format(args=["pack", str(src), "-o", str(packed)]), tmp_path) == []
    args = {"pack": ["pack", str(src), "-o", str(packed)],
            "unpack": ["unpack", str(packed), "-o", str(tmp_path / "back.safetensors")],
            "verify": ["verify", str(packed)],
            "info": ["info", str(src)],
            "info-llmp": ["info", str(packed), "--json"]}[verb]
    assert _fresh(CLI.format(args=args), tmp_path) == []
    if verb == "unpack":
        assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


def test_lossless_api_does_not_import_torch(tmp_path):
    """The library verbs too (llmpress.pack/unpack/verify/info), and the modules behind them."""
    src = _bf16_file(tmp_path / "w.safetensors")
    code = (f"import llmpress, llmpress.lossless.container, llmpress.lossless.reader, llmpress.lossless.bounds\n"
            f"llmpress.pack({str(src)!r}, 'w.llmp')\nllmpress.verify('w.llmp')\nllmpress.info('w.llmp')\n"
            f"llmpress.unpack('w.llmp', 'back.safetensors')")
    assert _fresh(code, tmp_path) == []
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
