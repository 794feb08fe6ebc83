"""QuantLinear: an nn.Linear whose weight stays quantized in memory.

It holds the stored form (``qweight``, the group parameters, ``g_idx``, ``in_scale``: the keys
of ``codec.py``) as buffers. When built (or, built on the meta device, at its first forward or
:meth:`prepare`) it picks its forward from
``kernels.KERNELS`` by layout: a packed int4/int8 kernel, which then holds the codes in its own
layout instead of ``qweight`` (one copy; ``state_dict`` rebuilds ``qweight`` bit for bit), or
dequantizing the whole weight group-wise at each call (vectorised: unpack → affine map per group).
Moving or casting the module drops the kernel's buffers back to the stored form when they no longer
fit the kernel (another device, another dtype); the next forward chooses again.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..stored import check_ct
from ..tensor import CompressedTensor
from . import grids, kernels
from .codec import column_params
from .pack import pack, packed_bytes, unpack

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """Behaves like ``nn.Linear(in_features, out_features)``: forward maps (..., in) → (..., out).

    ``bf16_compute``: float32/float16 activations take the packed kernel too (it computes in
    bfloat16; see ``kernels``). Off by default, so results stay within float32 rounding of
    ``F.linear(x, dequantize())``; bfloat16 activations always take the kernel."""

    def __init__(self, ct: CompressedTensor, bias: Tensor | None = None):
        super().__init__()
        check_ct(ct)  # the meta agrees with the stored tensors before anything is sized from it
        self.out_features, self.in_features = (int(d) for d in ct.meta["shape"])
        self.bits = int(ct.meta["bits"])
        self.meta: dict[str, Any] = dict(ct.meta)
        self.grid = grids.GRIDS[ct.meta["grid"]]
        for k, v in ct.data.items():
            self.register_buffer(k, v.contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.bf16_compute = False
        self._path: str | None = None  # the chosen forward: a kernel's name or "dequant"; None: not yet
        self._kernel: kernels.Kernel | None = None
        self._kinfo: dict[str, Any] = {}
        self._kdtypes: dict[str, torch.dtype] = {}
        self.prepare()  # pack now, while the stored form is the only copy (a no-op on the meta device)

    @classmethod
    def from_ct(cls, ct: CompressedTensor, bias: Tensor | None = None) -> "QuantLinear":
        return cls(ct, bias)

    # ------------------------------------------------------------------ the forward's choice
    def prepare(self) -> str:
        """Choose the forward (packing the codes for a kernel) unless chosen; returns its name.
        A module still on the meta device stays undecided ("pending")."""
        if self._kernel is not None and not self._kernel.valid(self):
            self._unpack()
        if self._path is None:
            if self._buffers.get("qweight") is None or self.qweight.is_meta:
                return "pending"
            kern, why = kernels.choose(self)
            if kern is not None:
                kern.pack(self)
            self._path = kern.name if kern is not None else "dequant"
            log.debug("%s: %s", self.extra_repr(), why if kern is not None else f"dequantize ({why})")
        return self._path

    def _set_kernel_buffers(self, kern: kernels.Kernel, bufs: dict[str, Tensor | None], info: dict[str, Any]) -> None:
        """Called by a kernel's ``pack``: hold its buffers instead of ``qweight``."""
        for k, v in bufs.items():
            self.register_buffer(k, v, persistent=False)
        self._kdtypes = {k: v.dtype for k, v in bufs.items() if v is not None}
        self._kinfo, self._kernel = info, kern
        self._buffers["qweight"] = None  # one copy of the codes: the kernel's

    def to_stored(self) -> None:
        """Back to the stored form: ``qweight`` rebuilt from the kernel's codes, the kernel's buffers
        dropped; the next forward (or :meth:`prepare`) chooses again. For code that writes the
        stored buffers in place (``load_state_dict`` does this by itself)."""
        if self._kernel is not None:
            self._unpack()
        self._path = None

    def _unpack(self) -> None:
        self._buffers["qweight"] = self._stored_qweight()
        for k in list(self._kdtypes) + list(self._kernel.buffers if self._kernel else ()):
            self._buffers.pop(k, None)
        self._kernel, self._path, self._kinfo, self._kdtypes = None, None, {}, {}

    def _stored_qweight(self) -> Tensor:
        if self._kernel is None:
            return self.qweight
        codes = self._kernel.codes(self)
        return pack(codes.cpu(), self.bits).to(codes.device)

    # ------------------------------------------------------------------ the stored form
    def codes(self) -> Tensor:
        """The codes (out, in) uint8, whichever form holds them."""
        if self._kernel is not None:
            return self._kernel.codes(self)
        return unpack(self.qweight, self.bits, self.out_features * self.in_features).reshape(self.out_features, self.in_features)

    def _buffers_dict(self) -> dict[str, Tensor]:
        """The stored tensors other than ``qweight`` (group parameters, g_idx, in_scale)."""
        return {k: v for k, v in self._buffers.items() if v is not None and not k.startswith("_") and k != "qweight"}

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if self._kernel is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self._buffers["qweight"] = self._stored_qweight()  # in its place, so the keys keep their order
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers["qweight"] = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self._kernel is not None:
            self._unpack()
        self._path = None  # new data: choose again at the next forward
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantLinear":
        super()._apply(fn, recurse)
        if self._kernel is not None and not self._kernel.valid(self):
            self._unpack()
        return self

    def dequantize(self) -> Tensor:
        """The effective weight (out, in), float32."""
        data = self._buffers_dict()
        codes = self.codes().to(torch.float32)
        gs = int(self.meta["group_size"])
        if "g_idx" not in data and 0 < gs < self.in_features:
            # consecutive groups: broadcast (out, G, 1) parameters over the grouped view, no gather
            n_g = grids.num_groups(self.in_features, gs)
            wg = F.pad(codes, (0, n_g * gs - self.in_features)).view(self.out_features, n_g, gs)  # (out, G, gs)
            p = {k: v.unsqueeze(-1) for k, v in self.grid.group_params(data, self.meta).items()}
            w = grids.ungroup(self.grid.dequantize(wg, p, self.bits), codes.shape)
        else:
            g = data["g_idx"].long() if "g_idx" in data else grids.group_index(self.in_features, gs)
            w = self.grid.dequantize(codes, column_params(data, self.meta, g), self.bits)
        if "in_scale" in data:
            w = w / data["in_scale"].to(torch.float32)
        return w

    @property
    def weight(self) -> Tensor:
        # Some callers (generation utilities, dtype probes) read `.weight`; give them the real one.
        return self.dequantize()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self._path is None:
            self.prepare()
        k, bufs = self._kernel, self._buffers
        if (k is not None and (self.bf16_compute or x.dtype in k.native)
                and not (x.requires_grad and torch.is_grad_enabled())):  # the kernels have no backward
            x2 = x.reshape(-1, self.in_features)  # (M, in)
            if bufs.get("in_scale") is not None:  # AWQ: W·diag(1/s) x = W (x / s)
                x2 = x2.to(torch.float32) / bufs["in_scale"].to(torch.float32)
            y = k.forward(self, x2).to(x.dtype).view(*x.shape[:-1], self.out_features)  # (..., out)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def packed_bytes(self) -> int:
        """Bytes of the stored form (packed codes + group parameters + index/scales)."""
        codes = packed_bytes(self.out_features * self.in_features, self.bits)
        return codes + sum(b.numel() * b.element_size() for b in self._buffers_dict().values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.meta['group_size']}, grid={self.meta['grid']}, bias={self.bias is not None}"
                + (f", forward={self._path}" if self._path else ""))


class Decoded(nn.Module):
    """A QuantLinear decoded once: its effective float32 weight held dense. The forward is the
    dequantize path's own (``F.linear(x, w.to(x.dtype), bias)``), so outputs are bit for bit a
    QuantLinear's on that path, without decoding the weight at every call."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("w", layer.dequantize())  # (out, in) float32
        self.bias = layer.bias

    @property
    def weight(self) -> Tensor:
        return self.w

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def decode_once(model: nn.Module) -> int:
    """Replace every QuantLinear of ``model`` by its :class:`Decoded` form (memory: the dense
    weights); returns how many. For a judge that runs the model over many batches. The hooks on
    a replaced module go with it (an online rotation of its input, ``quant/rotate.py``, is one)."""
    n = 0
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, QuantLinear):
                from ..skeleton import carry_hooks

                setattr(m, child_name, carry_hooks(child, Decoded(child)))
                n += 1
    return n
