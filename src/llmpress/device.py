"""Where computation runs: ``--device cpu|cuda|auto`` (and ``device=`` on the Python verbs).

One place resolves the name, before any work, so that asking for CUDA on a machine without it
fails at once with an error that names what was asked. The runners then move one block (and the
calibration activations) at a time to the device and bring results back to the CPU for writing;
methods compute on the tensors they are given, where they are (``on_cpu`` tells a method whether
its compiled CPU kernels apply).
"""
from __future__ import annotations

import os

import torch

from .errors import InputError

# LLMPRESS_TORCH_PATHS=1: take the torch paths (those CUDA runs) on the CPU too, instead of the
# compiled numba kernels (GPTQ's column loop, the clipping search's error pass, fused QAT): how the
# CUDA code paths are exercised, and compared with the kernels, on a machine without a GPU.
TORCH_PATHS_ENV = "LLMPRESS_TORCH_PATHS"


class DeviceError(InputError):
    """A device that was asked for and cannot be used."""


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _resolve_cpu(name: str) -> torch.device:
    return torch.device("cpu")


def _resolve_cuda(name: str) -> torch.device:
    if not _cuda_available():
        raise DeviceError(
            f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA device "
            f"(torch.cuda.is_available() is False; this torch {'has' if torch.version.cuda else 'has no'} CUDA support); "
            "use device cpu or auto"
        )
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are present")
    return dev


def _resolve_auto(name: str) -> torch.device:
    return torch.device("cuda") if _cuda_available() else torch.device("cpu")


# the kind of device (the name before any ":index") -> how to resolve it: a table, no if-chain
_RESOLVERS = {"cpu": _resolve_cpu, "cuda": _resolve_cuda, "auto": _resolve_auto}


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (cuda if available, else cpu) → a torch.device.
    None means cpu. Raises :class:`DeviceError` naming the device when it cannot be used."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        name = str(name)
    key = str(name).strip().lower()
    kind, _, index = key.partition(":")
    resolver = _RESOLVERS.get(kind)
    if resolver is None or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"unknown device {name!r}; choose one of: cpu, cuda, cuda:N, auto")
    return resolver(key)


def host_kernels(t: torch.Tensor | torch.device) -> bool:
    """Whether the compiled (numba) kernels may run on ``t``: it lives in host memory and the
    torch paths are not forced (``LLMPRESS_TORCH_PATHS=1``)."""
    dev = t if isinstance(t, torch.device) else t.device
    return dev.type == "cpu" and os.environ.get(TORCH_PATHS_ENV, "") in ("", "0")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without any, or one still on meta)."""
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None and not t.is_meta else torch.device("cpu")


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor of a dict in host memory (for writing)."""
    return {k: v.cpu() for k, v in tensors.items()}
