"""llama.cpp's K-quant grids (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): two-level scales, fitted per super-block.

A row is cut into super-blocks of 256 weights, each cut into sub-blocks of 16 or 32. A sub-block's
scale (and min) is itself quantized: an integer ``sc`` (``mn``) times the super-block's float16
``d`` (``dmin``). In float32, as ggml and gguf-py dequantize:

======  ====  ==========  ==========================  ==================================  ======
type    bits  sub-block   sub-block scale / min        value of code q                     bpw
======  ====  ==========  ==========================  ==================================  ======
Q2_K    2     16          sc, mn ∈ 0..15 (4 + 4 bits)  (d·sc)·q − (dmin·mn)                2.625
Q3_K    3     16          sc ∈ −32..31 (6 bits)        (d·sc)·(q − 4)                      3.4375
Q4_K    4     32          sc, mn ∈ 0..63 (6 + 6 bits)  (d·sc)·q − (dmin·mn)                4.5
Q5_K    5     32          sc, mn ∈ 0..63 (6 + 6 bits)  (d·sc)·q − (dmin·mn)                5.5
Q6_K    6     16          sc ∈ −128..127 (int8)        (d·sc)·(q − 32)                     6.5625
======  ====  ==========  ==========================  ==================================  ======

So per sub-block (llmpress's group) the grid is affine with scale S = d·sc and offset −dmin·mn
(or zero point 2^(b−1)): GPTQ's column loop and the clipping search use (a, s, z) = (−dmin·mn, S, 0)
or (0, S, 2^(b−1)) as for any affine grid. What is stored is llama.cpp's: ``d`` and ``dmin``
float16 (R, N) for N super-blocks a row, and ``scales`` uint8 (R, N, 16 or 12), the sub-block
scales and mins packed exactly as in ggml's ``block_q*_K`` (so the GGUF writer copies bytes and
``CompressedTensor.nbits`` counts llama.cpp's bits per weight).

Fitting (:meth:`KGrid.fit`, before any code is chosen; GPTQ fits the whole row this way up front):
each sub-block's float scale/min by a shrink search of its range (``range: mse``; ``minmax``: the
full range only), the best one also refitted by least squares on its codes (llama.cpp's make_qkx2 step),
the one of least loss kept (the Hessian-weighted output error for GPTQ/AWQ, squared error for RTN), the super-block's ``d``
(``dmin``) from the largest sub-block scale (min) as llama.cpp does, the integers by rounding,
then each sub-block's integers moved by ±1 where that lowers the loss with the quantized d (scale
and min together with ``mse``; one at a time with ``minmax``, the cheap form AWQ's scale search
calls 20 times a layer). GPTQ and AWQ's final fit use ``mse``; ``quantize -m rtn --range mse``
gives RTN the whole search.
Rows whose width is not a multiple of 256 are refused: llama.cpp itself stores such tensors in
Q5_0/Q5_1/Q8_0 instead (its ``llama-quantize`` fallback), which the ``gguf:q5_0|q5_1|q8_0`` presets give.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..device import host_kernels
from .search_kernel import affine_error
from .grids import GRIDS, PRESETS, Grid, GridSpec, GroupLoss, _nan_min_max, shrink_factors, squared_error

QK_K = 256
_TINY = 2.0**-24  # the smallest positive float16: d never rounds to 0 (S = d·sc must not vanish)


def _f16(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


# ---------------------------------------------------------------------------- scale packing
def _pack_q2(sc: Tensor, mn: Tensor) -> Tensor:
    """(R, N, 16) → (R, N, 16): byte j = sc_j | mn_j << 4."""
    return sc | (mn << 4)


def _unpack_q2(b: Tensor) -> tuple[Tensor, Tensor]:
    return b & 0x0F, b >> 4


def _pack_q3(sc: Tensor, mn: Tensor | None) -> Tensor:
    """16 six-bit values (sc + 32) → 12 bytes: bytes 0..7 the low nibbles of s_j | s_{j+8} << 4,
    bytes 8..11 the high two bits of s_{4i+k} at bits 2i of byte 8 + k."""
    s = sc
    lo = (s[..., :8] & 0x0F) | ((s[..., 8:] & 0x0F) << 4)
    hi = (s >> 4).reshape(*s.shape[:-1], 4, 4)  # [i, k] = s_{4i+k}
    hb = (hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6))
    return torch.cat([lo, hb], -1)


def _unpack_q3(b: Tensor) -> tuple[Tensor, None]:
    lo = torch.cat([b[..., :8] & 0x0F, b[..., :8] >> 4], -1)  # (…, 16)
    hb = b[..., 8:12]
    hi = torch.stack([(hb >> (2 * i)) & 3 for i in range(4)], -2).reshape(*b.shape[:-1], 16)
    return lo | (hi << 4), None


def _pack_q4(sc: Tensor, mn: Tensor) -> Tensor:
    """8 six-bit scales and mins → 12 bytes (ggml's get_scale_min_k4 layout): bytes 0..3 sc_j with
    sc_{j+4}'s bits 4–5 on top, 4..7 the same for the mins, 8..11 the low nibbles of sc_{j+4} | mn_{j+4} << 4."""
    b0 = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    b1 = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    b2 = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    return torch.cat([b0, b1, b2], -1)


def _unpack_q4(b: Tensor) -> tuple[Tensor, Tensor]:
    b0, b1, b2 = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([b0 & 0x3F, (b2 & 0x0F) | ((b0 >> 2) & 0x30)], -1)
    mn = torch.cat([b1 & 0x3F, (b2 >> 4) | ((b1 >> 2) & 0x30)], -1)
    return sc, mn


def _pack_q6(sc: Tensor, mn: Tensor | None) -> Tensor:
    """int8 scales (stored as sc + 128 here) → their two's-complement bytes."""
    return sc ^ 0x80


def _unpack_q6(b: Tensor) -> tuple[Tensor, None]:
    return b ^ 0x80, None


@dataclass(frozen=True)
class KLayout:
    """One K-quant type. Integers are held biased to 0..2^k−1 (``sc_bias`` is subtracted for the
    signed scales of Q3_K and Q6_K)."""

    name: str
    bits: int
    sub: int  # weights per sub-block (llmpress's group size)
    mins: bool  # a float16 dmin and one min a sub-block
    sc_max: int  # largest stored scale integer (biased)
    sc_bias: int  # stored − bias = signed scale integer
    scale_bytes: int  # bytes of packed scales (and mins) a super-block
    pack: Callable[[Tensor, Tensor | None], Tensor]
    unpack: Callable[[Tensor], tuple[Tensor, Tensor | None]]

    @property
    def per_super(self) -> int:
        return QK_K // self.sub

    @property
    def code_zero(self) -> int:
        return 0 if self.mins else 2 ** (self.bits - 1)


LAYOUTS: dict[str, KLayout] = {k.name: k for k in (
    KLayout("q2_k", 2, 16, True, 15, 0, 16, _pack_q2, _unpack_q2),
    KLayout("q3_k", 3, 16, False, 63, 32, 12, _pack_q3, _unpack_q3),
    KLayout("q4_k", 4, 32, True, 63, 0, 12, _pack_q4, _unpack_q4),
    KLayout("q5_k", 5, 32, True, 63, 0, 12, _pack_q4, _unpack_q4),
    KLayout("q6_k", 6, 16, False, 255, 128, 16, _pack_q6, _unpack_q6),
)}


def why_not_shape(layout: KLayout, inp: int) -> str | None:
    if inp % QK_K:
        return (f"rows of {inp} weights are not a multiple of {QK_K}, the {layout.name.upper()} super-block "
                f"(llama.cpp's llama-quantize stores such tensors as Q5_0/Q5_1/Q8_0 instead: use grid "
                f"gguf:q5_0, gguf:q5_1 or gguf:q8_0 for them)")
    return None


# ---------------------------------------------------------------------------- the grid
class KGrid(Grid):
    """A K-quant type as an llmpress grid: codes 0..2^b−1 per group (sub-block) with the effective
    parameters ``scale`` (d·sc) and ``offset`` (−dmin·mn, mins types) in float32; stored as
    llama.cpp's d, dmin and packed scales (:meth:`to_data` / :meth:`group_params`)."""

    static = True  # parameters of a whole super-block are fitted together, before any code

    def __init__(self, layout: KLayout):
        self.layout = layout
        self.name = layout.name
        self.stored = ("d", "dmin", "scales") if layout.mins else ("d", "scales")

    # -- the affine form on effective parameters
    def _offset(self, p: dict[str, Tensor]) -> Tensor:
        return p["offset"] if self.layout.mins else torch.zeros_like(p["scale"])

    def affine(self, p, bits):
        s = p["scale"]
        return self._offset(p), s, torch.full_like(s, float(self.layout.code_zero))

    def quantize(self, w, p, bits):
        a, s, z = self.affine(p, bits)
        return (torch.round((w - a) / s) + z).clamp_(0, 2**bits - 1)

    def dequantize(self, q, p, bits):
        if self.layout.mins:  # ggml: (d·sc)·q − dmin·mn
            return q * p["scale"] + p["offset"]
        return (q - self.layout.code_zero) * p["scale"]  # ggml: (d·sc)·(q − 2^(b−1))

    def params(self, lo, hi, bits, dtype):
        raise NotImplementedError("K-quant parameters are fitted per super-block (KGrid.fit)")

    # -- storage
    def check_shape(self, shape: tuple[int, int] | list[int], spec: GridSpec) -> str | None:
        if spec.range not in ("minmax", "mse"):
            return f"range {spec.range!r}: the {self.layout.name.upper()} fit takes minmax or mse"
        return why_not_shape(self.layout, int(shape[1]))

    def to_data(self, params: dict[str, Tensor], spec: GridSpec) -> dict[str, Tensor]:
        L = self.layout
        R, G = params["scale"].shape[:2]
        n = G // L.per_super

        def ints(k: str) -> Tensor:  # (R, G, 1) → (R, N, per_super) uint8
            return params[k][..., 0].reshape(R, n, L.per_super).to(torch.uint8)

        data = {"d": params["d"][:, :: L.per_super, 0].to(torch.float16).contiguous()}
        if L.mins:
            data["dmin"] = params["dmin"][:, :: L.per_super, 0].to(torch.float16).contiguous()
        data["scales"] = L.pack(ints("sc"), ints("mn") if L.mins else None).contiguous()
        return data

    def stored_shapes(self, out: int, inp: int, bits: int, group_size: int,
                      dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """d (and dmin) (out, N) float16 and the packed scales (out, N, bytes) uint8, N super-blocks a row."""
        L = self.layout
        if bits != L.bits or group_size != L.sub or inp % QK_K:
            raise InputError(f"meta: grid {L.name} needs bits={L.bits}, group_size={L.sub} and rows of a multiple of "
                             f"{QK_K}; got bits={bits}, group_size={group_size}, rows of {inp}")
        n = inp // QK_K
        shapes = {"d": ((out, n), (torch.float16,)), "scales": ((out, n, L.scale_bytes), (torch.uint8,))}
        if L.mins:
            shapes["dmin"] = ((out, n), (torch.float16,))
        return shapes

    def group_params(self, data: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
        """{"scale", "offset"}: (R, G) float32, as gguf-py computes them (d·sc, dmin·mn in float32)."""
        L = self.layout
        sc, mn = L.unpack(data["scales"])
        R = sc.shape[0]
        d = data["d"].to(torch.float32).unsqueeze(-1)  # (R, N, 1)
        p = {"scale": (d * (sc.to(torch.float32) - L.sc_bias)).reshape(R, -1)}
        if L.mins:
            p["offset"] = -(data["dmin"].to(torch.float32).unsqueeze(-1) * mn.to(torch.float32)).reshape(R, -1)
        return p

    # -- fitting
    def fit(self, wg: Tensor, spec: GridSpec, loss: GroupLoss) -> dict[str, Tensor]:
        L = self.layout
        wg = wg.contiguous()
        R, G, S = wg.shape
        if S != L.sub or G % L.per_super or bool(torch.isnan(wg).any()):
            raise InputError(f"{L.name}: groups of {L.sub} filling whole super-blocks of {QK_K} expected; "
                             f"got {G} groups of {S}")
        steps = shrink_factors(spec, spec.mse_steps) if spec.range == "mse" else [1.0]
        s, m = self._fit_float(wg, loss, steps)  # (R, G, 1) each
        p = self._quantize_scales(s, m)
        return self._refine(wg, loss, p, joint=spec.range == "mse")

    def _float_params(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Unquantized sub-block scale and min for the range [lo, hi]: mins types ŵ = q·s + m with
        m = min(lo, 0) ≤ 0 (llama.cpp stores −m ≥ 0); the others (q − 2^(b−1))·s with the extreme on
        the one-sided level (s signed, as Q4_0's rule)."""
        qmax = 2**self.layout.bits - 1
        if self.layout.mins:
            m = lo.clamp(max=0.0)
            s = (hi.clamp(min=0.0) - m) / qmax
            return torch.where(s > 0, s, torch.full_like(s, _TINY)), m
        ext = torch.where(hi.abs() > lo.abs(), hi, lo)
        s = ext / -(2 ** (self.layout.bits - 1))
        return torch.where(s != 0, s, torch.full_like(s, _TINY)), torch.zeros_like(s)

    def _err(self, wg: Tensor, p: dict[str, Tensor]) -> Tensor:
        """ŵ − w (R, G, S) for parameters p, in one compiled pass (a view of a group-major buffer);
        in torch where the weights are not in host memory."""
        R, G, S = wg.shape
        if not host_kernels(wg):
            return (self.dequantize(self.quantize(wg, p, self.layout.bits), p, self.layout.bits) - wg).transpose(0, 1) \
                .contiguous().transpose(0, 1)  # group-major like the compiled buffer (``_score`` reads it so)
        buf = torch.empty(G, R, S)
        a, s, z = (t.expand(R, G, 1)[..., 0].to(torch.float32).contiguous().numpy() for t in self.affine(p, self.layout.bits))
        affine_error(wg.numpy(), a, s, z, np.float32(2**self.layout.bits - 1), buf.numpy())
        return buf.transpose(0, 1)

    @staticmethod
    def _score(loss: GroupLoss, err: Tensor) -> Tensor:
        """loss(err) (R, G); the squared error summed on the contiguous group-major buffer (3× faster)."""
        if loss is squared_error:
            g = err.transpose(0, 1)  # (G, R, S), contiguous
            return (g * g).sum(-1).T
        return loss(err)

    def _least_squares(self, wg: Tensor, s: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        """The scale (and min ≤ 0) of least squared error for the codes (s, m) give, as llama.cpp's
        make_qkx2_quants refits after each candidate; groups where it is undefined keep (s, m)."""
        L = self.layout
        x = self.quantize(wg, {"scale": s, "offset": m}, L.bits) - L.code_zero  # (R, G, S)
        n = float(wg.shape[-1])
        sx, sw = x.sum(-1, keepdim=True), wg.sum(-1, keepdim=True)
        sxx, sxw = (x * x).sum(-1, keepdim=True), (x * wg).sum(-1, keepdim=True)
        if L.mins:
            det = n * sxx - sx * sx
            s2 = (n * sxw - sx * sw) / det.clamp_min(1e-30)
            m2 = (sw - s2 * sx) / n
            pos = m2 > 0  # llama.cpp's mins are ≤ 0: fit the scale alone through 0
            s2 = torch.where(pos, sxw / sxx.clamp_min(1e-30), s2)
            m2 = torch.where(pos, torch.zeros_like(m2), m2)
            ok = (det > 0) & (s2 > 0)
            return torch.where(ok, s2, s), torch.where(ok, m2, m)
        s2 = sxw / sxx.clamp_min(1e-30)
        ok = (sxx > 0) & (s2 != 0)
        return torch.where(ok, s2, s), m

    def _fit_float(self, wg: Tensor, loss: GroupLoss, steps: list[float]) -> tuple[Tensor, Tensor]:
        """Per sub-block: each shrunk range and its least-squares refit, the one of least loss."""
        lo, hi = _nan_min_max(wg)  # (R, G, 1)
        best = None
        for f in [*steps, None]:  # the shrunk ranges, then (None) the winner's least-squares refit
            s, m = self._float_params(lo * f, hi * f) if f is not None else self._least_squares(wg, best[1], best[2])
            e = self._score(loss, self._err(wg, {"scale": s, "offset": m}))  # (R, G)
            if best is None:
                best = (e, s, m)
                continue
            better = (e < best[0]).unsqueeze(-1)
            best = (torch.minimum(e, best[0]), torch.where(better, s, best[1]), torch.where(better, m, best[2]))
        return best[1], best[2]

    def _quantize_scales(self, s: Tensor, m: Tensor) -> dict[str, Tensor]:
        """Float sub-block scales/mins (R, G, 1) → d, dmin (float16 values), integers sc, mn (biased),
        all (R, G, 1), and the effective scale/offset they give."""
        L = self.layout
        R, G, _ = s.shape
        sb = s.reshape(R, G // L.per_super, L.per_super)  # (R, N, per)
        if L.mins:
            d = _f16(sb.amax(-1, keepdim=True) / L.sc_max).clamp_min(_TINY)
            sc = torch.round(sb / d).clamp_(1, L.sc_max)
            mb = -m.reshape(sb.shape)
            dmin = _f16(mb.amax(-1, keepdim=True) / L.sc_max)
            mn = torch.where(dmin > 0, torch.round(mb / dmin.clamp_min(_TINY)), torch.zeros_like(mb)).clamp_(0, L.sc_max)
        else:  # the sub-block scale of largest magnitude on the most negative integer, as llama.cpp
            ext = torch.gather(sb, -1, sb.abs().argmax(-1, keepdim=True))
            d = _f16(ext / -L.sc_bias)
            d = torch.where(d.abs() >= _TINY, d, torch.full_like(d, _TINY))
            sc = torch.round(sb / d).clamp_(-L.sc_bias, L.sc_max - L.sc_bias)
            sc = torch.where(sc == 0, torch.ones_like(sc), sc) + L.sc_bias  # S = 0 would lose the sub-block
            dmin, mn = torch.zeros_like(d), torch.zeros_like(sc)
        per = L.per_super

        def groups(t: Tensor) -> Tensor:  # (R, N, per or 1) → (R, G, 1)
            return t.expand(R, G // per, per).reshape(R, G, 1)

        return self._effective({"d": groups(d), "dmin": groups(dmin), "sc": groups(sc), "mn": groups(mn)})

    def _effective(self, p: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the effective scale/offset to integer parameters, in gguf-py's float32 arithmetic."""
        p = dict(p)
        p["scale"] = p["d"] * (p["sc"] - self.layout.sc_bias)
        if self.layout.mins:
            p["offset"] = -(p["dmin"] * p["mn"])
        return p

    def _refine(self, wg: Tensor, loss: GroupLoss, p: dict[str, Tensor], joint: bool) -> dict[str, Tensor]:
        """Move each sub-block's integers by −1, 0 or +1 (``joint``: scale and min together, else one
        then the other) where the loss with the quantized d/dmin is lower: rounding them one by one
        ignores how scale and min interact."""
        L = self.layout
        lo_sc = 1 if L.mins else 0
        best_e = self._score(loss, self._err(wg, p))
        if joint:
            moves = [(a, b) for a in (-1, 0, 1) for b in ((-1, 0, 1) if L.mins else (0,)) if (a, b) != (0, 0)]
        else:
            moves = [(-1, 0), (1, 0)] + ([(0, -1), (0, 1)] if L.mins else [])
        for a, b in moves:
            sc = (p["sc"] + a).clamp(lo_sc, L.sc_max)
            if not L.mins:
                sc = torch.where(sc == L.sc_bias, p["sc"], sc)  # never a zero scale
            cand = self._effective({**p, "sc": sc, "mn": (p["mn"] + b).clamp(0, L.sc_max)})
            e = self._score(loss, self._err(wg, cand))
            better = (e < best_e).unsqueeze(-1)
            best_e = torch.minimum(e, best_e)
            p = {k: torch.where(better, cand[k], p[k]) for k in p}
        return p


for _layout in LAYOUTS.values():
    GRIDS[_layout.name] = KGrid(_layout)
    PRESETS[f"gguf:{_layout.name}"] = {"bits": _layout.bits, "group_size": _layout.sub,
                                       "scale_dtype": "float16", "grid": _layout.name}


def kquant_bpw(name: str) -> float:
    """Bits per weight of a K-quant type as llama.cpp stores it (codes + d/dmin + packed scales)."""
    L = LAYOUTS[name]
    return L.bits + (16 * (2 if L.mins else 1) + 8 * L.scale_bytes) / QK_K


__all__ = ["LAYOUTS", "KGrid", "KLayout", "QK_K", "kquant_bpw", "why_not_shape"]
