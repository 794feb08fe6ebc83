"""Engines in: one module per engine llmpress plugs into (``transformers.py``: the quantization
method behind ``from_pretrained``; ``lm_eval.py``: lm-evaluation-harness tasks on any model
llmpress loads). A module here is imported only by the code that needs its engine.

Plugins are registered when the engine is imported, never before.

``import llmpress`` must stay cheap (the CLI starts with it) and must not import torch or
transformers, yet ``AutoModelForCausalLM.from_pretrained(folder)`` should work on an llmpress
folder in a program that imported llmpress, whichever of the two it imported first. transformers
has no plugin entry points for quantization methods; a method is registered by calling
``register_quantizer`` at run time. So :func:`install` (run by ``import llmpress``) does one of:

- the engine's registry module is already imported: import our plugin now (the engine already
  paid for torch, so this costs only our own module);
- otherwise: put a one-shot finder at the front of ``sys.meta_path`` that watches for that one
  module name (``transformers.quantizers.auto``, where transformers keeps its quantizer registry
  and which every ``from_pretrained`` imports). When Python imports it, the finder lets the
  normal finders locate it, and once the module has run, imports our plugin, then removes itself.
  Nothing of transformers is replaced or patched; the module is loaded by its own loader and
  keeps it (``__loader__``/``__spec__.loader``).

This is the post-import hook pattern (PEP 369's idea, as ``wrapt`` implements it), in a few lines
of our own. Watching the registry module rather than ``transformers`` itself keeps the cost where
it belongs: ``import transformers`` alone does not import torch, and neither do we until a model
is about to be loaded. A plugin that fails to import is logged, not raised: the user's import of
the engine must not fail because of us (``from_pretrained`` then reports the unknown method).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

# engine module that holds the registry -> our module that registers with it when imported
PLUGINS = {"transformers.quantizers.auto": "llmpress.integrations.transformers"}


def install() -> None:
    """Register every plugin whose engine is imported, and arrange the others for later."""
    for trigger, plugin in PLUGINS.items():
        if trigger in sys.modules:
            _load_plugin(plugin)
        elif not any(isinstance(f, _AfterImport) and f.trigger == trigger for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(trigger, plugin))


def _load_plugin(plugin: str) -> None:
    try:
        importlib.import_module(plugin)
    except Exception:  # noqa: BLE001 - the engine's own import must go on
        import logging

        logging.getLogger(__name__).warning("llmpress: could not register %s", plugin, exc_info=True)


class _AfterImport:
    """A meta-path finder for one module name: finds it with the other finders and wraps its
    loader so that ``plugin`` is imported right after the module has executed. One shot."""

    def __init__(self, trigger: str, plugin: str):
        self.trigger = trigger
        self.plugin = plugin

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.trigger:
            return None
        import importlib.util

        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; also keeps the search below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            sys.meta_path.insert(0, self)
            return None
        spec.loader = _ThenImport(spec.loader, self)
        return spec


class _ThenImport:
    """The module's own loader, then the plugin."""

    def __init__(self, loader: Any, finder: _AfterImport):
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # the module keeps its real loader: nothing of ours stays behind in it
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        try:
            self.loader.exec_module(module)
        except BaseException:
            sys.meta_path.insert(0, self.finder)  # not imported after all: watch for the next try
            raise
        _load_plugin(self.finder.plugin)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        if name in ("loader", "finder"):
            raise AttributeError(name)
        return getattr(self.loader, name)
