"""Packed forwards for QuantLinear: torch's int4 and int8 CPU kernels, chosen by layout.

One table, :data:`KERNELS`, keyed by bit width; each entry says whether a layer's layout fits
(and if not, why), turns the stored form into the kernel's own buffers, gives the codes back,
and runs the product. A layer no entry accepts keeps the dequantize-per-forward path.

**The affine form.** Every grid with an ``affine`` form (asym, asymz, sym) reconstructs
ŵ = (q − z)·s + a per group. Both kernels centre the codes on a constant c and take the rest
as a per-group term: ŵ = (q − c)·s + t with t = (c − z)·s + a, formed in float32 (exact for
asymz and sym, whose c − z is a small integer and s an fp16 value; for asym, t = c·s + m is exact
while s and m are within 2¹³ of each other, else one float32 rounding off).

* ``int4``: ``aten._weight_int4pack_mm_for_cpu`` (tinygemm's convention, c = 8, one (scale, t)
  pair per group of 32/64/128/256 input columns). Per-channel and per-tensor layers use the
  largest of those group sizes that divides the input width, repeating their parameters.
  Act-order layers (``g_idx``) whose groups are all full are served by permuting the input
  columns once (x[:, perm] at each call); AWQ's unfolded ``in_scale`` divides x instead of W.
* ``int8``: ``aten._weight_int8pack_mm`` (int8 weight, one scale per output row), for 8-bit
  per-channel and per-tensor layers. c is the row's own zero point where q − z fits int8 (sym,
  most asymz rows), else 128; the remaining t becomes (Σₖ xₖ)·t, added in float32.

**Numerics.** On x86 both kernels are vectorised for bfloat16 activations only: float32 and
float16 activations are accepted but take a scalar loop, several times slower than a dense float32
product (the reason to pack at all is to be faster). So both compute in bf16:
activations, scales and t rounded to bf16 (relative 2⁻⁹), products summed in float32, the output
rounded to bf16 (int8's float32 term added after). For bf16 activations that is the tolerance the
dequantize path has anyway (it rounds the weight to bf16); for float32 activations it is not
float32's, so a layer sends float32 activations through a kernel only when told to
(``QuantLinear.bf16_compute``, :func:`set_bf16_compute`; ``llmpress generate`` does unless
``--exact``) and otherwise dequantizes from the kernel's own codes, the same float32 result as
before. The tests hold the kernels to an emulation of exactly these roundings.

**One copy.** Once packed, a layer holds the kernel's codes (``_kq``, the same bytes as
``qweight``) and drops ``qweight``; ``state_dict`` rebuilds ``qweight`` from ``_kq`` bit for
bit. The int4 layout depends on the CPU (torch packs 64-row blocks on AVX-512, 32 on AVX2);
:func:`int4_layout` recognises it by packing a probe once, and a layout it does not recognise
leaves the int4 kernel unused rather than guessed.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import Tensor

from ..errors import InputError
from .pack import unpack

if TYPE_CHECKING:
    from .linear import QuantLinear

log = logging.getLogger(__name__)

ENV = "LLMPRESS_KERNEL"  # "auto" (default) or "dequant": force the dequantize-per-forward path
COMPUTE = torch.bfloat16
INT4_GROUPS = (256, 128, 64, 32)
ROWS = 256  # rows packed at a time: a multiple of every int4 row block, small transients


def _aten(name: str) -> Callable[..., Tensor] | None:
    return getattr(torch.ops.aten, name, None)


# ---------------------------------------------------------------------------- the layer's affine form
def stored_codes(layer: "QuantLinear", r0: int = 0, r1: int | None = None) -> Tensor:
    """The codes of rows r0..r1 (default: all) (rows, in) uint8 from the stored ``qweight``."""
    k = layer.in_features
    r1 = layer.out_features if r1 is None else r1
    if (r0 * k * layer.bits) % 8 or (r1 * k * layer.bits) % 8:  # rows not byte-aligned: unpack from the start
        return unpack(layer.qweight, layer.bits, r1 * k)[r0 * k:].reshape(r1 - r0, k)
    lo = r0 * k * layer.bits // 8
    return unpack(layer.qweight[lo:], layer.bits, (r1 - r0) * k).reshape(r1 - r0, k)


def affine_rows(layer: "QuantLinear") -> tuple[Tensor, Tensor, Tensor] | None:
    """(a, s, z) each (R, G) float32 with ŵ = (q − z)·s + a, or None for codebook grids."""
    p = layer.grid.group_params({k: getattr(layer, k) for k in layer.grid.stored}, layer.meta)
    aff = layer.grid.affine(p, layer.bits)
    if aff is None:
        return None
    return tuple(t.expand_as(p["scale"]) for t in aff)  # type: ignore[return-value]


def _group_perm(layer: "QuantLinear", gs: int) -> Tensor | None:
    """For act-order layers: the column order that makes every group consecutive, or None when
    the columns are already in order. Raises ValueError when groups are not all ``gs`` wide."""
    if getattr(layer, "g_idx", None) is None:
        return None
    g = layer.g_idx.long()
    counts = torch.bincount(g, minlength=int(g.max()) + 1)
    if not bool((counts == gs).all()):
        raise InputError("act-order groups of unequal width")
    return torch.argsort(g, stable=True)


# ---------------------------------------------------------------------------- int4 layout
@dataclass(frozen=True)
class Int4Layout:
    """How torch packs (N, K) int4 codes for its CPU kernel: rows in blocks of ``block``; for each
    input column k a block holds block/2 bytes. In a full block byte j holds row j (low nibble)
    and row j + block/2 (high) when ``halves``, rows 2j and 2j + 1 otherwise; a last, partial
    block always holds pairs."""

    block: int
    halves: bool

    def codes(self, packed: Tensor, n: int, k: int) -> Tensor:
        """(N, K/2) uint8 kernel bytes → (N, K) uint8 codes."""
        flat = packed.reshape(-1)
        full = n // self.block
        nfull = full * self.block * k // 2
        parts = []
        if full:
            b = flat[:nfull].view(full, k, self.block // 2)  # (NB, K, B/2)
            lo, hi = b & 15, b >> 4
            rows = torch.cat([lo, hi], -1) if self.halves else torch.stack([lo, hi], -1).reshape(full, k, self.block)
            parts.append(rows.permute(0, 2, 1).reshape(full * self.block, k))  # (NB·B, K)
        rest = n - full * self.block
        if rest:
            b = flat[nfull:].view(k, rest // 2)  # (K, rest/2) pairs of rows
            parts.append(torch.stack([b & 15, b >> 4], -1).reshape(k, rest).T)
        return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


@lru_cache(maxsize=1)
def int4_layout() -> Int4Layout | None:
    """The layout this torch build packs int4 weights in, recognised from a probe, or None."""
    convert = _aten("_convert_weight_to_int4pack_for_cpu")
    if convert is None or _aten("_weight_int4pack_mm_for_cpu") is None:
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (208, 6), generator=gen, dtype=torch.int32)  # 3·64 + 16 rows: full and partial blocks
    try:
        packed = convert(probe, 1)
    except RuntimeError as e:  # pragma: no cover - a build without the CPU kernel
        log.info("int4 CPU kernel unavailable: %s", e)
        return None
    for block in (64, 32, 16, 8):
        for halves in (True, False):
            lay = Int4Layout(block, halves)
            if torch.equal(lay.codes(packed, 208, 6).to(torch.int32), probe):
                return lay
    log.warning("torch's int4 CPU packing is in a layout llmpress does not recognise; int4 layers dequantize instead")
    return None


# ---------------------------------------------------------------------------- the table
class Kernel:
    """One packed forward. ``reason`` says why a layer does not fit (None: it fits); ``pack``
    registers the kernel's buffers on the layer (names starting with ``_k``) from the stored
    form; ``codes`` gives the stored codes back from them; ``forward`` maps (M, in) → (M, out)."""

    name = ""
    buffers: tuple[str, ...] = ()
    native: frozenset[torch.dtype] = frozenset({COMPUTE})  # activation dtypes run as they are

    def reason(self, layer: "QuantLinear") -> str | None:
        raise NotImplementedError

    def pack(self, layer: "QuantLinear") -> None:
        raise NotImplementedError

    def codes(self, layer: "QuantLinear") -> Tensor:
        raise NotImplementedError

    def forward(self, layer: "QuantLinear", x: Tensor) -> Tensor:
        raise NotImplementedError

    def valid(self, layer: "QuantLinear") -> bool:
        """The kernel's buffers are all there, on the CPU, in the dtypes it made them in."""
        for k, dtype in layer._kdtypes.items():  # the ones it made (optional ones may be None)
            b = layer._buffers.get(k)
            if b is None or b.device.type != "cpu" or b.dtype != dtype:
                return False
        return True


def _common_reason(layer: "QuantLinear", bits: int) -> str | None:
    if layer.bits != bits:
        return f"{layer.bits}-bit codes"
    if layer.qweight.device.type != "cpu":
        return f"weights on {layer.qweight.device.type}"
    if affine_rows(layer) is None:
        return f"grid {layer.meta['grid']} has no affine form"
    return None


class Int4(Kernel):
    name = "int4"
    buffers = ("_kq", "_ksz", "_kperm")

    def group(self, layer: "QuantLinear") -> int | str:
        """The kernel's group size for this layer, or why there is none."""
        k, gs = layer.in_features, int(layer.meta["group_size"])
        if 0 < gs < k:
            if gs not in INT4_GROUPS:
                return f"group size {gs} (the kernel takes {', '.join(map(str, INT4_GROUPS))})"
            return gs if k % gs == 0 else f"a ragged last group ({k} columns, groups of {gs})"
        for g in INT4_GROUPS:  # one group per row or per tensor: repeat it over kernel groups
            if k % g == 0:
                return g
        return f"in_features {k} is not a multiple of 32"

    def reason(self, layer):
        why = _common_reason(layer, 4)
        if why:
            return why
        if int4_layout() is None:
            return "torch's int4 CPU kernel is missing or its layout unknown"
        if layer.out_features % 16:
            return f"out_features {layer.out_features} is not a multiple of 16"
        gs = self.group(layer)
        if isinstance(gs, str):
            return gs
        try:
            _group_perm(layer, gs)
        except ValueError as e:
            return str(e)
        return None

    def pack(self, layer):
        gs = self.group(layer)
        assert isinstance(gs, int)
        n, k = layer.out_features, layer.in_features
        perm = _group_perm(layer, gs)
        convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        kq = torch.empty(n, k // 2, dtype=torch.uint8)  # (N, K/2): row blocks are independent, pack a few at a time
        for r0 in range(0, n, ROWS):
            r1 = min(n, r0 + ROWS)
            codes = stored_codes(layer, r0, r1).to(torch.int32)
            kq[r0:r1] = convert((codes if perm is None else codes[:, perm]).contiguous(), 1)
        a, s, z = affine_rows(layer)  # each (R, G)
        t = (8.0 - z) * s + a
        g_kernel = k // gs
        s, t = (v.expand(n, -1) for v in (s, t))  # per-tensor: R = 1
        if s.shape[1] != g_kernel:  # per channel / per tensor: one group repeated
            s, t = (v.expand(n, g_kernel) for v in (s[:, :1], t[:, :1]))
        sz = torch.stack([s, t], -1).transpose(0, 1).to(COMPUTE).contiguous()  # (G, N, 2)
        layer._set_kernel_buffers(self, {
            "_kq": kq,
            "_ksz": sz,
            "_kperm": perm,
        }, {"gs": gs})

    def codes(self, layer):
        c = int4_layout().codes(layer._kq, layer.out_features, layer.in_features)  # type: ignore[union-attr]
        if layer._kperm is not None:
            c = torch.empty_like(c).index_copy_(1, layer._kperm, c)  # back to the stored column order
        return c

    def forward(self, layer, x):
        b = layer._buffers  # the hot path: plain dict lookups, not nn.Module attribute lookups
        if b["_kperm"] is not None:
            x = x.index_select(-1, b["_kperm"])
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(COMPUTE).contiguous(), b["_kq"], layer._kinfo["gs"], b["_ksz"])


class Int8(Kernel):
    name = "int8"
    buffers = ("_kq", "_ks", "_kt", "_kc")

    def reason(self, layer):
        why = _common_reason(layer, 8)
        if why:
            return why
        if _aten("_weight_int8pack_mm") is None:
            return "torch has no int8 kernel"
        gs = int(layer.meta["group_size"])
        if 0 < gs < layer.in_features or getattr(layer, "g_idx", None) is not None:
            return "grouped 8-bit codes (the kernel takes one scale per row)"
        return None

    def pack(self, layer):
        n = layer.out_features
        a, s, z = (v.expand(n, 1)[:, 0] for v in affine_rows(layer))  # (N,)
        q = stored_codes(layer).to(torch.int16)  # (N, K)
        lo, hi = q.amin(1).float(), q.amax(1).float()
        fits = (z == torch.round(z)) & (lo - z >= -128) & (hi - z <= 127)
        c = torch.where(fits, z, torch.full_like(z, 128.0))  # the row's centre
        t = (c - z) * s + a  # (N,) what the centre leaves over, zero where c = z and a = 0
        layer._set_kernel_buffers(self, {
            "_kq": (q - c.to(torch.int16)[:, None]).to(torch.int8),  # (N, K)
            "_ks": s.to(COMPUTE).contiguous(),
            "_kt": t.contiguous() if bool((t != 0).any()) else None,
            "_kc": c.to(torch.int16),  # (N,) to give the codes back
        }, {})

    def codes(self, layer):
        return (layer._kq.to(torch.int16) + layer._kc[:, None]).to(torch.uint8)

    def forward(self, layer, x):
        b = layer._buffers
        y = torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE).contiguous(), b["_kq"], b["_ks"])
        if b["_kt"] is not None:
            y = y.to(torch.float32) + x.to(torch.float32).sum(-1, keepdim=True) * b["_kt"]
        return y


# bits -> kernel: the dispatch table. A layer whose bits are not here, or whose layout the
# entry refuses, dequantizes at each forward.
KERNELS: dict[int, Kernel] = {4: Int4(), 8: Int8()}


_UNPACKED = [0]  # > 0 inside ``unpacked()``


@contextmanager
def unpacked() -> Iterator[None]:
    """QuantLinears built inside keep the stored form (no kernel packing): for a caller that
    decodes each layer once (:func:`llmpress.quant.linear.decode_once`), packing is wasted work."""
    _UNPACKED[0] += 1
    try:
        yield
    finally:
        _UNPACKED[0] -= 1


def choose(layer: "QuantLinear") -> tuple[Kernel | None, str]:
    """The kernel for a layer and a word on why (the kernel's name, or the reason for none)."""
    if os.environ.get(ENV, "auto").lower() == "dequant":
        return None, f"{ENV}=dequant"
    if _UNPACKED[0]:
        return None, "decoded once (kernels.unpacked)"
    kern = KERNELS.get(layer.bits)
    if kern is None:
        return None, f"no kernel for {layer.bits}-bit codes"
    why = kern.reason(layer)
    return (None, why) if why else (kern, kern.name)


# ---------------------------------------------------------------------------- model-level helpers
def quant_layers(model: torch.nn.Module) -> list["QuantLinear"]:
    from .linear import QuantLinear

    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def prepare(model: torch.nn.Module) -> dict[str, int]:
    """Choose (and pack) every QuantLinear's forward now instead of at its first call; returns
    how many layers took each path ({"int4": 210} or {"dequant": 4, ...})."""
    counts: dict[str, int] = {}
    for m in quant_layers(model):
        name = m.prepare()
        counts[name] = counts.get(name, 0) + 1
    return counts


def set_bf16_compute(model: torch.nn.Module, on: bool = True) -> int:
    """Let float32/float16 activations take the packed kernels (computing in bf16, see the
    module docstring) in every QuantLinear of ``model``; returns how many layers it set."""
    layers = quant_layers(model)
    for m in layers:
        m.bf16_compute = bool(on)
    return len(layers)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once (tied
    embeddings share one)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())
