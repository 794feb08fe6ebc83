"""QuantLinear: an nn.Linear whose weight stays bit-packed in memory.

It holds the packed codes and the group parameters as buffers and dequantizes the whole
weight group-wise (vectorised: unpack → gather group parameters per column → affine map)
at each forward, so the resident size is about the packed size plus one transient layer.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tensor import CompressedTensor
from . import grids
from .codec import column_params
from .pack import unpack


class QuantLinear(nn.Module):
    """Behaves like ``nn.Linear(in_features, out_features)``: forward maps (..., in) → (..., out)."""

    def __init__(self, ct: CompressedTensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in ct.meta["shape"])
        self.bits = int(ct.meta["bits"])
        self.meta: dict[str, Any] = dict(ct.meta)
        self.grid = grids.GRIDS[ct.meta["grid"]]
        for k, v in ct.data.items():
            self.register_buffer(k, v.contiguous())
        if "g_idx" not in ct.data:  # consecutive groups: the index is derived, not stored
            self.register_buffer("_gidx", grids.group_index(self.in_features, int(ct.meta["group_size"])), persistent=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_ct(cls, ct: CompressedTensor, bias: Tensor | None = None) -> "QuantLinear":
        return cls(ct, bias)

    def _buffers_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.named_buffers(recurse=False) if not k.startswith("_")}

    def dequantize(self) -> Tensor:
        """The effective weight (out, in), float32."""
        data = self._buffers_dict()
        codes = unpack(data["qweight"], self.bits, self.out_features * self.in_features)
        codes = codes.reshape(self.out_features, self.in_features).to(torch.float32)
        gs = int(self.meta["group_size"])
        if "g_idx" not in data and 0 < gs < self.in_features:
            # consecutive groups: broadcast (out, G, 1) parameters over the grouped view, no gather
            n_g = grids.num_groups(self.in_features, gs)
            wg = F.pad(codes, (0, n_g * gs - self.in_features)).view(self.out_features, n_g, gs)  # (out, G, gs)
            p = {k: data[k].to(torch.float32).unsqueeze(-1) for k in self.grid.stored}
            w = grids.ungroup(self.grid.dequantize(wg, p, self.bits), codes.shape)
        else:
            g = data["g_idx"].long() if "g_idx" in data else self._gidx
            w = self.grid.dequantize(codes, column_params(data, self.meta, g), self.bits)
        if "in_scale" in data:
            w = w / data["in_scale"].to(torch.float32)
        return w

    @property
    def weight(self) -> Tensor:
        # Some callers (generation utilities, dtype probes) read `.weight`; give them the real one.
        return self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers_dict().values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.meta['group_size']}, grid={self.meta['grid']}, bias={self.bias is not None}")
