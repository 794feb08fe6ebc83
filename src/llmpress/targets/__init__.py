"""Formats out: a registry of export targets, one module each (the package is not named
``export``: a submodule named like the verb would replace ``llmpress.export`` once imported).

A target writes a model that another engine loads: ``dense`` (a plain Hugging Face folder of
float weights), ``gguf`` (llama.cpp), ``compressed-tensors`` (transformers, vLLM). It reads the
model tensor by tensor from an :class:`~llmpress.targets.source.ExportSource` and says, for each
compressed layer, whether the codes llmpress chose transfer exactly (``why_not`` returns None) or
why not. The driver (:func:`llmpress.targets.api.export`) applies the fallback policy to the layers
that do not transfer, so a target never silently changes a layer.

Targets register themselves by name::

    @register_target("dense")
    class Dense(Target): ...
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import InputError
from ..tensor import CompressedTensor

# What a target may do with a layer whose codes do not transfer exactly.
FALLBACKS = ("refuse", "dense", "requantize")


class Target:
    """An export format. Subclasses set ``name``, ``fallbacks`` and implement the two verbs."""

    name: str = ""
    # the fallbacks this target can carry out, besides refusing
    fallbacks: tuple[str, ...] = ("dense",)
    # the result is a folder (a file for GGUF)
    output_is_dir: bool = True
    # it can fold an online rotation (``rotate mlp``, ``keep_head``) back into the weights; the others refuse such a folder
    folds_online: bool = False

    def why_not(self, ct: CompressedTensor, **opts: Any) -> str | None:
        """None when ``ct``'s codes and group parameters are stored exactly by this format,
        else the reason in a few words."""
        raise NotImplementedError

    def why_not_layer(self, src: "ExportSource", name: str, **opts: Any) -> str | None:
        """``why_not`` for the compressed parameter ``name`` of ``src``. A target that needs more
        than the CompressedTensor (the module's type, its checkpoint layout) overrides this."""
        return self.why_not(src.compressed(name), **opts)

    def write(self, src: "ExportSource", out: Path, actions: dict[str, str], **opts: Any) -> dict[str, Any]:
        """Write ``src`` into the (empty, temporary) folder ``out``. ``actions`` maps each
        compressed parameter to ``exact``, ``dense`` or ``requantize``. Returns what the report
        should add (files written, types chosen...)."""
        raise NotImplementedError

    def output_path(self, out: Path) -> Path:
        """Where the result lands, given the path the user named."""
        return out


_TARGETS: dict[str, Target] = {}
_MODULES = ("dense", "gguf", "compressed_tensors")
T = TypeVar("T", bound=type)


def register_target(name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        if name in _TARGETS:
            raise InputError(f"export target {name!r} registered twice")
        inst = cls()
        inst.name = name
        _TARGETS[name] = inst
        return cls

    return deco


def _load_targets() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a target not written yet
            if e.name != f"{__name__}.{mod}":
                raise


def get_target(name: str) -> Target:
    _load_targets()
    try:
        return _TARGETS[name]
    except KeyError:
        raise InputError(f"unknown export format {name!r}; known: {', '.join(sorted(_TARGETS))}") from None


def target_names() -> list[str]:
    _load_targets()
    return sorted(_TARGETS)


from .source import Entry, ExportSource  # noqa: E402  (re-exported for targets)

__all__ = ["FALLBACKS", "Target", "register_target", "get_target", "target_names", "Entry", "ExportSource"]
