"""llmpress: compress large language models and find how far each one can go.

The public verbs are imported lazily so that ``import llmpress`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import integrations as _integrations

__version__ = "0.1.0"

# verb -> "module:attribute"
_VERBS = {
    "load": "llmpress.loading:load",
    "pack": "llmpress.lossless.container:pack",
    "unpack": "llmpress.lossless.container:unpack",
    "verify": "llmpress.lossless.container:verify",
    "info": "llmpress.lossless.bounds:info",
    "compress": "llmpress.pipeline:compress",
    "quantize": "llmpress.quant.api:quantize",
    "factorize": "llmpress.lowrank.api:factorize",
    "evaluate": "llmpress.eval.api:evaluate",
    "evaluate_tasks": "llmpress.eval.tasks:evaluate_tasks",
    "limit": "llmpress.sweep:limit",
    "finetune": "llmpress.recovery.api:finetune",
    "export": "llmpress.targets.api:export",
    "generate": "llmpress.generation:generate",
}

__all__ = sorted(_VERBS) + ["__version__"]

# transformers' from_pretrained learns the "llmpress" method once its quantizer registry is
# imported, before or after this line (a one-shot import hook; nothing heavy is imported here)
_integrations.install()


def __getattr__(name: str) -> Any:
    if name in _VERBS:
        mod, attr = _VERBS[name].split(":")
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'llmpress' has no attribute {name!r}")
