"""The one error family of llmpress: what the library raises when it refuses something.

Every refusal is an :class:`LlmpressError`; its subclass says what kind (and so the CLI's exit
code). Each also keeps the builtin base callers caught before this family existed
(``ValueError``, ``FileExistsError``, ...), so ``except ValueError`` still works.

Messages name the file and, where there is one, the tensor or chunk; they never name a
command-line flag (the CLI adds its own wording, see ``cli/app.py``)::

    LlmpressError                      exit 1
    ├── InputError (ValueError)        exit 2  bad input: an argument, a text, a recipe
    │   ├── CorruptFileError           exit 2  a file that fails its own checks (truncated, lying)
    │   ├── UnsupportedModelError      exit 2  a model llmpress cannot handle
    │   ├── UnsupportedFormatError     exit 2  a file format version this llmpress does not read
    │   └── NotFoundError (KeyError)   exit 2  a name (tensor, task, method) that is not there
    ├── MissingInputError (FileNotFoundError)  exit 2
    ├── OutputExistsError (FileExistsError)    exit 2
    ├── ResourceLimitError (RuntimeError)      exit 1  memory, disk, time, a tool or package missing
    └── DivergedError (FloatingPointError)     exit 1  a computation went non-finite
"""
from __future__ import annotations


class LlmpressError(Exception):
    """Anything llmpress refuses or cannot do, with a message meant for the user."""

    exit_code = 1


class InputError(LlmpressError, ValueError):
    """Bad input: an argument value, a text, a recipe, a file the user gave."""

    exit_code = 2


class CorruptFileError(InputError):
    """A file that is truncated, corrupted, or whose metadata disagrees with its data."""


class UnsupportedModelError(InputError):
    """A model (architecture, layer type, dtype) that llmpress cannot handle."""


class UnsupportedFormatError(InputError):
    """A file in a format version this llmpress does not read (retired, or newer than it)."""


class BaseModelError(InputError):
    """A file coded against a base model (a fine-tune's delta) given no base, or the wrong one."""


class NotFoundError(InputError, KeyError):
    """A name that is not there (a tensor, a task, a registered method)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class MissingInputError(LlmpressError, FileNotFoundError):
    """An input path that does not exist."""

    exit_code = 2


class OutputExistsError(LlmpressError, FileExistsError):
    """The output exists and overwriting it was not asked for."""

    exit_code = 2


class ResourceLimitError(LlmpressError, RuntimeError):
    """Out of a resource: memory, disk, time, or a tool/package this step needs."""


class DivergedError(LlmpressError, FloatingPointError):
    """A computation (training, a factorization) became non-finite."""
