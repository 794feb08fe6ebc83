"""GPTQ (Frantar et al., 2022): quantize one column at a time and push each column's error
onto the columns not yet quantized, through the inverse Hessian of the layer's output error.

For a linear layer with inputs X (in, T), the loss ‖(W − Ŵ)X‖² has Hessian H = 2XXᵀ (we use
Stats.gram = Σ x xᵀ; the factor does not matter). Optimal Brain Quantization quantizes column
q and updates the rest by  δ = −(w_q − quant(w_q)) / [H⁻¹]_qq · [H⁻¹]_{q,:}.  GPTQ makes this
fast and stable:

* fixed column order (or ``act_order``: by decreasing diag(H), the most-used inputs first);
* the rows of H⁻¹ needed are those of its upper Cholesky factor, ``Hinv = chol(H⁻¹)ᵀ``, after
  dampening H += damp·mean(diag H)·I;
* lazy batch updates: inside a block of B columns errors go into Err, and the columns right of
  the block are updated once per block with a matrix product  W[:, i2:] −= Err · Hinv[block, i2:].

Groups: with ``group_size > 0`` each group's scale/offset is fitted when its first column is
reached, from the weights as updated so far (blocks are aligned to whole groups). With
``static_groups`` all group parameters are fitted up front from the original W, so that with
act-order the groups stay consecutive columns; without it, act-order groups follow the
permuted order and the group of each column is stored (``g_idx``).

Everything runs where W and H are (CPU or CUDA). The column loop has three forms, a table by
name (``LOOPS``): ``numba`` (compiled, affine grids, CPU only), ``torch`` (the same arithmetic
as the compiled loop in torch ops, affine grids, any device: CUDA's loop) and ``grid`` (through
the grid's own quantize/dequantize: codebook grids, and the reference). ``auto`` picks numba on
the CPU and torch elsewhere for affine grids, grid for the others; all give the same codes (tested).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..device import host_kernels
from ..tensor import Stats, register
from . import grids
from .codec import QuantCodec, QWeight
from .grids import GridSpec
from .gptq_kernel import quantize_columns

log = logging.getLogger(__name__)


def inverse_hessian_factor(H: Tensor, damp: float, fresh: Callable[[], Tensor] | None = None) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H), in float32 (as in the paper's
    code; 3–4× faster than float64 on CPU). Raises the dampening ×10 (up to 4 times) if H is not
    numerically positive definite. Each try factors a new copy of H (``fresh()``, default
    ``H.clone()``) in place — Cholesky, inverse and Cholesky again in the one (in, in) array, so an
    8B model's down_proj needs one 822 MB array beside H, not four."""
    fresh = fresh or H.clone
    info = torch.empty((), dtype=torch.int32, device=H.device)
    lam = None
    for attempt in range(5):
        A = fresh()
        if lam is None:
            lam = damp * torch.diag(A).mean()
        A.diagonal().add_(lam)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if int(info) == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if int(info) == 0:
                return A
        del A
        log.warning("GPTQ: H + %.3g·I is not positive definite; raising the dampening", float(lam))
        lam = lam * 10 if lam > 0 else torch.tensor(1e-6, dtype=H.dtype, device=H.device)
    raise InputError("GPTQ: the Hessian stays singular even with strong dampening")


RUN = 16  # columns whose errors are pushed one by one (_columns); 8/16/32/64/whole block: 46/45/60/87/76 ms on a 1536×576 layer


AffineCols = tuple[Tensor, Tensor, Tensor]  # (a, s, z), each (out, run): ŵ = (q − z)·s + a


def _run_numba(W1: Tensor, Hinv1: Tensor, aff: AffineCols, pc: dict[str, Tensor], spec: GridSpec, r0: int, r1: int,
               Q1: Tensor, Err1: Tensor) -> None:
    """Columns r0..r1−1 through the compiled loop (host memory only)."""
    a, s, z = (t.to(torch.float32).contiguous().numpy() for t in aff)
    quantize_columns(W1.numpy(), Hinv1.numpy(), a, s, z, np.float32(2**spec.bits - 1), r0, r1, Q1.numpy(), Err1.numpy())


def _run_torch(W1: Tensor, Hinv1: Tensor, aff: AffineCols, pc: dict[str, Tensor], spec: GridSpec, r0: int, r1: int,
               Q1: Tensor, Err1: Tensor) -> None:
    """Columns r0..r1−1 in torch ops on W1's device, in the compiled loop's order of float32
    operations (so the codes are the same): q = clamp(round((w − a)/s) + z, 0, qmax),
    e = (w − ((q − z)·s + a)) / [H⁻¹]_ii, then e·[H⁻¹]_{i, i+1..r1−1} off the run's later columns.
    No value leaves the device (no host synchronisation inside the loop)."""
    a, s, z = (t.to(torch.float32) for t in aff)  # (out, run)
    qmax = float(2**spec.bits - 1)
    for i in range(r0, r1):
        j = i - r0
        w = W1[:, i]  # (out,)
        q = torch.round((w - a[:, j]) / s[:, j], out=Q1[:, i]).add_(z[:, j]).clamp_(0.0, qmax)  # written in place
        e = torch.div(w - ((q - z[:, j]) * s[:, j] + a[:, j]), Hinv1[i, i], out=Err1[:, i])
        if i + 1 < r1:
            W1[:, i + 1 : r1] -= e.unsqueeze(1) * Hinv1[i, i + 1 : r1]  # (out, 1) · (r1 − i − 1,)


def _run_grid(W1: Tensor, Hinv1: Tensor, aff: AffineCols | None, pc: dict[str, Tensor], spec: GridSpec, r0: int,
              r1: int, Q1: Tensor, Err1: Tensor) -> None:
    """Columns r0..r1−1 through the grid's own quantize/dequantize (any grid; the reference)."""
    for i in range(r0, r1):
        p = {k: v[:, i - r0 : i - r0 + 1] for k, v in pc.items()}  # (out, 1)
        w = W1[:, i : i + 1]  # (out, 1)
        q = grids.quantize(w, p, spec)
        Q1[:, i : i + 1] = q
        err = (w - grids.dequantize(q, p, spec)) / Hinv1[i, i]  # (out, 1)
        W1[:, i:r1] -= err * Hinv1[i : i + 1, i:r1]
        Err1[:, i : i + 1] = err


ColumnLoop = Callable[[Tensor, Tensor, "AffineCols | None", dict, GridSpec, int, int, Tensor, Tensor], None]
# name -> (the loop, whether it needs the grid's affine form, whether it needs host memory)
LOOPS: dict[str, tuple[ColumnLoop, bool, bool]] = {
    "numba": (_run_numba, True, True),
    "torch": (_run_torch, True, False),
    "grid": (_run_grid, False, False),
}


def choose_loop(loop: str, affine: bool, device: torch.device) -> str:
    """The column loop to run: ``auto`` → for affine grids numba on the CPU, torch elsewhere (and
    where ``LLMPRESS_TORCH_PATHS=1``); grid for codebook grids. A named loop that cannot serve this
    grid or device is refused."""
    if loop == "auto":
        return ("numba" if host_kernels(device) else "torch") if affine else "grid"
    if loop not in LOOPS:
        raise InputError(f"gptq: unknown column loop {loop!r}; known: auto, {', '.join(LOOPS)}")
    _, needs_affine, needs_host = LOOPS[loop]
    if needs_affine and not affine:
        raise InputError(f"gptq: the {loop} column loop serves affine grids only")
    if needs_host and device.type != "cpu":
        raise InputError(f"gptq: the {loop} column loop runs on the CPU only (weights are on {device})")
    return loop


def _columns(W1: Tensor, Hinv1: Tensor, pcols: dict[str, Tensor], spec: GridSpec, c0: int, c1: int,
             Q1: Tensor, Err1: Tensor, loop: str) -> None:
    """Quantize columns c0..c1−1 of a block in order (OBQ step): code column i, then move its
    error (w − ŵ)/[H⁻¹]_ii onto the block's columns right of it through row i of H⁻¹'s factor.
    W1, Q1, Err1: (out, B); Hinv1: (B, B); pcols: grid parameters of columns c0..c1−1 (out, c1−c0);
    ``loop``: a name in ``LOOPS`` (see :func:`choose_loop`).

    The lazy batch update once more, one level down: columns go in runs of ``RUN``; inside a run
    each error reaches the run's later columns at once, and the block's columns after the run
    receive the run's errors in one product. The same sums in another order, but most of the
    work becomes a matrix product (4-bit g64, act-order, one thread: 76 → 45 ms on a 1536×576
    layer, 93 → 69 ms on a 576×1536 one)."""
    run, needs_affine, _ = LOOPS[loop]
    aff = grids.GRIDS[spec.grid_name].affine(pcols, spec.bits) if needs_affine else None
    B = W1.shape[1]
    for r0 in range(c0, c1, RUN):
        r1 = min(r0 + RUN, c1)
        sl = slice(r0 - c0, r1 - c0)
        run(W1, Hinv1, None if aff is None else tuple(t[:, sl] for t in aff), {k: v[:, sl] for k, v in pcols.items()},
            spec, r0, r1, Q1, Err1)
        if r1 < B:
            W1[:, r1:] -= Err1[:, r0:r1] @ Hinv1[r0:r1, r1:]  # (out, run) @ (run, B − r1)


@dataclass
class Hessian:
    """H made ready for GPTQ. It depends on H, ``damp`` and ``act_order`` only, so the layers
    fed the same input (q/k/v, gate/up) share one: :meth:`GPTQ.quantize` keeps it in the
    input's ``Stats.derived`` (SmolLM2: 4 factorisations a block instead of 7)."""

    H: Tensor  # (in, in) float32, original order; inputs that were always zero get H_ii = 1
    dead: Tensor  # (in,) bool: those inputs (any weight works there; GPTQ zeroes them)
    perm: Tensor | None  # (in,) act-order column order (decreasing diag H), or None
    Hinv: Tensor  # (in, in) upper Cholesky factor of (H_perm + λI)⁻¹, float32

    def to(self, device: torch.device) -> "Hessian":
        """This Hessian on ``device`` (itself when it is there already)."""
        if self.H.device == device:
            return self
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Hessian(H=mv(self.H), dead=mv(self.dead), perm=mv(self.perm), Hinv=mv(self.Hinv))

    @classmethod
    def of(cls, stats: Stats, damp: float, act_order: bool) -> "Hessian":
        """The Hessian of ``stats``' Gram matrix, prepared once and kept in ``stats.derived`` for every
        linear that reads the same input."""
        key = ("gptq.hessian", float(damp), bool(act_order))
        hs = stats.derived.get(key)
        if hs is None:
            hs = stats.derived[key] = cls.prepare(stats.gram, float(damp), bool(act_order))
        return hs

    @classmethod
    def prepare(cls, H: Tensor, damp: float, act_order: bool) -> "Hessian":
        H = H.to(torch.float32, copy=True)  # one copy, whatever H's dtype
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
        # H_perm is made for each try of the factorisation (one gather, no intermediate copy)
        fresh = H.clone if perm is None else (lambda: H[perm.unsqueeze(1), perm])
        return cls(H=H, dead=dead, perm=perm, Hinv=inverse_hessian_factor(H, damp, fresh))


def gptq_quantize(W: Tensor, H: Tensor | Hessian, spec: GridSpec, *, damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, block_size: int = 128, loop: str = "auto") -> QWeight:
    """Quantize W (out, in) against H = Σ x xᵀ (in, in), or against a prepared :class:`Hessian`
    (made with the same ``damp`` and ``act_order``). Returns codes in the original column order,
    on W's device. ``loop``: the column loop (``auto``, or a name in ``LOOPS``)."""
    hs = H if isinstance(H, Hessian) else Hessian.prepare(H.to(W.device), damp, act_order)
    if (hs.perm is not None) != act_order:
        raise InputError("gptq: the prepared Hessian was made for another act_order")
    dev = W.device
    loop = choose_loop(loop, grids.GRIDS[spec.grid_name].is_affine, dev)
    hs = hs.to(dev)
    W = W.to(torch.float32).clone()
    out, cols = W.shape
    gs = spec.group_size
    grouped = 0 < gs < cols
    static_groups = static_groups or grids.GRIDS[spec.grid_name].static  # K-quants: super-blocks fitted up front
    W[:, hs.dead] = 0.0  # inputs that were always zero: any value works, pick 0

    # Parameters fitted up front: per tensor, per channel, or static groups (original order).
    # A clipping search (range: mse, mse2) weighs each group's error by its block of H: the output error.
    fixed = None
    if not grouped or static_groups:
        loss = grids.group_hessian_loss(hs.H, gs) if spec.searched else None
        fixed = grids.fit(grids.group_weights(W, gs), spec, loss)  # (R, G, 1)

    perm = hs.perm
    if perm is not None:
        W = W[:, perm]
    col_group = grids.group_index(cols, gs if grouped else -1)  # group of each original column (host)
    if perm is not None and static_groups:
        col_group = col_group[perm.cpu()]  # permuted column j keeps its original group
    col_group_dev = col_group.to(dev)
    n_groups = grids.num_groups(cols, gs if grouped else -1)

    Hinv = hs.Hinv  # (in, in) upper, float32
    Hfit = None  # dynamic groups' clipping search: H in the permuted order
    if fixed is None and spec.searched:
        Hfit = hs.H if perm is None else hs.H[perm][:, perm]

    codes = torch.zeros(out, cols, dtype=torch.float32, device=dev)
    dyn = None if fixed is not None else {k: torch.zeros(out, n_groups, 1, device=dev) for k in grids.GRIDS[spec.grid_name].stored}
    params = fixed if fixed is not None else dyn
    B = max(gs, (block_size // gs) * gs) if grouped else block_size  # blocks hold whole groups

    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()  # (out, B)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        # runs of columns whose parameters are known before their first column is quantized:
        # the whole block, or with dynamic groups one group (fitted from the weights as updated)
        for c0 in range(i1, i2, gs) if dyn is not None else (i1,):
            c1 = min(c0 + gs, i2) if dyn is not None else i2
            if dyn is not None:
                loss = None if Hfit is None else grids.group_hessian_loss(Hfit[c0:c1, c0:c1], -1)
                p = grids.fit(W1[:, c0 - i1 : c1 - i1].unsqueeze(1), spec, loss)  # (out, 1, 1)
                for k in dyn:
                    dyn[k][:, int(col_group[c0])] = p[k][:, 0]
            pcols = {k: v[:, col_group_dev[c0:c1], 0].expand(out, c1 - c0) for k, v in params.items()}  # (out, c1-c0)
            _columns(W1, Hinv1, pcols, spec, c0 - i1, c1 - i1, Q1, Err1, loop)
        codes[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if dyn is not None:
            g_idx = col_group_dev[inv]  # original column → its permuted-order group
    return QWeight(codes=codes, params=params, g_idx=g_idx)


@register("gptq")
class GPTQ(QuantCodec):
    """``method: gptq`` — params: the grid's (bits, group_size, sym, ...) plus ``damp`` (0.1),
    ``act_order`` (true), ``static_groups`` (true), ``block_size`` (128).

    Defaults differ from the paper's damp 0.01 / natural order on measurement (``bench/quant.py``,
    KL on two held-out domains): act-order + static groups + damp 0.1 lowered KL at 3 and 4 bits —
    the stronger dampening keeps GPTQ from fitting its calibration domain. Static groups keep
    groups consecutive, so no g_idx is stored.

    The grid defaults to ``asymz`` (an integer zero point, 0 exactly on the grid) with each
    group's range chosen by a clipping search (``range: mse``) whose loss is the group's output
    error err·H_gg·errᵀ, not its weight error (``grid``/``sym``/``range`` given by the user win).
    Against the float-offset min–max grid it lowers KL most at 2 and 3 bits, where a group's
    range decides most of its error (``bench/quant.py``, beside llm-compressor's GPTQ)."""

    needs_stats = True
    gram = True
    gram_float32 = True  # reads the Gram matrix in float32 only (Hessian.prepare)
    options = {"damp": 0.1, "act_order": True, "static_groups": True, "block_size": 128}
    grid_defaults = {"grid": "asymz", "range": "mse"}

    def quantize(self, w: Tensor, stats: Stats | None, spec: GridSpec, *, damp: float, act_order: bool,
                 static_groups: bool, block_size: int) -> QWeight:
        if stats is None or stats.gram is None:
            raise InputError("gptq needs the Gram matrix of the layer inputs (Stats.gram)")
        if stats.gram.shape != (w.shape[1], w.shape[1]):
            raise InputError(f"gptq: Gram matrix {tuple(stats.gram.shape)} does not fit weight {tuple(w.shape)}")
        if not 0 <= float(damp) < 1:
            raise InputError(f"gptq: damp must be in [0, 1); got {damp!r}")
        if int(block_size) < 1:
            raise InputError("gptq: block_size must be ≥ 1")
        hs = Hessian.of(stats, float(damp), bool(act_order))
        return gptq_quantize(w, hs, spec, damp=float(damp), act_order=bool(act_order),
                             static_groups=bool(static_groups), block_size=int(block_size))
