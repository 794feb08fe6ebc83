"""The stored form shared by every quantization codec, and the codec base class.

All methods (RTN, GPTQ, AWQ, HQQ) differ only in *how* they choose codes and group
parameters; they store the same thing, so they share one decode and one QuantLinear:

=============  ======================  ==================================================
key            dtype, shape            meaning
=============  ======================  ==================================================
``qweight``    uint8 (ceil(n·b/8),)    codes of W (out, in), row-major, bit-packed
``scale``      scale_dtype (R, G)      per-group scale (R = out, or 1 per tensor)
``offset``     scale_dtype (R, G)      per-group offset (asym grid only)
``g_idx``      int16/int32 (in,)       group of each input column (GPTQ act-order only)
``in_scale``   float16 (in,)           AWQ scale s, W ≈ Ŵ·diag(1/s) (only where not folded)
=============  ======================  ==================================================

Everything listed is counted by ``CompressedTensor.nbits``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..stored import Layout, check_ct, meta_choice, meta_int, meta_shape
from ..tensor import Codec, CompressedTensor, Stats
from . import grids
from .grids import GridSpec
from .pack import PACKERS, pack, packed_bytes, unpack

VERSION = 1


@dataclass
class QWeight:
    """A quantized (out, in) matrix before packing."""

    codes: Tensor  # (out, in) integer-valued
    params: dict[str, Tensor]  # each (R, G, 1) float32, already rounded to the storage dtype
    g_idx: Tensor | None = None  # (in,) int64, only when groups are not consecutive columns
    in_scale: Tensor | None = None  # (in,) float32, AWQ

    def to_ct(self, codec: str, spec: GridSpec, extra_meta: dict[str, Any] | None = None,
              dtype: str = "float32") -> CompressedTensor:
        out, inp = self.codes.shape
        data = {"qweight": pack(self.codes.to(torch.uint8), spec.bits)}
        data.update(grids.GRIDS[spec.grid_name].to_data(self.params, spec))
        if self.g_idx is not None:
            data["g_idx"] = self.g_idx.to(torch.int16 if inp <= 32767 else torch.int32)
        if self.in_scale is not None:
            data["in_scale"] = self.in_scale.to(torch.float16)
        meta = {"shape": [out, inp], "dtype": dtype, "version": VERSION, **spec.to_meta(), **(extra_meta or {})}
        return CompressedTensor(codec=codec, data=data, meta=meta)


def column_params(data: dict[str, Tensor], meta: dict[str, Any], g_idx: Tensor | None = None) -> dict[str, Tensor]:
    """Group parameters expanded to one column each: {name: (R, in) float32}."""
    inp = int(meta["shape"][1])
    if g_idx is None:
        g_idx = data["g_idx"].long() if "g_idx" in data else grids.group_index(inp, int(meta["group_size"]))
    grid = grids.GRIDS[meta["grid"]]
    return {k: v.index_select(1, g_idx.to(v.device)) for k, v in grid.group_params(data, meta).items()}


def dequantize_ct(ct: CompressedTensor) -> Tensor:
    """The effective float32 weight (out, in) a quantized CompressedTensor stands for."""
    check_ct(ct)
    out, inp = (int(d) for d in ct.meta["shape"])
    bits = int(ct.meta["bits"])
    codes = unpack(ct.data["qweight"], bits, out * inp).reshape(out, inp).to(torch.float32)
    w = grids.GRIDS[ct.meta["grid"]].dequantize(codes, column_params(ct.data, ct.meta), bits)
    if "in_scale" in ct.data:
        w = w / ct.data["in_scale"].to(torch.float32)
    return w


def check_weight(w: Tensor, name: str | None = None) -> Tensor:
    """A float32 (out, in) matrix with finite values, or a clear error naming the tensor."""
    what = f"tensor {name!r}" if name else "weight"
    if w.dim() != 2:
        raise InputError(f"{what}: quantization needs a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise InputError(f"{what}: expected a floating-point weight, got {w.dtype}")
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise InputError(f"{what} has {int(bad.sum())} NaN/Inf values of {w.numel()}; refusing to quantize it")
    return w.to(torch.float32)


class QuantCodec(Codec):
    """Base of the quantization codecs: parse params, check the weight, quantize, store.

    Subclasses set ``options`` (their own params with defaults), may set ``grid_defaults``
    (GridSpec fields the method defaults to otherwise than :class:`GridSpec`, e.g. its grid;
    a ``grid`` or ``sym`` given by the user replaces the default grid) and implement
    :meth:`quantize`; decode and the inference module are shared.
    """

    def parse(self, params: dict[str, Any]) -> tuple[GridSpec, dict[str, Any], str | None]:
        defaults = dict(self.grid_defaults)
        if "grid" in params or "sym" in params:  # the user chose the grid
            defaults.pop("grid", None)
        params = {**defaults, **params}
        tname = params.pop("name", None)
        spec, rest = GridSpec.parse(params)
        unknown = sorted(set(rest) - set(self.options))
        if unknown:
            known = sorted({*GridSpec.__dataclass_fields__, *self.options})
            raise InputError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return spec, {**self.options, **rest}, tname

    def check_params(self, shape: tuple[int, int], params: dict[str, Any]) -> None:
        self.parse(dict(params))

    def why_not_shape(self, shape: tuple[int, int], params: dict[str, Any]) -> str | None:
        """Why an (out, in) weight cannot be quantized with ``params`` (e.g. a K-quant grid on rows
        not a multiple of 256), or None; the runner asks before any work."""
        spec, _, _ = self.parse(dict(params))
        return grids.GRIDS[spec.grid_name].check_shape(shape, spec)

    def encode(self, w: Tensor, stats: Stats | None = None, **params: Any) -> CompressedTensor:
        spec, opts, tname = self.parse(params)
        dtype = str(w.dtype).removeprefix("torch.")
        w = check_weight(w, tname)
        why = grids.GRIDS[spec.grid_name].check_shape(tuple(w.shape), spec)
        if why is not None:
            raise InputError(f"{tname or 'weight'} {tuple(w.shape)}: {why}")
        if self.needs_stats and stats is None:
            raise InputError(f"{self.name} needs calibration statistics for {tname or 'this weight'}")
        qw = self.quantize(w, stats, spec, **opts)
        return qw.to_ct(self.name, spec, self.meta(opts), dtype=dtype)

    def meta(self, opts: dict[str, Any]) -> dict[str, Any]:
        return dict(opts)

    def quantize(self, w: Tensor, stats: Stats | None, spec: GridSpec, **opts: Any) -> QWeight:
        raise NotImplementedError

    def decode(self, ct: CompressedTensor) -> Tensor:
        return dequantize_ct(ct)

    def stored_shapes(self, meta: dict[str, Any]) -> tuple[Layout, Layout]:
        """The tensors ``meta`` implies (required, optional): see the table at the top."""
        out, inp = meta_shape(meta)
        if "version" in meta and meta_int(meta, "version", 1, 1 << 30) > VERSION:
            raise InputError(f"meta version {meta['version']}: this llmpress reads quantized tensors up to version {VERSION}")
        bits = meta_choice(meta, "bits", PACKERS)
        gs = meta_int(meta, "group_size", -1)
        grid = grids.GRIDS[meta_choice(meta, "grid", grids.GRIDS)]
        dtype = grids.SCALE_DTYPES[meta_choice(meta, "scale_dtype", grids.SCALE_DTYPES, "float16")]
        req: Layout = {"qweight": ((packed_bytes(out * inp, bits),), (torch.uint8,))}
        req.update(grid.stored_shapes(out, inp, bits, gs, dtype))
        opt: Layout = {"g_idx": ((inp,), (torch.int16, torch.int32)), "in_scale": ((inp,), (torch.float16,))}
        return req, opt

    def check_values(self, ct: CompressedTensor) -> None:
        """The stored values an index is read with: every column's group exists."""
        if "g_idx" in ct.data:
            g, n = ct.data["g_idx"], grids.num_groups(int(ct.meta["shape"][1]), int(ct.meta["group_size"]))
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n):
                raise InputError(f"stored 'g_idx' names groups outside 0..{n - 1}")

    def module(self, ct: CompressedTensor, bias: Tensor | None) -> torch.nn.Module:
        from .linear import QuantLinear

        return QuantLinear.from_ct(ct, bias)

    def state_names(self, ct: CompressedTensor) -> tuple[dict[str, str], str]:
        """Where :meth:`module` keeps each stored tensor: ({data key: state-dict name}, the bias's
        name). QuantLinear holds the stored tensors as buffers of the same names."""
        return {k: k for k in ct.data}, "bias"


def rtn_qweight(w: Tensor, spec: GridSpec, loss: grids.GroupLoss | None = None) -> QWeight:
    """Round to nearest on the grid, groups fitted by ``spec.range``."""
    wg = grids.group_weights(w, spec.group_size)  # (R, G, S)
    p = grids.fit(wg, spec, loss)
    codes = grids.ungroup(grids.quantize(wg, p, spec), w.shape)
    return QWeight(codes=codes, params=p)
