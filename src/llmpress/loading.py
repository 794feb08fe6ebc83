"""``llmpress.load``: one verb that loads whatever llmpress wrote.

Each output format registers a loader with a detector; ``load`` asks them in turn.
No if-chain over formats lives here.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # registering a loader imports nothing heavy: the lossless verbs do it without torch
    import torch

Detector = Callable[[Path], bool]
Loader = Callable[..., "torch.nn.Module"]
_LOADERS: dict[str, tuple[Detector, Loader]] = {}

# Modules that register loaders when imported.
_FORMAT_MODULES = ("llmpress.lossless.container", "llmpress.io.folder")


def register_loader(name: str, detect: Detector) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        _LOADERS[name] = (detect, fn)
        return fn

    return deco


def _import_formats() -> None:
    for mod in _FORMAT_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def is_llmpress_output(path: str | os.PathLike) -> bool:
    """Whether one of the registered formats (an llmpress output) recognises ``path``."""
    _import_formats()
    p = Path(path)
    return p.exists() and any(detect(p) for detect, _ in _LOADERS.values())


def load(path: str | os.PathLike, **kwargs: Any) -> torch.nn.Module:
    """Load an llmpress output (packed container, quantized or factorized folder), or any
    model source (see :func:`llmpress.models.resolve`), as a transformers model."""
    _import_formats()
    p = Path(path)
    for name, (detect, fn) in _LOADERS.items():
        if p.exists() and detect(p):
            return fn(p, **kwargs)
    from .models import load_model

    return load_model(path, **kwargs)
