"""The lossy output folder: what quantize, factorize and compress write, and its loader.

Layout (a folder a Hugging Face user recognises)::

    config.json                  the source config + quantization_config {"quant_method": "llmpress",
                                 "modules": {linear: {codec, meta, keys}}, ...} (what transformers'
                                 from_pretrained needs, see llmpress.integrations.transformers)
    tokenizer*, generation_config.json, ...   copied verbatim from the source
    model.safetensors            (or model-0000i-of-0000n.safetensors + index) holding, for each
                                 compressed parameter P, its CompressedTensor's tensors as "P.<key>",
                                 and every other tensor as it was
    llmpress.json                recipe, codec + meta per compressed tensor, bpw, bytes, sha256 of shards

No pickle anywhere; shards are verified against their sha256 on load, and nothing in the
folder is trusted before ``folder_check`` has vouched for it (names, header, meta, shapes).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CorruptFileError, InputError, LlmpressError, MissingInputError, NotFoundError
from ..loading import register_loader
from ..tensor import CompressedTensor, get_codec
from .checksum import sha256_file
from .folder_check import (FORMAT, FORMAT_VERSION, MANIFEST, Header, check_against_model, check_compressed,
                           check_config_counts, check_manifest, shard_path)

log = logging.getLogger(__name__)

# torch dtype -> safetensors dtype name
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_SKIP = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".llmp")


def _copy_bytes(fi: Any, fo: Any, n: int, chunk: int = 16 << 20) -> None:
    """Copy ``n`` bytes from ``fi``'s position to ``fo``."""
    while n > 0:
        b = fi.read(min(n, chunk))
        if not b:
            raise CorruptFileError(f"{fi.name}: ended {n} bytes early")
        fo.write(b)
        n -= len(b)


class FolderWriter:
    """Writes tensors into safetensors shards as they come. Each tensor's bytes go at once to the
    open shard's data file and only its header entry is kept, so memory stays near one tensor
    whatever the shard size; a full shard is assembled as header + data in name order (one copy
    on disk), so its bytes do not depend on the order the tensors came in."""

    def __init__(self, root: Path, shard_bytes: int = 2 << 30):
        self.root = root
        self.shard_bytes = shard_bytes
        self._entries: dict[str, dict[str, Any]] = {}  # the open shard's header entries
        self._data = None  # its data file, opened at the first tensor
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.compressed: dict[str, dict[str, Any]] = {}

    def add_compressed(self, param: str, ct: CompressedTensor) -> None:
        if not param.endswith(".weight"):
            raise InputError(f"{param}: only a linear's .weight is stored compressed")
        tensors, _ = ct.to_state(param)
        for k, t in tensors.items():
            self._add(k, t)
        self.compressed[param] = {"codec": ct.codec, "meta": ct.meta, "keys": sorted(ct.data)}

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self._add(name, t)

    def _add(self, name: str, t: torch.Tensor) -> None:
        if name in self._entries or any(name in keys for _, keys in self._shards):
            raise InputError(f"tensor {name!r} written twice")
        t = t.detach().contiguous().cpu()
        if self._data is None:
            self._data = open(self.root / f".shard-{len(self._shards):05d}.data", "wb")
        n = t.numel() * t.element_size()
        self._entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._buf_bytes, self._buf_bytes + n]}
        if n:
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.dtype != torch.bool
                             else t.numpy().tobytes())
        self._buf_bytes += n
        if self._buf_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._data is None:
            return
        data_path = Path(self._data.name)
        self._data.close()
        name = f"shard-{len(self._shards):05d}.safetensors"
        # laid out in name order, whatever order the tensors came in: the same tensors give the same file
        layout, at = {}, 0
        for k in sorted(self._entries):
            e = self._entries[k]
            n = e["data_offsets"][1] - e["data_offsets"][0]
            layout[k] = {**e, "data_offsets": [at, at + n]}
            at += n
        header = json.dumps({"__metadata__": {"format": "pt"}, **layout}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.root / name, "wb") as fo, open(data_path, "rb") as fi:
            fo.write(struct.pack("<Q", len(header)) + header)
            for k in layout:
                start, end = self._entries[k]["data_offsets"]
                fi.seek(start)
                _copy_bytes(fi, fo, end - start)
        data_path.unlink()
        self._shards.append((name, list(self._entries)))
        self._entries, self._data, self._buf_bytes = {}, None, 0

    def finish_shards(self) -> list[str]:
        """Flush, give the shards their Hugging Face names, write the index when there are
        several; return the file names."""
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        files: list[str] = []
        for i, (tmp_name, keys) in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.root / tmp_name, self.root / final)
            files.append(final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            (self.root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        self._shards = []
        return files

    def finish(self, source_folder: Path | None, config: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, Any]:
        """Name the shards, write the index, config and manifest; copy tokenizer files."""
        files = self.finish_shards()
        if source_folder is not None:
            copy_side_files(source_folder, self.root)
        if config is not None:
            from ..quant.rotate import is_online

            cfg = dict(config)
            cfg["quantization_config"] = {
                "quant_method": "llmpress",
                "format_version": FORMAT_VERSION,
                "recipe": manifest.get("recipe"),
                "bpw": manifest.get("bpw"),
                # what a loader must know before the weights come: each compressed linear's codec,
                # meta and stored keys (its tensors are "<module>.weight.<key>")
                "modules": {param.removesuffix(".weight"): entry for param, entry in self.compressed.items()},
                # an online rotation (quant/rotate.py) the weights were made for: loaders apply it
                **({"rotation": manifest["rotation"]} if is_online(manifest.get("rotation")) else {}),
            }
            (self.root / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **manifest,
            "tensors": self.compressed,
            "files": {f: sha256_file(self.root / f) for f in files},
            "bytes_out": sum((self.root / f).stat().st_size for f in files),
        }
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return manifest


def copy_side_files(source_folder: Path, root: Path) -> list[str]:
    """Copy what travels with a model besides its weights and config (tokenizer files, chat
    template, generation config) from ``source_folder`` into ``root``; return their names."""
    copied = []
    for p in sorted(source_folder.rglob("*")):
        rel = p.relative_to(source_folder)
        if p.is_file() and not p.name.endswith(_SKIP) and rel.as_posix() not in ("config.json", MANIFEST) and not rel.parts[0].startswith("."):
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
            copied.append(rel.as_posix())
    return copied


def is_folder(p: Path) -> bool:
    """A folder with an ``llmpress.json``: ours, even when damaged (its loader then names the
    damage; read as a plain checkpoint, its compressed layers would load as random weights)."""
    return p.is_dir() and (p / MANIFEST).is_file()


def read_manifest(p: Path) -> dict[str, Any]:
    """The folder's ``llmpress.json``, refused unless its fields and version are ones this llmpress
    writes (``folder_check.check_manifest``)."""
    try:
        m = json.loads((Path(p) / MANIFEST).read_text())
    except FileNotFoundError:
        raise MissingInputError(f"{Path(p) / MANIFEST}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{Path(p) / MANIFEST}: unreadable ({e})") from None
    return check_manifest(Path(p), m)


class _Shards:
    """Lazy tensor access across a folder's verified shards: each shard's name is checked, its
    sha256 verified (``verify``), its header read (``header``: shapes and dtypes, no data); with
    ``tensors`` (the manifest's), each compressed tensor's meta is checked against the header."""

    def __init__(self, root: Path, files: dict[str, str], verify: bool,
                 tensors: dict[str, dict[str, Any]] | None = None):
        self.handles = {}
        self.where: dict[str, str] = {}
        self.header: Header = {}
        for f, digest in files.items():
            path = shard_path(root, f)
            if not path.is_file():
                raise MissingInputError(f"{path}: missing shard")
            if verify and sha256_file(path) != digest:
                raise CorruptFileError(f"{path}: checksum mismatch (the file is corrupted or was changed)")
            try:
                h = safe_open(str(path), framework="pt")
                header = {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}
            except (SafetensorError, OSError, ValueError) as e:  # safetensors bounds and checks the header
                raise CorruptFileError(f"{path}: not a readable safetensors file ({e})") from None
            for k, (shape, dt) in header.items():
                if k in self.where:
                    raise CorruptFileError(f"{path}: tensor {k!r} is also in {root / self.where[k]}")
                if dt not in _TORCH_DTYPES:
                    raise CorruptFileError(f"{path}: tensor {k!r} has dtype {dt}, which no llmpress folder holds")
                self.header[k] = (shape, _TORCH_DTYPES[dt])
                self.where[k] = f
            self.handles[f] = h
        if tensors is not None:
            check_compressed(root, tensors, self.header, self.where)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except KeyError:
            raise NotFoundError(f"tensor {key!r} is not in the folder's shards") from None


def dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = w.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def compressed_module(ct: CompressedTensor, bias: torch.Tensor | None) -> nn.Module:
    """The inference module of one compressed linear: the codec's own (stays compressed in memory)."""
    return get_codec(ct.codec).module(ct, bias)


def module_state_names(ct: CompressedTensor) -> tuple[dict[str, str], str]:
    """Where ``compressed_module(ct, bias)`` keeps each stored tensor: ({data key: state-dict name
    inside the module}, the bias's name). A loader that fills modules by name (transformers'
    ``from_pretrained``) and a writer that reads them back (``save_pretrained``) both need it."""
    return get_codec(ct.codec).state_names(ct)


@register_loader("llmpress-folder", is_folder)
def load_folder(path: str | Path, verify: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the transformers model of an llmpress folder, compressed linears replaced by
    their inference modules."""
    from ..skeleton import build_meta, folder_config, materialize_nonpersistent, set_module, tie

    from ..quant.rotate import install_online, online_of, stream_of

    root = Path(path)
    man = read_manifest(root)
    try:
        online = online_of(man.get("rotation"))  # an online rotation the weights were made for
        stream = stream_of(man.get("rotation"))
    except InputError as e:
        raise CorruptFileError(f"{root / MANIFEST}: {e}") from None
    shards = _Shards(root, man["files"], verify, man["tensors"])
    try:
        raw_cfg = json.loads((root / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptFileError(f"{root / 'config.json'}: unreadable ({e})") from None
    if not isinstance(raw_cfg, dict):
        raise CorruptFileError(f"{root / 'config.json'}: a JSON object expected")
    check_config_counts(root, raw_cfg, shards.header)
    try:
        cfg = folder_config(root)
        check_config_counts(root, cfg.to_dict(), shards.header)  # with transformers' defaults for what is absent
        model = build_meta(cfg, nonpersistent=False)  # on meta: nothing allocated from the config yet
    except LlmpressError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers parsing our config.json: any refusal of its is ours to name
        raise CorruptFileError(f"{root / 'config.json'}: no model can be built from it ({type(e).__name__}: {e})") from None
    check_against_model(root, man["tensors"], shards.header, shards.where, model)
    try:  # the config now agrees with every stored tensor: its other buffers may be computed
        materialize_nonpersistent(model, cfg)
    except LlmpressError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorruptFileError(f"{root / 'config.json'}: its buffers cannot be built ({type(e).__name__}: {e})") from None
    for param, entry in man["tensors"].items():
        mod_name = param.rsplit(".", 1)[0]
        data = {k: shards.get(f"{param}.{k}") for k in entry["keys"]}
        ct = CompressedTensor(codec=entry["codec"], data=data, meta=entry["meta"])
        bias_key = f"{mod_name}.bias"
        bias = shards.get(bias_key).to(dtype) if bias_key in shards.where else None
        set_module(model, mod_name, compressed_module(ct, bias))
    sd = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if t.is_meta and k in shards.where:
            v = shards.get(k)
            sd[k] = v.to(dtype) if v.is_floating_point() else v
    model.load_state_dict(sd, assign=True, strict=False)
    tie(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CorruptFileError(f"{root}: tensors missing from the folder: {', '.join(left[:5])}")
    try:
        install_online(model, online, stream)
    except InputError as e:
        raise CorruptFileError(f"{root / MANIFEST}: {e}") from None
    return model.eval()
