"""The shared shape of every low-rank codec: transform, truncate, fold Σ, un-transform.

A low-rank codec stores W (m, n) ≈ U V with U = U_k Σ_k^½ (m, k) and V = Σ_k^½ V_kᵀ (k, n):
k(m + n) numbers instead of m·n. Activation-aware methods minimise ‖(W − W')S‖ for a right
factor S that stands for the calibration activations (whitening: S Sᵀ = X Xᵀ; ASVD: a diagonal
scale); they take the SVD of W·S and un-transform the right factor, V ← Σ_k^½ V_kᵀ S⁻¹.

A layer where the chosen k has k ≥ mn/(m + n) saves nothing: it is stored dense, and the
CompressedTensor says so (``meta["dense"] = True``) so that callers report it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmpress.tensor import Codec, CompressedTensor, Stats

from ..errors import DivergedError, InputError
from ..stored import FLOATS, Layout, check_ct, meta_int, meta_shape
from .allocate import check_energy, check_ratio, saves
from .linear import LowRankLinear

log = logging.getLogger(__name__)

FACTOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@dataclass
class RightTransform:
    """S in ‖(W − W')S‖: ``cholesky`` (S lower triangular, (n, n)), ``eigh`` (S = Q diag(r)),
    or ``diag`` (S = diag(r))."""

    kind: str
    r: Tensor  # (n, n) lower-triangular S for cholesky; (n,) scales for eigh / diag
    q: Tensor | None = None  # (n, n) eigenvectors for eigh

    def apply(self, w: Tensor) -> Tensor:
        """W S, (m, n)."""
        if self.kind == "cholesky":
            return w @ self.r
        if self.kind == "eigh":
            return (w @ self.q) * self.r
        return w * self.r

    def unapply(self, b: Tensor) -> Tensor:
        """B S⁻¹, (k, n), without forming S⁻¹ where a solve does it."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.r, b, upper=False, left=False)
        if self.kind == "eigh":
            return (b / self.r) @ self.q.T
        return b / self.r


class LowRankCodec(Codec):
    """Base of ``svd``, ``rsvd``, ``whiten``, ``asvd``: subclasses give ``transform``.

    Params (from a recipe rule): at most one of ``rank`` (int), ``ratio`` (fraction of the layer's
    parameters kept, in (0, 1); default 0.8), ``energy`` (fraction of Σσ² kept, in (0, 1]);
    ``solver`` (``exact`` | ``randomized``), ``oversample``, ``niter``, ``crossover`` (randomized
    only, see ``svd.truncated_svd``);
    ``factor_dtype`` (``float32`` | ``float16`` | ``bfloat16``; default the weight's dtype);
    plus the subclass's own (``extra``).
    """

    name = "lowrank"
    solver = "exact"
    compute_dtype = torch.float32
    extra: dict[str, Any] = {}

    def transform(self, w: Tensor, stats: Stats | None, **extra: Any) -> RightTransform | None:
        return None

    # -- parameters -----------------------------------------------------------------------
    def parse(self, m: int, n: int, params: dict[str, Any]) -> dict[str, Any]:
        known = {"rank", "ratio", "energy", "solver", "oversample", "niter", "crossover", "factor_dtype", *self.extra}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InputError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        p = {k: v for k, v in params.items() if v is not None}
        given = [k for k in ("rank", "ratio", "energy") if k in p]
        if len(given) > 1:
            raise InputError(f"{self.name}: give one of rank, ratio, energy (got {', '.join(given)})")
        if "rank" in p:
            k = p["rank"]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
                raise InputError(f"{self.name}: rank {k!r} must be an integer in 1..min(m, n) = {min(m, n)} "
                                 f"for a ({m}, {n}) weight")
        elif "energy" in p:
            p["energy"] = check_energy(p["energy"])
        else:
            p["ratio"] = check_ratio(p.get("ratio", 0.8))
        if "factor_dtype" in p and p["factor_dtype"] not in FACTOR_DTYPES:
            raise InputError(f"{self.name}: factor_dtype must be one of {', '.join(FACTOR_DTYPES)}; got {p['factor_dtype']!r}")
        p.setdefault("solver", self.solver)
        for k, v in self.extra.items():
            p.setdefault(k, v)
        return p

    def check_params(self, shape: tuple[int, int], params: dict[str, Any]) -> None:
        self.parse(*shape, dict(params))

    # -- the codec verbs ------------------------------------------------------------------
    def encode(self, w: Tensor, stats: Stats | None = None, **params: Any) -> CompressedTensor:
        from .svd import CROSSOVER, NITER, truncated_svd

        if w.ndim != 2:
            raise InputError(f"{self.name}: a low-rank codec needs a 2-D weight, got shape {tuple(w.shape)}")
        m, n = w.shape
        p = self.parse(m, n, params)
        extra = {k: p[k] for k in self.extra}
        t = self.transform(w, stats, **extra)
        a = w.to(self.compute_dtype if t is None else torch.float64)
        if t is not None:
            a = t.apply(a)  # (m, n) = W S
        tr = truncated_svd(a, rank=p.get("rank"), ratio=p.get("ratio"), energy=p.get("energy"),
                           solver=p["solver"], oversample=p.get("oversample"), niter=int(p.get("niter", NITER)),
                           crossover=float(p.get("crossover", CROSSOVER)))
        k = tr.rank
        fdt = FACTOR_DTYPES[p["factor_dtype"]] if "factor_dtype" in p else w.dtype
        meta: dict[str, Any] = {"shape": [m, n], "dtype": dtype_name(w.dtype), "rank": k, "method": self.name, "solver": tr.solver,
                                "energy_kept": round(tr.energy_kept / tr.energy_total, 6) if tr.energy_total > 0 else 1.0}
        if not saves(m, n, k):
            log.warning("%s: rank %d of a (%d, %d) weight stores %d ≥ %d numbers: saves nothing, left dense",
                        self.name, k, m, n, k * (m + n), m * n)
            return CompressedTensor(self.name, {"weight": w.detach().clone()}, {**meta, "dense": True})
        root = tr.s.clamp_min(0).sqrt()  # Σ^½, folded half into each factor
        u = tr.u * root  # (m, k)
        v = root[:, None] * tr.vh  # (k, n)
        if t is not None:
            v = t.unapply(v)  # (k, n) = Σ^½ V_kᵀ S⁻¹
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            raise DivergedError(f"{self.name}: non-finite factors for a ({m}, {n}) weight")
        return CompressedTensor(self.name, {"U": u.to(fdt).contiguous(), "V": v.to(fdt).contiguous()}, meta)

    def stored_shapes(self, meta: dict[str, Any]) -> tuple[Layout, Layout]:
        """The factors U (m, k) and V (k, n) of the meta's rank, or the dense (m, n) weight."""
        m, n = meta_shape(meta)
        if meta.get("dense"):
            return {"weight": ((m, n), FLOATS)}, {}
        k = meta_int(meta, "rank", 1, min(m, n))
        return {"U": ((m, k), FLOATS), "V": ((k, n), FLOATS)}, {}

    def decode(self, ct: CompressedTensor) -> Tensor:
        check_ct(ct)
        if ct.meta.get("dense"):
            return ct.data["weight"].float()
        return ct.data["U"].float() @ ct.data["V"].float()  # (m, k) @ (k, n)

    def module(self, ct: CompressedTensor, bias: Tensor | None) -> nn.Module:
        check_ct(ct)  # sizes below come from the meta: it must agree with the stored tensors
        if ct.meta.get("dense"):
            m, n = ct.meta["shape"]
            lin = nn.Linear(n, m, bias=bias is not None, dtype=ct.data["weight"].dtype)
            with torch.no_grad():
                lin.weight.copy_(ct.data["weight"])
                if bias is not None:
                    lin.bias.copy_(bias)
            return lin
        return LowRankLinear.from_factors(ct.data["U"], ct.data["V"], bias)

    def state_names(self, ct: CompressedTensor) -> tuple[dict[str, str], str]:
        """Where :meth:`module` keeps each stored tensor: ({data key: state-dict name}, the bias's name)."""
        if ct.meta.get("dense"):
            return {"weight": "weight"}, "bias"
        return {"U": "up.weight", "V": "down.weight"}, "up.bias"
