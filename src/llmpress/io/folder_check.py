"""What a lossy folder must satisfy before any of its data is read or anything is sized from it.

A folder travels: it is copied, half written, edited by hand. ``folder.load_folder`` asks, in
this order, each step reading only what the one before vouched for:

1. :func:`check_manifest` — ``llmpress.json`` has the fields and types this llmpress writes, a
   format version it reads;
2. :func:`shard_path` — each shard it names is a plain name inside the folder (no absolute path,
   no ``..``, no link leading out);
3. the shard's sha256 (on by default) and its safetensors header (safetensors bounds the header and
   checks every tensor's offsets against the file; data stays unread);
4. :func:`check_compressed` — each compressed tensor's codec is known and its meta (shape, bits,
   group size, rank, dtype) is exactly what its stored tensors' shapes and dtypes say
   (``stored.check_stored``);
5. :func:`check_against_model` — the model the config describes has each compressed linear with
   the meta's shape, and each kept tensor has the shape the model expects.

Every refusal is a CorruptFileError (an unreadable version: an InputError) naming the file and
the tensor.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CorruptFileError, InputError
from ..stored import check_stored

MANIFEST = "llmpress.json"
FORMAT = "llmpress-folder"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# tensor name -> (shape, dtype), as a safetensors header states it
Header = dict[str, tuple[tuple[int, ...], torch.dtype]]


def check_manifest(root: Path, m: Any) -> dict[str, Any]:
    """``m`` (the parsed ``llmpress.json``) if it is a manifest this llmpress reads."""
    where = root / MANIFEST
    if not isinstance(m, dict):
        raise CorruptFileError(f"{where}: a JSON object expected, got {type(m).__name__}")
    if m.get("format") != FORMAT:
        raise InputError(f"{where}: format {m.get('format')!r}, not an llmpress folder ({FORMAT!r})")
    v = m.get("version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CorruptFileError(f"{where}: version {v!r} is not a format version")
    if v > FORMAT_VERSION:
        raise InputError(f"{where}: format version {v}; this llmpress reads versions up to {FORMAT_VERSION}")
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptFileError(f"{where}: 'files' must map each shard to its sha256")
    for f, digest in files.items():
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise CorruptFileError(f"{where}: shard {f!r}: {digest!r} is not a sha256")
    tensors = m.get("tensors")
    if not isinstance(tensors, dict):
        raise CorruptFileError(f"{where}: 'tensors' must map each compressed tensor to its codec, meta and keys")
    for param, e in tensors.items():
        if not (isinstance(param, str) and param.endswith(".weight") and isinstance(e, dict)):
            raise CorruptFileError(f"{where}: tensor {param!r}: an object for a linear's .weight expected")
        if not isinstance(e.get("codec"), str):
            raise CorruptFileError(f"{where}: tensor {param!r}: codec {e.get('codec')!r} is not a name")
        if not isinstance(e.get("meta"), dict):
            raise CorruptFileError(f"{where}: tensor {param!r}: meta must be an object")
        keys = e.get("keys")
        if not (isinstance(keys, list) and keys and all(isinstance(k, str) and k for k in keys)
                and len(set(keys)) == len(keys)):
            raise CorruptFileError(f"{where}: tensor {param!r}: keys must be a list of distinct names")
    return m


def shard_path(root: Path, name: Any) -> Path:
    """The path of shard ``name``, refused unless it is a plain name inside ``root`` (a symlink
    is followed only while it stays inside)."""
    where = root / MANIFEST
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise CorruptFileError(f"{where}: shard {name!r} is not a file name")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise CorruptFileError(f"{where}: shard {name!r} is not a name inside the folder")
    if not name.endswith(".safetensors"):
        raise CorruptFileError(f"{where}: shard {name!r} is not a .safetensors file")
    path = root / name
    real, top = path.resolve(), root.resolve()
    if not real.is_relative_to(top):
        raise CorruptFileError(f"{path}: a link to {real}, outside the folder {top}")
    return path


def check_compressed(root: Path, tensors: Mapping[str, dict[str, Any]], header: Header, where_is: Mapping[str, str]) -> None:
    """Each compressed tensor's meta agrees with its stored tensors' shapes and dtypes."""
    for param, e in tensors.items():
        keys = e["keys"]
        missing = [k for k in keys if f"{param}.{k}" not in header]
        if missing:
            raise CorruptFileError(f"{root / MANIFEST}: tensor {param!r}: {', '.join(missing)} not in the folder's shards")
        shard = where_is[f"{param}.{keys[0]}"]
        try:
            check_stored(e["codec"], e["meta"], {k: header[f"{param}.{k}"] for k in keys})
        except InputError as err:
            raise CorruptFileError(f"{root / MANIFEST}: tensor {param!r} (in {root / shard}): {err}") from None


# config fields that count modules to build (blocks, experts): building a model on the meta device
# costs Python objects per module, so a lying count is refused before anything is built
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer")  # blocks: each has stored tensors named by its index
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")  # may be stored fused (no index in names)
MAX_EXPERTS = 4096  # the largest mixtures have a few hundred
# sizes a model is built from: each a positive integer (a negative or zero one fails inside transformers,
# after it has allocated)
_DIMS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
         "n_embd", "n_head")
MAX_DIM = 1 << 24
_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def check_config_counts(root: Path, config: dict[str, Any], header: Header) -> None:
    """Each count of modules ``config.json`` asks for (layers, experts) is at most what the stored
    tensor names can index (the largest number in a name, plus one); each size it builds from is a
    positive integer."""
    most = max((int(m) for k in header for m in _INDEX.findall(k) if len(m) < 10), default=-1) + 1
    for cfg in (config, *(v for v in config.values() if isinstance(v, dict))):
        for keys, bound in ((_LAYER_COUNTS, max(most, 1)), (_EXPERT_COUNTS, max(most, MAX_EXPERTS))):
            for k in keys:
                v = cfg.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= bound):
                    raise CorruptFileError(f"{root / 'config.json'}: {k}={v!r}; the stored tensors allow at most {bound}")
        for k in _DIMS:
            v = cfg.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_DIM):
                raise CorruptFileError(f"{root / 'config.json'}: {k}={v!r} is not a size (a positive integer)")


def check_against_model(root: Path, tensors: Mapping[str, dict[str, Any]], header: Header,
                        where_is: Mapping[str, str], model: nn.Module) -> None:
    """The model ``config.json`` describes (on the meta device) has every compressed linear with
    its meta's shape and every stored tensor it takes with the shape it expects."""
    from ..skeleton import is_linear, linear_weight

    modules = dict(model.named_modules())
    for param, e in tensors.items():
        name = param.removesuffix(".weight")
        mod = modules.get(name)
        if mod is None or not is_linear(mod):
            raise CorruptFileError(f"{root / MANIFEST}: tensor {param!r}: the model has no linear layer {name!r}")
        want = list(linear_weight(mod).shape)
        if list(e["meta"]["shape"]) != want:
            raise CorruptFileError(f"{root / MANIFEST}: tensor {param!r}: meta shape {e['meta']['shape']} but the "
                                   f"model's layer is {want}")
        bias = header.get(f"{name}.bias")
        if bias is not None and list(bias[0]) != want[:1]:
            raise CorruptFileError(f"{root / where_is[name + '.bias']}: tensor {name + '.bias'!r} has shape "
                                   f"{list(bias[0])}; the layer needs {want[:1]}")
    for k, t in model.state_dict(keep_vars=True).items():
        if k not in header:
            continue
        shape, dtype = header[k]
        if tuple(shape) != tuple(t.shape) or dtype.is_floating_point != t.dtype.is_floating_point \
                or (dtype == torch.bool) != (t.dtype == torch.bool):
            raise CorruptFileError(f"{root / where_is[k]}: tensor {k!r} is {str(dtype).removeprefix('torch.')} "
                                   f"{list(shape)}; the model needs {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
