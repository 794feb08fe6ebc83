"""Quantization-aware training through the very quantizer a layer was stored with.

A quantized layer stores integer codes q and per-group parameters (scale s, offset m) on a grid
(``llmpress.quant.grids``). Every grid there reconstructs as ŵ = s·g(q) + m (m = 0 for grids
without an offset), where g(q) is the grid's level at unit scale; the integer-zero-point grid
(``asymz``, ŵ = (q − z)·s) is the case m = −z·s with z held at its stored integer, so only s
moves and z stays exactly representable. We train, per layer:

* a latent weight u (out, in) in grid units (u = (W − m)/s), initialised on the stored codes'
  levels so the model starts exactly where the compressed one is; the code is q = quantize(u)
  by the grid's own rounding, the function that encoded the layer;
* the scales and offsets themselves, as in PEQA / EfficientQAT's end-to-end step (Kim et al.
  2023; Chen et al. 2024), whose derivatives with the codes held are exact: ∂ŵ/∂s = g(q),
  ∂ŵ/∂m = 1.

Forward: ŵ = s·(g(q) + u_c − sg(u_c)) + m with u_c = clamp(u, g(0), g(2^b − 1)), sg =
stop-gradient: the value is the dequantized weight, the gradient for u the straight-through
estimator (s inside the grid's range, 0 outside). Keeping u in grid units (rather than weight
units as in LSQ) means a change of scale moves every weight of its group without flipping a
code, and the learning rate of u reads as "a fraction of a quantization step per step", the
same for every layer. Parameters are rounded to their storage dtype (float16 …) in the forward
pass with a straight-through gradient, so that training sees exactly what will be stored.

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

from ..device import host_kernels
from ..quant import grids
from ..quant.pack import pack, unpack
from ..tensor import CompressedTensor
from . import qat_kernels

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
    "asymz": lambda x, b: x.round().clamp_(0, 2**b - 1),  # at unit scale and zero 0, as asym
    "sym": lambda x, b: x.round().clamp_(-(2 ** (b - 1)), 2 ** (b - 1) - 1),
}


class _FakeQuant(torch.autograd.Function):
    """ŵ = s·g(q(u)) + m with the gradients written out:
    ∂ŵ/∂u = s·1[lo ≤ u ≤ hi],  ∂ŵ/∂s = g(q),  ∂ŵ/∂m = 1.
    Nothing but the inputs is saved; g(q) is recomputed in backward (memory of one weight)."""

    @staticmethod
    def forward(ctx, u: Tensor, s: Tensor, m: Tensor | None, mod: "QATLinear") -> Tensor:
        ctx.save_for_backward(u, s, m)
        ctx.mod = mod
        if mod.fused and host_kernels(u):  # one pass (qat_kernels, host memory), same values
            return qat_kernels.fake_quant_forward(u, s, m, mod.lo, mod.hi)
        out = mod._levels(u).mul_(s)
        if m is not None:
            out.add_(m)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        u, s, m = ctx.saved_tensors
        mod = ctx.mod
        need_u, need_s, need_m, _ = ctx.needs_input_grad
        if mod.fused and host_kernels(u):
            gu, gs, gm = qat_kernels.fake_quant_backward(u, g, s, mod.lo, mod.hi)
            return (gu if need_u else None, gs.view(s.shape) if need_s else None,
                    gm.view(m.shape) if need_m and m is not None else None, None)
        gu = (g * s).masked_fill_((u < mod.lo) | (u > mod.hi), 0.0) if need_u else None
        gs = (mod._levels(u).mul_(g)).sum_to_size(s.shape) if need_s else None
        gm = g.sum_to_size(m.shape) if need_m else None
        return gu, gs, gm, None


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
        # llama.cpp's Q4_0/Q5_0 rule stores signed scales (grid sym_signed): each keeps its sign
        self.register_buffer("scale_sign", torch.where(self.scale.detach() < 0, -1.0, 1.0), persistent=False)
        self.offset = nn.Parameter(ct.data["offset"].float().clone()) if self.asym else None  # (R, G)
        zero = ct.data["zero"].float() if "zero" in self.grid.stored else None
        self.register_buffer("zero", zero, persistent=False)  # (R, G) integers (asymz), held
        unit = self._unit()
        top = torch.tensor(float(2**self.bits - 1))
        self.lo = float(self.grid.dequantize(torch.tensor(0.0), unit, self.bits))
        self.hi = float(self.grid.dequantize(top, unit, self.bits))
        codes = unpack(ct.data["qweight"], self.bits, self.out_features * self.in_features)
        codes = codes.reshape(self.out_features, self.in_features).to(torch.float32)
        self.latent = nn.Parameter(self._init_latent(codes))  # (out, in), grid units
        # the fused one-pass kernels serve closed-form grids on whole consecutive groups, on the CPU
        # (elsewhere the torch path runs: the same values)
        self.fused = bool(self.group) and self.meta["grid"] in _FAST_LEVELS
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    @staticmethod
    def supports(ct: CompressedTensor) -> bool:
        """Grids reconstructed as s·g(q) + m: a float offset, an integer zero point, or neither."""
        return set(grids.GRIDS[ct.meta["grid"]].stored) <= {"scale", "offset", "zero"}

    # ------------------------------------------------------------------ the quantizer
    @staticmethod
    def _unit() -> dict[str, Tensor]:
        return {"scale": torch.ones(()), "offset": torch.zeros(()), "zero": torch.zeros(())}

    def _columns(self, p: Tensor) -> Tensor:
        """(R, G) group parameters → (R, in), one per input column."""
        return p.index_select(1, self.g_idx)

    def _codes(self, x: Tensor) -> Tensor:
        return self.grid.quantize(x.detach(), self._unit(), self.bits)

    def _init_latent(self, codes: Tensor) -> Tensor:
        """Latent u on the stored codes' levels, nudged a quarter step up inside the bin where
        the grid rounds down (the seed grid's floor rule), so that quantize(u) gives them back."""
        with torch.no_grad():
            unit, top = self._unit(), 2**self.bits - 1
            u = self.grid.dequantize(codes, unit, self.bits)
            nb = self.grid.dequantize(torch.where(codes < top, codes + 1, codes - 1), unit, self.bits)
            bad = self._codes(u) != codes
            u = torch.where(bad, u + 0.25 * (nb - u).abs(), u)
            left = int((self._codes(u) != codes).sum())
            if left:
                log.warning("%s: %d of %d codes do not survive re-quantization at init", self.codec, left, codes.numel())
            return u

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

    def _scale(self) -> Tensor:
        """The scales kept at least MIN_SCALE in magnitude, on the side of their stored sign."""
        return (self.scale * self.scale_sign).clamp_min(MIN_SCALE) * self.scale_sign

    def fake_weight(self) -> Tensor:
        """The effective weight (out, in) with straight-through (LSQ) gradients."""
        s = _ste_round_to(self._scale(), self.stored_dtype)
        if self.asym:
            m = _ste_round_to(self.offset, self.stored_dtype)
        else:  # asymz: m = −z·s, exact as z is an integer; its gradient flows to s
            m = -self.zero * s if self.zero is not None else None
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
        codes = self._codes(self.latent).to(torch.uint8)
        data: dict[str, Any] = {"qweight": pack(codes, self.bits),
                                "scale": self._scale().detach().to(self.stored_dtype).contiguous()}
        if self.asym:
            data["offset"] = self.offset.to(self.stored_dtype).contiguous()
        data.update(self.fixed)
        return CompressedTensor(self.codec, data, dict(self.meta))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, grid={self.meta['grid']}"
