"""What an export reads: a model, one checkpoint tensor at a time.

The model is an llmpress lossy folder (its compressed linears as CompressedTensors, every other
tensor as stored; shards verified against their sha256), an original Hugging Face model (any
MODEL llmpress resolves: folder, hub id, GGUF, embedded name; every tensor kept), or a lossless
``.llmp`` container (unpacked into a temporary folder first: it *is* the original).
Nothing is loaded whole: an entry's tensor is read or decoded when a target asks for it.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..errors import InputError, MissingInputError, NotFoundError
from ..io.atomic import scratch_dir
from ..tensor import CompressedTensor, decode

log = logging.getLogger(__name__)


class _Stored(Mapping):
    """A compressed tensor's stored tensors, each read from the shards when first asked for: the
    export's planning pass looks at keys and small parameters, and must not read every layer's
    codes only for the write to read them again."""

    def __init__(self, name: str, keys: list[str], get: Callable[[str], Tensor]):
        self._name, self._keys, self._get = name, list(keys), get
        self._read: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._read:
            self._read[key] = self._get(f"{self._name}.{key}")
        return self._read[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class Entry:
    """One tensor of the checkpoint, by its Hugging Face name (``model.layers.0.mlp.up_proj.weight``)."""

    name: str
    ct: CompressedTensor | None  # the compressed form, or None for a tensor kept as it was
    transposed: bool  # the checkpoint stores this weight as (in, out) (GPT-2's Conv1D)
    _read: Callable[[], Tensor] = field(repr=False)

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    def decoded(self) -> Tensor:
        """A compressed linear's weight as llmpress decodes it: (out, in) float32."""
        if self.ct is None:
            raise InputError(f"{self.name} is not compressed")
        return decode(self.ct)

    def out_in(self) -> Tensor:
        """The tensor with a linear's weight as (out, in): compressed linears decoded, kept tensors
        as stored, a Conv1D's (in, out) weight transposed back."""
        if self.ct is not None:
            return self.decoded()
        t = self._read()
        return t.T if self.transposed and t.dim() == 2 else t

    def tensor(self) -> Tensor:
        """The tensor as the checkpoint holds it: kept tensors as stored, compressed linears
        decoded (float32) in the checkpoint's own layout."""
        if self.ct is None:
            return self._read()
        w = self.decoded()
        return w.T.contiguous() if self.transposed else w


class ExportSource:
    """A model opened for export. Use as a context manager (a ``.llmp`` input unpacks into a
    temporary folder that is removed on exit)."""

    def __init__(self, model: str | Path, verify: bool = True):
        self.model = str(model)
        self.verify = verify
        self._tmp: Path | None = None
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ opening
    def __enter__(self) -> "ExportSource":
        from ..io.folder import is_folder

        p = Path(self.model).expanduser()
        if p.is_file() and p.suffix == ".llmp":
            self._tmp = self._stack.enter_context(scratch_dir(None, "llmpress-export"))
            from ..lossless.container import unpack

            log.info("unpacking %s into %s", p, self._tmp)
            unpack(p, self._tmp / "model", force=True)
            self._open_original(self._tmp / "model")
        elif is_folder(p):
            self._open_folder(p)
        else:
            self._open_original(self.model)
        self.module_types, self.online, self.stream, self.unrotate = self._module_types()
        self._conv1d = {n for n, t in self.module_types.items() if t == "Conv1D"}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _open_folder(self, root: Path) -> None:
        from ..io.folder import _Shards, read_manifest

        self.kind = "llmpress-folder"
        self.root = root
        self.manifest: dict[str, Any] | None = read_manifest(root)
        self._shards = _Shards(root, self.manifest["files"], self.verify, self.manifest["tensors"])
        self.config = json.loads((root / "config.json").read_text())
        self.config.pop("quantization_config", None)
        self._compressed = self.manifest["tensors"]
        owned = {f"{p}.{k}" for p, e in self._compressed.items() for k in e["keys"]}
        self._kept = {k: None for k in self._shards.where if k not in owned}  # an ordered set
        self._get = self._shards.get

    def _open_original(self, model: str | Path) -> None:
        from ..models import TensorStore, resolve

        src = resolve(model)
        if src.path.is_file():
            raise InputError(f"{src.path}: a bare .safetensors file has no config; give its folder")
        self.kind = "original"
        self.root = src.folder
        self.manifest = None
        cfg = src.folder / "config.json"
        if not cfg.exists():
            raise MissingInputError(f"{src.folder}: no config.json")
        self.config = json.loads(cfg.read_text())
        store = TensorStore(src)
        self._compressed = {}
        self._kept = dict.fromkeys(store.keys())
        self._get = store.get

    def _module_types(self) -> tuple[dict[str, str], dict[str, Any], Any, dict[str, Any]]:
        """Each module's class name, by module name, from the model built on the meta device
        (GPT-2's ``Conv1D`` stores its weight as (in, out); a target may store only ``Linear``),
        and {module: the ``Orthogonal`` its input is rotated by online} of a folder made with
        ``rotate mlp`` (``quant/rotate.py``; empty otherwise), the ``Stream`` of one made with
        ``keep_head`` (else None), and {state key: the steps folding them back} (``unrotation``)."""
        from ..quant.rotate import online_modules, online_of, stream_of, unrotation
        from ..skeleton import build_meta, folder_config

        skel = build_meta(folder_config(self.root))
        rec = None if self.manifest is None else self.manifest.get("rotation")
        try:
            blocks, stream = online_of(rec), stream_of(rec)
            online, unrotate = online_modules(skel, blocks), unrotation(skel, blocks, stream)
        except InputError as e:
            raise InputError(f"{self.root}: {e}") from None
        return {n: type(m).__name__ for n, m in skel.named_modules() if n}, online, stream, unrotate

    # ------------------------------------------------------------------ reading
    @property
    def compressed_names(self) -> list[str]:
        return list(self._compressed)

    def compressed(self, name: str) -> CompressedTensor:
        """The compressed form of ``name``; its tensors are read from the shards when used."""
        e = self._compressed[name]
        return CompressedTensor(codec=e["codec"], data=_Stored(name, e["keys"], self._get), meta=dict(e["meta"]))

    def entries(self) -> Iterator[Entry]:
        """Every checkpoint tensor: kept ones in stored order, then the compressed linears."""
        for name in self.names():
            yield self.get(name)

    def get(self, name: str) -> Entry:
        """One entry by its checkpoint name."""
        mod = name.rpartition(".")[0]
        if name in self._compressed:
            return Entry(name, self.compressed(name), mod in self._conv1d, (lambda: torch.empty(0)))
        if name in self._kept:
            return Entry(name, None, mod in self._conv1d, (lambda: self._get(name)))
        raise NotFoundError(f"{self.model}: no tensor {name!r}")

    def names(self) -> list[str]:
        return list(self._kept) + list(self._compressed)
