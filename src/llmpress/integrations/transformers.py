"""The ``llmpress`` quantization method of transformers: ``from_pretrained`` on an llmpress folder.

Registered with transformers' quantizer registry when that registry is imported in a program that
imported llmpress (see :mod:`llmpress.integrations` for how). Then
``AutoModelForCausalLM.from_pretrained(folder)`` returns the compressed model itself: every
compressed linear is the module ``llmpress.load`` builds (QuantLinear, LowRankLinear, ...), its
tensors stay packed in memory; ``save_pretrained`` writes the same layout back, and
``model.dequantize()`` turns the model into a dense one.

**What a folder says.** ``quantization_config.modules`` in ``config.json`` lists each compressed
linear's codec, meta and stored keys (a folder written before that field existed carries the same
in ``llmpress.json``). Its tensors are stored as ``<linear>.weight.<key>`` and ``<linear>.bias``;
their shapes and dtypes are read from the shards' headers, so the config never repeats them.

**Loading by name.** transformers fills a model by matching checkpoint names against its state
dict. The inference modules keep the stored tensors under their own names (``qweight``,
``up.weight``, ``base.scale``), which only the codec knows (``codec.state_names``). So before the
weights load, each compressed linear is replaced by a :class:`StoredLinear`, a placeholder whose
buffers carry the stored names, shapes and dtypes; transformers fills it like any module and
casts nothing but the bias (to the dtype the model gives that linear). After loading, each
placeholder becomes ``codec.module(ct, bias)`` of the loaded tensors: the constructor
``llmpress.load`` uses, so both give the same modules and the same logits, and whatever a module
derives from its tensors (a group index, a kernel's layout) is built from real tensors rather than
left as the uninitialised memory transformers gives a non-persistent buffer. Saving inverts the
names with the same ``state_names``.

Renaming checkpoint keys with transformers' ``WeightRenaming`` would also load by name, but needs
one regex per stored tensor, matched against every key (quadratic in the number of tensors), and
the modules would have to be built on the meta device before loading, which a module that packs
its tensors for a kernel at construction cannot promise.

Refused with a clear error: a layout that does not match the shards or the model (a key missing
or extra, a codec that stores other keys, a shape that is not the model's), on-the-fly
quantization (``from_pretrained(dense, quantization_config=LlmpressConfig())``: use
``llmpress quantize``), and a device map that spreads the model over several devices.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import InputError
from ..io.folder import FORMAT_VERSION, compressed_module, dense_linear, module_state_names, read_manifest
from ..moe import unfuse
from ..quant.rotate import apply_steps, install_online, online_of, stream_of, unrotation
from ..skeleton import is_linear, set_module
from ..tensor import CompressedTensor, get_codec

log = logging.getLogger(__name__)

METHOD = "llmpress"
# safetensors' dtype names
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}


@register_quantization_config(METHOD)
class LlmpressConfig(QuantizationConfigMixin):
    """``quantization_config`` of an llmpress folder::

        {"quant_method": "llmpress", "format_version": 1, "bpw": 4.52,
         "recipe": {"rules": [{"match": "lm_head|embed", "method": "keep"},
                              {"match": ".*", "method": "rtn", "bits": 4, "group_size": 64}]},
         "modules": {"model.layers.0.mlp.up_proj": {"codec": "rtn", "keys": ["offset", "qweight", "scale"],
                                                    "meta": {"bits": 4, "group_size": 64, "grid": "asym", ...}}}}

    ``modules`` is what loading needs (None: read it from the folder's ``llmpress.json``); the
    rest is a record. Fields a newer llmpress adds are kept and written back as they were.
    """

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 recipe: dict[str, Any] | None = None, bpw: float | None = None, quant_method: str = METHOD,
                 **kwargs: Any):
        if quant_method != METHOD:
            raise InputError(f"LlmpressConfig is for quant_method {METHOD!r}, not {quant_method!r}")
        if int(format_version) > FORMAT_VERSION:
            raise InputError(f"this llmpress folder has format version {format_version}; this llmpress reads up to "
                             f"{FORMAT_VERSION}: upgrade llmpress")
        self.quant_method = METHOD
        self.format_version = int(format_version)
        self.recipe = recipe
        self.bpw = bpw
        self.modules = modules
        for k, v in kwargs.items():
            setattr(self, k, v)


class StoredLinear(nn.Module):
    """A compressed linear's stored tensors under their folder names (``weight.<key>``, ``bias``),
    as meta buffers for transformers to fill; replaced by the codec's module once loaded."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:  # nested keys ("weight.U.qweight") become submodules
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            owner.register_buffer(leaf, t)

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("a StoredLinear is a loading placeholder; from_pretrained replaces it once loaded")


@dataclass
class Layout:
    """One compressed linear: its codec and meta, and where its module keeps each stored tensor."""

    codec: str
    meta: dict[str, Any]
    names: dict[str, str]  # stored key -> state-dict name inside the module
    bias: str  # the bias's state-dict name inside the module


@register_quantizer(METHOD)
class LlmpressQuantizer(HfQuantizer):
    """Loads an llmpress folder into its compressed modules (see the module docstring)."""

    requires_calibration = True  # only pre-quantized folders: quantizing is llmpress's own verb

    def __init__(self, quantization_config: LlmpressConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.layouts: dict[str, Layout] = {}
        self.root: Path | None = None
        self.unrotate: dict[str, Any] = {}      # state key -> the steps folding an online rotation back
        self.online_hooks: dict[str, Any] = {}  # module -> its online rotation's hook handle

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        files = [Path(f) for f in checkpoint_files or ()]
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise InputError(f"llmpress: from_pretrained reads an llmpress folder's safetensors shards; got "
                             f"{', '.join(map(str, files)) or 'no files'}")
        self.root = root = files[0].parent
        entries = self.quantization_config.modules
        if entries is None:  # written before the layout went into config.json: llmpress.json has it
            try:
                manifest = read_manifest(root)
            except ValueError as e:
                raise InputError(f"quantization_config has no modules, and {e}") from None
            entries = {p.removesuffix(".weight"): e for p, e in manifest["tensors"].items()}
        if not isinstance(entries, dict):
            raise InputError(f"{root}: quantization_config.modules must map linear names to their layout")
        header = _read_headers(files)
        stored = _stored_by_module(header)
        orphans = sorted(set(stored) - set(entries))
        if orphans:
            raise InputError(f"{root}: the shards hold compressed tensors of {', '.join(orphans[:5])}, which "
                             f"quantization_config.modules does not list")
        unfuse(model)  # an MoE's experts as the folder stores them: one linear per expert matrix
        self.layouts = {}
        for name, entry in entries.items():
            old = _linear(root, model, name, entry)
            lay, tensors = _layout(root, name, entry, header, stored.get(name, ()))
            if f"{name}.bias" in header:
                shape, _ = header[f"{name}.bias"]
                tensors["bias"] = torch.empty(shape, dtype=old.weight.dtype, device="meta")
            set_module(model, name, StoredLinear(tensors))
            self.layouts[name] = lay
        self.quantization_config.modules = entries  # save_pretrained writes it, whatever it came from
        log.info("%s: %d compressed linears to load", root, len(self.layouts))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        devices = set((getattr(model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            raise InputError(f"{self.root}: llmpress modules are built after loading, which accelerate's dispatch over "
                             f"{sorted(map(str, devices))} does not follow; load the model on one device")
        for name, lay in self.layouts.items():
            holder = model.get_submodule(name)
            sd = holder.state_dict()
            data = {k: sd[f"weight.{k}"] for k in lay.names}
            ct = CompressedTensor(codec=lay.codec, data=data, meta=lay.meta)
            try:
                module = compressed_module(ct, sd.get("bias"))
            except Exception as e:
                raise InputError(f"{self.root}: {name}: the stored tensors do not make a {lay.codec} module "
                                 f"({e})") from e
            set_module(model, name, module.to(next(iter(data.values())).device))
        try:  # an online rotation the weights were made for (quant/rotate.py): hooks on its modules
            rec = getattr(self.quantization_config, "rotation", None)
            blocks, stream = online_of(rec), stream_of(rec)
            self.unrotate = unrotation(model, blocks, stream)
            self.online_hooks = install_online(model, blocks, stream)
        except InputError as e:
            raise InputError(f"{self.root}: {e}") from None
        return model

    def stored_tensors(self, name: str, module: nn.Module) -> dict[str, Tensor]:
        """A compressed linear's tensors under the folder's names (``weight.<key>``, ``bias``)."""
        lay = self.layouts[name]
        own = module.state_dict()
        out = {}
        for key, state in lay.names.items():
            if state not in own:
                raise InputError(f"{name}: its {type(module).__name__} no longer holds {state!r} "
                                 f"(stored as weight.{key})")
            out[f"weight.{key}"] = own.pop(state)
        if lay.bias in own:
            out["bias"] = own.pop(lay.bias)
        if own:
            raise InputError(f"{name}: its {type(module).__name__} holds {', '.join(sorted(own))}, which the llmpress "
                             f"layout of codec {lay.codec} does not describe")
        return out

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The model's state dict with each compressed linear's tensors under the folder's names."""
        sd = model.state_dict()
        for name in self.layouts:
            module = model.get_submodule(name)
            for k in module.state_dict():
                sd.pop(f"{name}.{k}")
            sd.update({f"{name}.{k}": t for k, t in self.stored_tensors(name, module).items()})
        return sd, {}

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Every compressed linear becomes an nn.Linear of its decoded weight."""
        for name, lay in self.layouts.items():
            st = self.stored_tensors(name, model.get_submodule(name))
            bias = st.pop("bias", None)
            data = {k.removeprefix("weight."): t for k, t in st.items()}
            ct = CompressedTensor(codec=lay.codec, data=data, meta=lay.meta)
            w = get_codec(lay.codec).decode(ct)  # (out, in) float32
            if f"{name}.weight" in self.unrotate:  # read the inputs unrotated: W H Hᵀ, W Q Qᵀ, Q Qᵀ W
                w = apply_steps(w, self.unrotate.pop(f"{name}.weight"))
            if bias is not None and f"{name}.bias" in self.unrotate:
                bias = apply_steps(bias, self.unrotate.pop(f"{name}.bias"))
            w = w.to(dtype) if dtype is not None else w
            set_module(model, name, dense_linear(w, None if bias is None else bias.to(w.dtype)))
        self.layouts = {}
        for key, steps in self.unrotate.items():  # a rotated linear kept dense in the folder: fold it too
            p = model.get_parameter(key)
            p.data = apply_steps(p.data, steps)
        self.unrotate = {}
        for handle in self.online_hooks.values():
            handle.remove()
        self.online_hooks = {}
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype name)} over the shards, from their headers only."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        h = safe_open(str(f), framework="pt")
        for k in h.keys():
            s = h.get_slice(k)
            out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


def _stored_by_module(header: dict[str, Any]) -> dict[str, list[str]]:
    """{linear: its stored keys} for every tensor named ``<linear>.weight.<key>`` (one pass)."""
    out: dict[str, list[str]] = {}
    for k in header:
        mod, sep, key = k.partition(".weight.")
        if sep:
            out.setdefault(mod, []).append(key)
    return out


def _layout(root: Path, name: str, entry: Any, header: dict[str, tuple[tuple[int, ...], str]],
            stored: Any) -> tuple[Layout, dict[str, Tensor]]:
    """Check one linear's layout against the shards and its codec; its meta tensors by stored name."""
    where = f"{root}: {name}"
    if not (isinstance(entry, dict) and isinstance(entry.get("codec"), str) and isinstance(entry.get("meta"), dict)
            and isinstance(entry.get("keys"), list) and all(isinstance(k, str) for k in entry["keys"])):
        raise InputError(f"{where}: malformed layout in quantization_config.modules (needs codec, meta, keys); "
                         f"got {entry!r}")
    keys = entry["keys"]
    missing = [k for k in keys if f"{name}.weight.{k}" not in header]
    if missing:
        raise InputError(f"{where}: stored tensor(s) {', '.join(f'{name}.weight.{k}' for k in missing)} "
                         f"missing from the shards")
    extra = sorted(set(stored) - set(keys))
    if extra:
        raise InputError(f"{where}: the shards hold {', '.join(f'{name}.weight.{k}' for k in extra)}, "
                         f"which the layout does not list")
    if f"{name}.weight" in header:
        raise InputError(f"{where}: stored both dense ({name}.weight) and compressed")
    data = {}
    for k in keys:
        shape, dt = header[f"{name}.weight.{k}"]
        if dt not in _DTYPES:
            raise InputError(f"{where}: {name}.weight.{k} has dtype {dt}, which no llmpress codec stores")
        data[k] = torch.empty(shape, dtype=_DTYPES[dt], device="meta")
    try:
        get_codec(entry["codec"])
    except KeyError as e:
        raise InputError(f"{where}: codec {entry['codec']!r}: {e.args[0]}") from None
    ct = CompressedTensor(codec=entry["codec"], data=data, meta=entry["meta"])
    try:
        names, bias = module_state_names(ct)
    except KeyError as e:  # a nested layout whose meta lacks an inner codec's entry
        raise InputError(f"{where}: codec {entry['codec']!r}: the meta lacks {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: codec {entry['codec']!r}: {e}") from None
    if set(names) != set(keys):
        raise InputError(f"{where}: codec {entry['codec']} stores {sorted(names)}; the layout lists {sorted(keys)}")
    tensors = {f"weight.{k}": t for k, t in data.items()}
    return Layout(codec=entry["codec"], meta=entry["meta"], names=names, bias=bias), tensors


def _linear(root: Path, model: nn.Module, name: str, entry: dict[str, Any]) -> nn.Module:
    """The model's linear a layout entry replaces, checked against the stored shape."""
    if not (isinstance(entry, dict) and isinstance(entry.get("meta"), dict)):
        raise InputError(f"{root}: {name}: malformed layout in quantization_config.modules (needs codec, meta, keys); "
                         f"got {entry!r}")
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise InputError(f"{root}: the layout names {name}, which {type(model).__name__} does not have") from None
    if not is_linear(old):
        raise InputError(f"{root}: {name} is a {type(old).__name__} in {type(model).__name__}, not a linear layer")
    w = old.weight
    out_in = list(w.shape[::-1] if type(old).__name__ == "Conv1D" else w.shape)
    shape = entry["meta"].get("shape")
    if shape is not None and [int(d) for d in shape] != out_in:
        raise InputError(f"{root}: {name}: stored for a {shape} weight; the model's linear is {out_in}")
    return old
