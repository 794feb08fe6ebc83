"""A model's skeleton on the meta device, filled module by module from safetensors.

Building a transformers model on ``meta`` costs no memory; each module's tensors are then
assigned from the checkpoint only when that module is needed, and dropped back to ``meta``
afterwards. This is what lets the sequential runner and the loaders keep peak memory near
one block instead of the whole model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import InputError, UnsupportedModelError
from . import moe

log = logging.getLogger(__name__)


def _is_causal_config(cfg) -> bool:
    archs = getattr(cfg, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def build_meta(config, nonpersistent: bool = True) -> nn.Module:
    """Instantiate the model class of ``config`` on the meta device, with its non-persistent
    buffers (rotary frequencies, position ids) computed for real on the CPU, and the fused
    experts of a mixture-of-experts split into one module per expert (``moe.unfuse``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if _is_causal_config(config) else AutoModel
    with torch.device("meta"):
        model = cls.from_config(config)
        moe.unfuse(model)  # fused experts → one linear per expert matrix (moe.py)
    if nonpersistent:  # a loader that checks the config first materializes them after (materialize_nonpersistent)
        _materialize_nonpersistent(model, config)
    model.eval()
    return model


def materialize_nonpersistent(model: nn.Module, config) -> None:
    """The buffers no checkpoint holds, computed from the config (for ``build_meta(..., False)``)."""
    _materialize_nonpersistent(model, config)


def _materialize_nonpersistent(model: nn.Module, config) -> None:
    """Modules whose buffers are not in the checkpoint (e.g. rotary ``inv_freq``) are rebuilt
    on the CPU from the config; their parameters, if any, stay to be loaded."""
    for name, mod in list(model.named_modules()):
        metas = [b for b, t in mod.named_buffers(recurse=False) if t.is_meta and b in mod._non_persistent_buffers_set]
        if not metas:
            continue
        fresh = None
        for make in (lambda: type(mod)(config=config), lambda: type(mod)(config)):
            try:
                with torch.device("cpu"):
                    fresh = make()
                break
            except TypeError:
                continue
        if fresh is None:
            _init_buffers(model, name, mod, metas)
            continue
        for b in metas:
            setattr(mod, b, getattr(fresh, b))


def _init_buffers(model: nn.Module, name: str, mod: nn.Module, metas: list[str]) -> None:
    """Buffers of a module not built from the config alone (Gemma's ``embed_scale``, made from
    constructor arguments): CPU tensors filled by the model's own ``_init_weights``, which
    transformers 5 uses to set such buffers; NaN left in one means it did not."""
    for b in metas:
        t = mod._buffers[b]
        mod._buffers[b] = torch.full(t.shape, float("nan"), dtype=t.dtype) if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)
    init = getattr(model, "_init_weights", None)
    if init is not None:
        with torch.no_grad():
            init(mod)
    bad = [b for b in metas if mod._buffers[b].is_floating_point() and torch.isnan(mod._buffers[b]).any()]
    if init is None or bad:
        raise UnsupportedModelError(f"cannot rebuild the buffers {bad or metas} of {name} ({type(mod).__name__}) from the config")


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_module(model, parent), child, new)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` with ``old``'s forward hooks (an online rotation of its input, ``quant/rotate.py``, is
    one), for a module that stands in for ``old`` and computes the same; returns ``new``. The hooks'
    handles still name ``old``'s dicts: they no longer remove them."""
    for hooks in _HOOK_DICTS:
        getattr(new, hooks).update(getattr(old, hooks))
    return new


def fill(module: nn.Module, prefix: str, get: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Assign every parameter and persistent buffer of ``module`` from ``get(prefix + name)``."""
    sd = {}
    for k in module.state_dict().keys():
        t = get(f"{prefix}{k}")
        sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    module.load_state_dict(sd, assign=True, strict=True)


def move(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move every tensor of ``module`` that holds data to ``device``; tensors still on ``meta``
    (the parts of a skeleton not loaded yet) stay there."""
    dev = torch.device(device)
    return module._apply(lambda t: t if t.is_meta or t.device == dev else t.to(dev))


def release(module: nn.Module) -> None:
    """Drop a module's parameters and persistent buffers back to the meta device (frees their
    memory). Non-persistent buffers (rotary tables, Gemma's ``embed_scale``) are no checkpoint's:
    they were computed from the config and stay, so the module can be filled and called again."""
    moved: dict[int, nn.Parameter] = {}  # a parameter shared by two modules stays one parameter
    for m in module.modules():
        for n, p in m._parameters.items():
            if p is not None and not p.is_meta:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                m._parameters[n] = moved[id(p)]
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                m._buffers[n] = b.to("meta")


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList with ``num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return name, mod
    raise InputError(f"{type(model).__name__}: no list of {n} transformer blocks found")


def why_not_walkable(model: nn.Module) -> str | None:
    """Why the sequential runner cannot walk ``model`` block by block (None when it can): it
    follows one stack of blocks fed one after the other, so an encoder-decoder (two stacks, the
    decoder's blocks reading the encoder's output) or a model without a list of
    ``num_hidden_layers`` blocks is out of its reach."""
    cfg = model.config
    mt = getattr(cfg, "model_type", type(model).__name__)
    if getattr(cfg, "is_encoder_decoder", False):
        return f"{mt} is an encoder-decoder; the sequential runner walks one stack of blocks"
    try:
        blocks_of(model)
    except ValueError as e:
        return f"{mt} has no known block structure ({e})"
    return None


def check_walkable(model: nn.Module) -> None:
    """Raise ``ValueError("unsupported: …")`` before any work when ``model`` cannot be walked."""
    why = why_not_walkable(model)
    if why is not None:
        raise InputError(f"unsupported: {why}")


def linear_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the linear layers (nn.Linear and GPT-2's Conv1D) below ``module``."""
    return [f"{prefix}{n}" for n, m in module.named_modules() if is_linear(m)]


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_weight(m: nn.Module) -> torch.Tensor:
    """A linear layer's weight as (out, in) float32 (Conv1D stores (in, out))."""
    w = m.weight.detach()
    return (w.T if type(m).__name__ == "Conv1D" else w).float()


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Set an (out, in) weight back into a linear layer, in its own layout and dtype."""
    w = w.T if type(m).__name__ == "Conv1D" else w
    m.weight = nn.Parameter(w.to(m.weight.dtype).contiguous(), requires_grad=False)


def tie(model: nn.Module) -> None:
    """Re-tie output and input embeddings when the config asks for it."""
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None:
            out.weight = inp.weight


def folder_config(folder: Path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(folder))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # ours, not a transformers quantizer
    return cfg
