"""The public verbs stay callable whatever has been imported before."""
import importlib
import pkgutil

import llmpress


def test_every_verb_is_callable_after_importing_every_module():
    for m in pkgutil.walk_packages(llmpress.__path__, "llmpress."):
        if m.name != "llmpress.__main__":
            importlib.import_module(m.name)
    for verb in llmpress.__all__:
        if verb != "__version__":
            assert callable(getattr(llmpress, verb)), verb
