"""llama.cpp's own quantizer as subprocesses: ``llama-imatrix`` and ``llama-quantize``.

The sweep's llama.cpp points (``llmpress limit --formats gguf``) are the GGUFs people make with
llama.cpp's tools: the original exported as an F32 GGUF, an importance matrix computed by
``llama-imatrix`` on the calibration windows llmpress itself calibrates on, and
``llama-quantize --imatrix`` to a K-quant mix. llmpress does not ship these tools; they are
looked for in the places of :data:`LOCATIONS`, in order.

Every call passes ``--no-repack``: llama.cpp's CPU weight repacking crashes on some AVX-512 hosts,
and it changes speed only, not results.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from ..errors import InputError, ResourceLimitError

log = logging.getLogger(__name__)

TOOLS = ("llama-imatrix", "llama-quantize")
# llama-quantize's name for each mix (its ``type`` argument)
FTYPES = {"q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M",
          "q6_k": "Q6_K", "q8_0": "Q8_0"}


def _env() -> Path | None:
    d = os.environ.get("LLMPRESS_LLAMA_CPP")
    return Path(d).expanduser() if d else None


def _path() -> Path | None:
    exe = shutil.which(TOOLS[-1])
    return Path(exe).parent if exe else None


def _bench_build() -> Path | None:
    return Path.home() / ".cache" / "llmpress" / "llama.cpp" / "build" / "bin"  # bench/build-llama-cpp.sh


# Where the tools may be: a folder holding them all, tried in this order
LOCATIONS: dict[str, Callable[[], Path | None]] = {
    "$LLMPRESS_LLAMA_CPP": _env,
    "PATH": _path,
    "bench/build-llama-cpp.sh's build": _bench_build,
}


def find_tools() -> Path | None:
    """The first folder of :data:`LOCATIONS` that holds every tool of :data:`TOOLS`, or None."""
    for where, fn in LOCATIONS.items():
        d = fn()
        if d is not None and all(os.access(d / t, os.X_OK) for t in TOOLS):
            log.debug("llama.cpp tools from %s: %s", where, d)
            return d
    return None


def where_to_look() -> str:
    return "; ".join(LOCATIONS) + " (build them with bench/build-llama-cpp.sh)"


def _run(argv: list[str | Path]) -> None:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr)[-2000:]
        raise ResourceLimitError(f"{Path(str(argv[0])).name} failed ({r.returncode}):\n{tail}")


def calibration_text(model: str, calib: str | None, samples: int, seq_len: int, path: Path) -> int:
    """The windows llmpress calibrates ``model`` on (``samples`` × ``seq_len`` tokens of ``calib``),
    decoded and written one after another to ``path``, so that llama-imatrix sees the same text.
    Returns the token count."""
    from ..io.atomic import atomic_file
    from ..models import load_tokenizer
    from ..pipeline import _calib_text, calib_ids

    tok = load_tokenizer(model)
    ids = calib_ids(tok, _calib_text(calib), samples, seq_len)  # (samples, seq_len)
    with atomic_file(path, force=True) as tmp:
        tmp.write_text("".join(tok.decode(row) for row in ids.tolist()))
    return ids.numel()


def imatrix(tools: Path, f32_gguf: Path, text: Path, out: Path, seq_len: int, chunks: int, threads: int) -> None:
    """llama-imatrix over ``chunks`` chunks of ``seq_len`` tokens of ``text``."""
    _run([tools / "llama-imatrix", "-m", f32_gguf, "-f", text, "-o", out, "-c", seq_len, "-b", seq_len,
          "--chunks", chunks, "-t", threads, "--no-repack", "--no-ppl"])


def quantize(tools: Path, f32_gguf: Path, out: Path, mix: str, threads: int, imatrix_file: Path | None = None) -> None:
    """llama-quantize of ``f32_gguf`` to ``mix`` (a key of :data:`FTYPES`)."""
    if mix not in FTYPES:
        raise InputError(f"unknown llama.cpp mix {mix!r}; known: {', '.join(FTYPES)}")
    extra = ["--imatrix", imatrix_file] if imatrix_file is not None else []
    _run([tools / "llama-quantize", *extra, f32_gguf, out, FTYPES[mix], threads])


def linear_bits(gguf: Path) -> tuple[int, int]:
    """(stored bits, weights) of a GGUF's linear layers: the blocks' 2-D tensors and an untied head
    (``output.weight``) — the weights llmpress's bits per weight count."""
    from gguf import GGUFReader

    bits = n = 0
    for t in GGUFReader(gguf).tensors:
        if (t.name.startswith("blk.") and len(t.shape) == 2) or t.name == "output.weight":
            bits += 8 * int(t.n_bytes)
            n += int(t.n_elements)
    return bits, n
