"""LowRankLinear: y = U (V x) + b with two thin linears, in → k → out.

Σ is folded into the factors, so inference is two matrix products of k(m + n) multiply-adds per
token instead of m·n, and memory holds k(m + n) weights instead of m·n.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InputError


class LowRankLinear(nn.Module):
    """Behaves like ``nn.Linear(in_features, out_features)``; holds ``down`` (V: in → k) and
    ``up`` (U: k → out, with the bias). ``down``/``up`` may be any modules with that shape
    (e.g. quantized linears, see ``combo.py``)."""

    def __init__(self, down: nn.Module, up: nn.Module, rank: int, in_features: int, out_features: int):
        super().__init__()
        self.down = down
        self.up = up
        self.rank = rank
        self.in_features = in_features
        self.out_features = out_features
        self.factor_dtype: torch.dtype | None = None  # set when the factors are plain tensors

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None = None) -> "LowRankLinear":
        """u (out, k), v (k, in): W ≈ u @ v."""
        (m, k), (k2, n) = u.shape, v.shape
        if k != k2:
            raise InputError(f"factor shapes do not chain: U {tuple(u.shape)}, V {tuple(v.shape)}")
        down = nn.Linear(n, k, bias=False, dtype=v.dtype)
        up = nn.Linear(k, m, bias=bias is not None, dtype=u.dtype)
        with torch.no_grad():
            down.weight.copy_(v)
            up.weight.copy_(u)
            if bias is not None:
                up.bias.copy_(bias.to(u.dtype))
        mod = cls(down, up, k, n, m)
        mod.factor_dtype = v.dtype
        return mod

    def forward(self, x: Tensor) -> Tensor:  # (..., in) → (..., out)
        if self.factor_dtype is None or x.dtype == self.factor_dtype:
            return self.up(self.down(x))
        # Factors stored narrower (e.g. float16) than the activations: widen them per call, as
        # decode does, so the result equals F.linear(x, decode(ct)) up to summation order.
        b = self.up.bias
        z = F.linear(x, self.down.weight.to(x.dtype))
        return F.linear(z, self.up.weight.to(x.dtype), None if b is None else b.to(x.dtype))

    @property
    def weight(self) -> Tensor:
        """The effective (out, in) weight U V, for callers that probe ``.weight`` (dtype, device)."""
        return self.up.weight.float() @ self.down.weight.float()

    def stored_weights(self) -> int:
        """k(m + n): the weights this layer holds in place of m·n."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
