"""The cost side of a model: bits per weight, bytes on disk, peak RAM while running, identity.

Bits per weight count everything stored: for an llmpress folder they come from its
``llmpress.json`` (codes, scales, zeros, factors and meta of every linear weight, written by
the pipeline); for a plain model they follow from the dtypes of its linear weights.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import psutil
import torch

MANIFEST = "llmpress.json"


class RSSMeter:
    """Peak resident set size of this process while the ``with`` block runs (sampled every 20 ms,
    plus the start and end), in bytes. ``ru_maxrss`` can't be reset, so it would report the peak
    of everything that ran before."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak = every_s, 0
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def _sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> "RSSMeter":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def manifest(path: str | Path | None) -> dict | None:
    """The ``llmpress.json`` of an llmpress output folder, or None for anything else."""
    if path is None:
        return None
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def disk_bytes(path: str | Path) -> int:
    """Bytes of the weights on disk: a file's size, or a folder's ``*.safetensors`` files."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in sorted(p.glob("*.safetensors")))


def _linears(model: torch.nn.Module):
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"):
            yield m


def linear_bpw(model: torch.nn.Module) -> float:
    """Bits per weight of a plain model's linear weights (from their dtypes; tied heads counted once)."""
    seen, bits, n = set(), 0, 0
    for m in _linears(model):
        if id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        bits += m.weight.numel() * m.weight.element_size() * 8
        n += m.weight.numel()
    return bits / n if n else float("nan")


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of a loaded model's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def fingerprint_path(path: str | Path) -> str:
    """Identity of the weights in a model folder or file: names, sizes and mtimes of its files."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json", ".gguf", ".llmp"))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint_module(model: torch.nn.Module) -> str:
    """Identity of a loaded model: the bytes of every parameter and buffer."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().contiguous().cpu()
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cost_of(model: torch.nn.Module, path: str | Path | None) -> dict:
    """``bpw`` and ``bytes`` of a model, from its llmpress manifest when there is one."""
    m = manifest(path)
    if m is not None and m.get("bpw") is not None:
        return {"bpw": float(m["bpw"]), "bytes": int(m.get("bytes_out") or disk_bytes(path)), "bytes_in": m.get("bytes_in")}
    src_bytes = disk_bytes(path) if path is not None and Path(path).exists() else state_bytes(model)
    return {"bpw": linear_bpw(model), "bytes": src_bytes, "bytes_in": None}
