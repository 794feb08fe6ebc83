"""Quantization-aware training through the very quantizer a layer was stored with.

A quantized layer stores integer codes q and per-group parameters (scale s, offset m) on a grid
(``llmpress.quant.grids``). Every grid there reconstructs as ŵ = s·g(q) + m (m = 0 for grids
without an offset), where g(q) is the grid's level at unit scale. We train, per layer:

* a latent float weight W (out, in), initialised on the stored grid points, so the model starts
  exactly where the compressed one is;
* the scales and offsets themselves (LSQ, Esser et al. 2020; LSQ+ for the offset).

Forward: x = (W − m)/s is the weight in grid units; q = quantize(x) by the grid's own rounding
(the same function that encoded the layer); the weight used is

    ŵ = s · (g(q) + x_c − sg(x_c)) + m,        x_c = clamp(x, g(0), g(2^b − 1)),

sg = stop-gradient. Its value is exactly the dequantized weight; its gradient is the
straight-through estimator for W inside the grid's range (zero outside), and for s the LSQ
gradient g(q) − x inside the range (g(q) at the clipped ends); for m it is 1 only where clipped.
Parameters are also rounded to their storage dtype (float16 …) in the forward pass, with a
straight-through gradient, so that training sees exactly what will be stored.

Re-packing (:meth:`QATLinear.to_ct`) quantizes W with the trained parameters by the same rule and
stores codes, scales and offsets with the same keys, dtypes, bits and group layout as before:
the bits per weight do not change. ``g_idx`` (GPTQ act-order) and AWQ's ``in_scale`` are kept
as stored; the effective weight stays ŵ·diag(1/in_scale).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import grids
from ..quant.pack import pack, unpack
from ..tensor import CompressedTensor

log = logging.getLogger(__name__)

MIN_SCALE = 1e-7


def _ste_round_to(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Value of ``p`` rounded to ``dtype``; gradient of the identity."""
    if dtype == torch.float32:
        return p
    return (p - p.detach()) + p.detach().to(dtype).to(torch.float32)  # exactly the rounded value


# Grids whose unit-scale level of round(x) has a closed form: the same arithmetic as their
# quantize/dequantize at scale 1 and offset 0 (asserted against the codec in the tests), in
# two passes instead of six. Other grids go through their own functions.
_FAST_LEVELS = {
    "asym": lambda x, b: x.round().clamp_(0, 2**b - 1),
    "sym": lambda x, b: x.round().clamp_(-(2 ** (b - 1)), 2 ** (b - 1) - 1),
}


class _FakeQuant(torch.autograd.Function):
    """ŵ = s·g(q(x)) + m with x = (W − m)/s, and the LSQ/STE gradients written out:
    ∂ŵ/∂W = 1[lo ≤ x ≤ hi],  ∂ŵ/∂s = g − x·1[inside],  ∂ŵ/∂m = 1[outside].
    Nothing but the inputs is saved; x is recomputed in backward (memory of one weight)."""

    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, m: Tensor | None, mod: "QATLinear") -> Tensor:
        x = (w - m).div_(s) if m is not None else w / s
        out = mod._levels(x).mul_(s)
        if m is not None:
            out.add_(m)
        ctx.save_for_backward(w, s, m)
        ctx.mod = mod
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        w, s, m = ctx.saved_tensors
        mod = ctx.mod
        x = (w - m).div_(s) if m is not None else w / s
        inside = (x >= mod.lo) & (x <= mod.hi)
        need_w, need_s, need_m, _ = ctx.needs_input_grad
        gw = g * inside if need_w else None
        if need_s:
            q = mod._levels(x)
            gs = torch.where(inside, q - x, q).mul_(g).sum_to_size(s.shape)
        else:
            gs = None
        gm = g.masked_fill(inside, 0.0).sum_to_size(m.shape) if need_m else None
        return gw, gs, gm, None


class QATLinear(nn.Module):
    """A trainable stand-in for a quantized linear (``nn.Linear(in, out)`` semantics)."""

    kind = "qat"
    train_latent = True  # False: codes move only through the scales and offsets (EfficientQAT's E2E-QP)

    def __init__(self, ct: CompressedTensor, bias: Tensor | None = None):
        super().__init__()
        self.codec, self.meta = ct.codec, dict(ct.meta)
        self.out_features, self.in_features = (int(d) for d in ct.meta["shape"])
        self.bits = int(ct.meta["bits"])
        self.grid = grids.GRIDS[ct.meta["grid"]]
        self.stored_dtype = ct.data["scale"].dtype
        self.asym = "offset" in self.grid.stored
        # Data stored as it is and never trained (group index of act-order GPTQ, AWQ's input scale).
        self.fixed = {k: v for k, v in ct.data.items() if k not in ("qweight", "scale", "offset")}
        g = ct.data["g_idx"].long() if "g_idx" in ct.data else grids.group_index(self.in_features, int(ct.meta["group_size"]))
        self.register_buffer("g_idx", g, persistent=False)  # (in,)
        inv = 1.0 / ct.data["in_scale"].float() if "in_scale" in ct.data else None
        self.register_buffer("inv_in_scale", inv, persistent=False)  # (in,) or None
        gs = int(ct.meta["group_size"])
        # whole consecutive groups: work on the (out, G, S) view, no per-column expansion
        self.group = gs if ("g_idx" not in ct.data and 0 < gs < self.in_features and self.in_features % gs == 0) else 0
        self.scale = nn.Parameter(ct.data["scale"].float().clone())  # (R, G)
        self.offset = nn.Parameter(ct.data["offset"].float().clone()) if self.asym else None  # (R, G)
        unit = self._unit()
        top = torch.tensor(float(2**self.bits - 1))
        self.lo = float(self.grid.dequantize(torch.tensor(0.0), unit, self.bits))
        self.hi = float(self.grid.dequantize(top, unit, self.bits))
        codes = unpack(ct.data["qweight"], self.bits, self.out_features * self.in_features)
        codes = codes.reshape(self.out_features, self.in_features).to(torch.float32)
        self.latent = nn.Parameter(self._init_latent(codes))  # (out, in)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    # ------------------------------------------------------------------ the quantizer
    @staticmethod
    def _unit() -> dict[str, Tensor]:
        return {"scale": torch.ones(()), "offset": torch.zeros(())}

    def _columns(self, p: Tensor) -> Tensor:
        """(R, G) group parameters → (R, in), one per input column."""
        return p.index_select(1, self.g_idx)

    def _params(self) -> tuple[Tensor, Tensor | None]:
        """Per-column scale and offset as stored (rounded to the storage dtype), (R, in)."""
        s = _ste_round_to(self.scale.clamp_min(MIN_SCALE), self.stored_dtype)
        m = _ste_round_to(self.offset, self.stored_dtype) if self.asym else None
        return self._columns(s), (self._columns(m) if m is not None else None)

    def _to_units(self, w: Tensor, s: Tensor, m: Tensor | None) -> Tensor:
        return (w - m) / s if m is not None else w / s

    def _codes(self, x: Tensor) -> Tensor:
        return self.grid.quantize(x.detach(), self._unit(), self.bits)

    def _init_latent(self, codes: Tensor) -> Tensor:
        """Latent weights on the stored grid points, nudged a quarter step up inside their bin
        where rounding would not give the stored code back (the seed grid rounds down, and
        (s·x + m − m)/s is not always x in floating point)."""
        with torch.no_grad():
            s, m = self._params()
            unit = self._unit()
            top = 2**self.bits - 1
            xq = self.grid.dequantize(codes, unit, self.bits)
            nb = self.grid.dequantize(torch.where(codes < top, codes + 1, codes - 1), unit, self.bits)
            step = 0.25 * (nb - xq).abs()
            x = xq.clone()
            for _ in range(3):
                w = s * x + (m if m is not None else 0.0)
                bad = self._codes(self._to_units(w, s, m)) != codes
                if not bool(bad.any()):
                    break
                x = torch.where(bad, x + step, x)
            else:
                log.warning("%s: %d of %d codes do not survive re-quantization at init", self.codec, int(bad.sum()), codes.numel())
            return w

    def _levels(self, x: Tensor) -> Tensor:
        """g(quantize(x)): the unit-scale grid level each value rounds to (no gradient)."""
        fast = _FAST_LEVELS.get(self.meta["grid"])
        return fast(x, self.bits) if fast is not None else self.grid.dequantize(self._codes(x), self._unit(), self.bits)

    def _view(self, w: Tensor) -> Tensor:
        """(out, in) → (out, G, S) for whole consecutive groups, else (out, in) unchanged."""
        return w.view(self.out_features, -1, self.group) if self.group else w

    def _expand(self, p: Tensor) -> Tensor:
        """(R, G) group parameters → broadcastable against :meth:`_view`."""
        if self.group:
            return p.unsqueeze(-1)  # (R, G, 1)
        return p if p.shape[1] == 1 else self._columns(p)  # (R, 1) or (R, in)

    def fake_weight(self) -> Tensor:
        """The effective weight (out, in) with straight-through (LSQ) gradients."""
        s = _ste_round_to(self.scale.clamp_min(MIN_SCALE), self.stored_dtype)
        m = _ste_round_to(self.offset, self.stored_dtype) if self.asym else None
        w = _FakeQuant.apply(self._view(self.latent), self._expand(s), None if m is None else self._expand(m), self)
        w = w.reshape(self.out_features, self.in_features)
        return w * self.inv_in_scale if self.inv_in_scale is not None else w

    def forward(self, x: Tensor) -> Tensor:  # (..., in) → (..., out)
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ------------------------------------------------------------------ training hooks
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        qp = [p for p in (self.scale, self.offset) if p is not None]
        return {"latent": [self.latent], "qparams": qp} if self.train_latent else {"qparams": qp}

    def phase(self, progress: float) -> None:
        """All parameters train throughout."""

    # ------------------------------------------------------------------ re-packing
    @torch.no_grad()
    def to_ct(self) -> CompressedTensor:
        """The trained layer in the stored format it came from: same keys, dtypes, grid, bits."""
        s_g = self.scale.clamp_min(MIN_SCALE).to(self.stored_dtype)
        m_g = self.offset.to(self.stored_dtype) if self.asym else None
        s = self._columns(s_g.float())
        m = self._columns(m_g.float()) if m_g is not None else None
        codes = self._codes(self._to_units(self.latent, s, m)).to(torch.uint8)
        data: dict[str, Any] = {"qweight": pack(codes, self.bits), "scale": s_g.contiguous()}
        if m_g is not None:
            data["offset"] = m_g.contiguous()
        data.update(self.fixed)
        return CompressedTensor(self.codec, data, dict(self.meta))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, grid={self.meta['grid']}"
