"""Fine-tuning the factors of a low-rank layer, W ≈ U V, in place.

A low-rank codec stores U (m, k) and V (k, n) (Σ folded in; see ``llmpress.lowrank.base``).
Training them directly keeps k(m + n) numbers, so the stored size is exactly what it was.
Following SVD-LLM's sequential low-rank update (Wang et al. 2024, §3.3: fine-tuning U and V
together is unstable because each compensates the other; updating U first, then V, recovers
more), the first half of the steps trains U with V frozen and the second half trains V with U
frozen. Factors stored narrower than float32 are trained as float32 masters and rounded to
their storage dtype in the forward pass (straight-through), so training sees what is stored.
A layer the codec left dense (``meta["dense"]``) trains its full weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tensor import CompressedTensor
from .qat import _ste_round_to


class FactorLinear(nn.Module):
    """y = U (V x) + b with trainable U, V (``nn.Linear(in, out)`` semantics)."""

    kind = "factors"

    def __init__(self, ct: CompressedTensor, bias: Tensor | None = None, split: float = 0.5):
        super().__init__()
        self.codec, self.meta = ct.codec, dict(ct.meta)
        self.out_features, self.in_features = (int(d) for d in ct.meta["shape"])
        self.dense = bool(ct.meta.get("dense"))
        self.split = split
        self.dtypes = {k: v.dtype for k, v in ct.data.items()}
        if self.dense:
            self.weight_ = nn.Parameter(ct.data["weight"].float().clone())  # (m, n)
            self.U = self.V = None
        else:
            self.U = nn.Parameter(ct.data["U"].float().clone())  # (m, k)
            self.V = nn.Parameter(ct.data["V"].float().clone())  # (k, n)
            self.weight_ = None
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:  # (..., in) → (..., out)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.dense:
            return F.linear(x, _ste_round_to(self.weight_, self.dtypes["weight"]).to(x.dtype), b)
        v = _ste_round_to(self.V, self.dtypes["V"]).to(x.dtype)
        u = _ste_round_to(self.U, self.dtypes["U"]).to(x.dtype)
        return F.linear(F.linear(x, v), u, b)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"factors": [self.weight_] if self.dense else [self.U, self.V]}

    def phase(self, progress: float) -> None:
        """U trains for the first ``split`` of the run, V for the rest."""
        if self.dense:
            return
        first = progress < self.split
        self.U.requires_grad_(first)
        self.V.requires_grad_(not first)

    @torch.no_grad()
    def to_ct(self) -> CompressedTensor:
        if self.dense:
            data = {"weight": self.weight_.to(self.dtypes["weight"]).contiguous()}
        else:
            data = {"U": self.U.to(self.dtypes["U"]).contiguous(), "V": self.V.to(self.dtypes["V"]).contiguous()}
        return CompressedTensor(self.codec, data, dict(self.meta))

    def extra_repr(self) -> str:
        rank = "dense" if self.dense else f"rank={self.U.shape[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {rank}"
