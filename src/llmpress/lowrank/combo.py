"""Low-rank together with quantization, both ways round, selectable per layer in recipes.

``<base>+q`` (``svd+q``, ``rsvd+q``, ``whiten+q``, ``asvd+q``): factorize, then quantize the
factors. W ≈ U V with the base low-rank codec; V (k, n) is quantized by the quant codec on the
layer's own inputs; then, when the Gram matrix H = X Xᵀ is known, U is refitted to the quantized
V̂ by least squares on the outputs, U = W H V̂ᵀ (V̂ H V̂ᵀ)⁻¹ (it minimises ‖(W − U V̂)X‖), and
quantized with the statistics of its own input V̂x (Gram V̂ H V̂ᵀ). Params: the base's (``rank`` |
``ratio`` | ``energy``, ``damp``, ``alpha`` …), ``quant`` (codec name, default ``rtn``), and the
quant codec's own (``bits``, ``group_size`` …)::

    - match: "mlp"
      method: whiten+q
      ratio: 0.6
      quant: rtn
      bits: 8
      group_size: 64

``lqer``: quantize, then add a low-rank correction of the quantization error (LQER, Zhang et al.
2024; EoRA, Liu et al. 2024). Q = Q(W) by the quant codec (default ``gptq``); the error
E = W − Q is approximated where the outputs see it: the SVD of E S with S Sᵀ = H (whitening, as
in ``whiten.py``), truncated to ``rank`` (or ``ratio`` of the layer's m·n spent on the factors),
un-whitened. W ≈ Q + U V; inference runs y = Q x + U (V x). Params: ``quant``, ``rank`` (default
16) | ``ratio``, ``factor_dtype`` (default ``float16``), ``damp``, plus the quant codec's.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from llmpress.tensor import Codec, CompressedTensor, Stats, get_codec, register

from ..errors import InputError
from ..stored import FLOATS, Layout, check_ct, meta_dict, meta_int, meta_shape, nested_layout
from .allocate import rank_for_ratio
from .base import FACTOR_DTYPES, LowRankCodec, dtype_name
from .linear import LowRankLinear
from .svd import truncated_svd
from .whiten import whitening

log = logging.getLogger(__name__)

LOWRANK_KEYS = {"rank", "ratio", "energy", "solver", "oversample", "niter", "crossover", "damp", "alpha"}


def nest(prefix: str, ct: CompressedTensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An inner CompressedTensor as ``{prefix.key: tensor}`` and ``{"codec": .., **meta}``."""
    return {f"{prefix}.{k}": v for k, v in ct.data.items()}, {"codec": ct.codec, **ct.meta}


def unnest(prefix: str, data: dict[str, Tensor], meta: dict[str, Any]) -> CompressedTensor:
    inner = dict(meta)
    codec = inner.pop("codec")
    start = prefix + "."
    return CompressedTensor(codec, {k[len(start):]: v for k, v in data.items() if k.startswith(start)}, inner)


def nested_names(prefix: str, ct: CompressedTensor, at: str) -> tuple[dict[str, str], str]:
    """The state-dict names of the inner CompressedTensor ``prefix`` of ``ct`` once its module is
    the submodule ``at`` (``"up."``, ``""``): ({"prefix.key": "at" + name}, its bias's name)."""
    from llmpress.io.folder import module_state_names

    names, bias = module_state_names(unnest(prefix, ct.data, ct.meta[prefix]))
    return {f"{prefix}.{k}": at + v for k, v in names.items()}, at + bias


def _quant(name: str, owner: str) -> Any:
    codec = get_codec(name)
    if codec.lossless or isinstance(codec, (LowRankCodec, FactorThenQuant, LQER)):
        raise InputError(f"{owner}: quant must name a quantization codec; got {name!r}")
    return codec


def _input_stats(v_hat: Tensor, stats: Stats) -> Stats:
    """Stats of z = V̂ x from those of x: Gram V̂ H V̂ᵀ exactly; mean |z| approximated by √mean z²."""
    v = v_hat.double()
    g = v @ stats.gram @ v.T  # (k, k)
    sq = torch.diagonal(g) / max(stats.n, 1)
    return Stats(gram=g, abs_mean=sq.clamp_min(0).sqrt(), sq_mean=sq, n=stats.n)


def refit_left(w: Tensor, v_hat: Tensor, gram: Tensor, damp: float = 1e-6) -> Tensor:
    """argmin_U ‖(W − U V̂)X‖_F = W H V̂ᵀ (V̂ H V̂ᵀ + λI)⁻¹, (m, k)."""
    v, h = v_hat.double(), gram.double()
    a = v @ h @ v.T  # (k, k)
    a = a + damp * float(torch.diagonal(a).mean().clamp_min(1e-30)) * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    b = w.double() @ h @ v.T  # (m, k)
    return torch.linalg.solve(a, b.T).T  # a symmetric: U = b a⁻¹


class FactorThenQuant(Codec):
    """``<base>+q``: a low-rank codec's factors, each quantized by a quant codec."""

    base = "svd"

    def _split(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str, Codec]:
        """(the base's params, the quant codec's, its name, the quant codec)."""
        lr = {k: v for k, v in params.items() if k in LOWRANK_KEYS}
        qp = {k: v for k, v in params.items() if k not in LOWRANK_KEYS and k != "quant"}
        qname = params.get("quant", "rtn")
        return lr, qp, qname, _quant(qname, self.name)

    def check_params(self, shape: tuple[int, int], params: dict[str, Any]) -> None:
        lr, qp, _, quant = self._split(params)
        get_codec(self.base).check_params(shape, lr)
        quant.check_params(shape, qp)

    def encode(self, w: Tensor, stats: Stats | None = None, **params: Any) -> CompressedTensor:
        lr, qp, qname, quant = self._split(params)
        if quant.needs_stats and stats is None:
            raise InputError(f"{self.name}: quant codec {qname!r} needs calibration statistics; use whiten+q")
        if quant.gram and (stats is None or stats.gram is None):
            raise InputError(f"{self.name}: quant codec {qname!r} needs the Gram matrix; use whiten+q")
        base = get_codec(self.base)
        lct = base.encode(w, stats, **lr, factor_dtype="float32")
        m, n = w.shape
        meta: dict[str, Any] = {"shape": [m, n], "dtype": dtype_name(w.dtype), "base": self.base,
                                "rank": lct.meta["rank"], "energy_kept": lct.meta["energy_kept"]}
        if lct.meta.get("dense"):  # the rank saves nothing: quantize W itself, and say so
            d, qm = nest("W", quant.encode(w, stats, **qp))
            return CompressedTensor(self.name, d, {**meta, "dense": True, "W": qm})
        u, v = lct.data["U"], lct.data["V"]
        vct = quant.encode(v, stats, **qp)
        v_hat = quant.decode(vct)  # (k, n)
        ustats = None
        if stats is not None and stats.gram is not None:
            u = refit_left(w, v_hat, stats.gram).float()
            ustats = _input_stats(v_hat, stats)
        uct = quant.encode(u, ustats, **qp)
        du, mu = nest("U", uct)
        dv, mv = nest("V", vct)
        return CompressedTensor(self.name, {**du, **dv}, {**meta, "U": mu, "V": mv})

    def stored_shapes(self, meta: dict[str, Any]) -> tuple[Layout, Layout]:
        """The nested quantized factors: U (m, k) as ``U.*``, V (k, n) as ``V.*``; or W (m, n) as ``W.*``."""
        m, n = meta_shape(meta)
        if meta.get("dense"):
            return nested_layout("W", meta_dict(meta, "W"), (m, n))
        k = meta_int(meta, "rank", 1, min(m, n))
        (ru, ou), (rv, ov) = (nested_layout("U", meta_dict(meta, "U"), (m, k)),
                              nested_layout("V", meta_dict(meta, "V"), (k, n)))
        return {**ru, **rv}, {**ou, **ov}

    def decode(self, ct: CompressedTensor) -> Tensor:
        check_ct(ct)
        if ct.meta.get("dense"):
            return get_codec(ct.meta["W"]["codec"]).decode(unnest("W", ct.data, ct.meta["W"]))
        u = unnest("U", ct.data, ct.meta["U"])
        v = unnest("V", ct.data, ct.meta["V"])
        return get_codec(u.codec).decode(u) @ get_codec(v.codec).decode(v)  # (m, k) @ (k, n)

    def module(self, ct: CompressedTensor, bias: Tensor | None) -> nn.Module:
        from llmpress.io.folder import compressed_module

        check_ct(ct)
        if ct.meta.get("dense"):
            return compressed_module(unnest("W", ct.data, ct.meta["W"]), bias)
        m, n = ct.meta["shape"]
        down = compressed_module(unnest("V", ct.data, ct.meta["V"]), None)
        up = compressed_module(unnest("U", ct.data, ct.meta["U"]), bias)
        return LowRankLinear(down, up, int(ct.meta["rank"]), n, m)

    def state_names(self, ct: CompressedTensor) -> tuple[dict[str, str], str]:
        """Where :meth:`module` keeps each stored tensor: the factors' modules are ``down`` (V) and
        ``up`` (U, with the bias); a dense fallback is the inner codec's module itself."""
        if ct.meta.get("dense"):
            return nested_names("W", ct, "")
        down, _ = nested_names("V", ct, "down.")
        up, bias = nested_names("U", ct, "up.")
        return {**down, **up}, bias


for _base in ("svd", "rsvd", "whiten", "asvd"):
    _cls = type(f"{_base.capitalize()}ThenQuant", (FactorThenQuant,), {
        "base": _base,
        "needs_stats": get_codec(_base).needs_stats,
        "gram": get_codec(_base).gram,
        "__doc__": f"``{_base}+q``: factorize with ``{_base}``, then quantize both factors.",
    })
    register(f"{_base}+q")(_cls)


class CorrectedLinear(nn.Module):
    """y = Q x + U (V x): a quantized linear plus its low-rank error correction."""

    def __init__(self, base: nn.Module, correction: LowRankLinear):
        super().__init__()
        self.base = base
        self.correction = correction
        self.in_features = correction.in_features
        self.out_features = correction.out_features

    def forward(self, x: Tensor) -> Tensor:  # (..., in) → (..., out)
        return self.base(x) + self.correction(x)

    @property
    def weight(self) -> Tensor:
        return self.base.weight.float() + self.correction.weight


@register("lqer")
class LQER(Codec):
    """Quantize (default ``gptq``), then add a whitened low-rank correction of the error."""

    needs_stats = True
    gram = True

    @staticmethod
    def _parse(shape: tuple[int, int], params: dict[str, Any]) -> tuple[Codec, dict[str, Any], int, str, float]:
        """(the quant codec, its params, the correction's rank, factor dtype name, damp), checked."""
        p = dict(params)
        quant = _quant(p.pop("quant", "gptq"), "lqer")
        rank, ratio = p.pop("rank", None), p.pop("ratio", None)
        fdt_name = p.pop("factor_dtype", "float16")
        damp = float(p.pop("damp", 1e-4))
        if fdt_name not in FACTOR_DTYPES:
            raise InputError(f"lqer: factor_dtype must be one of {', '.join(FACTOR_DTYPES)}; got {fdt_name!r}")
        m, n = shape
        if rank is not None and ratio is not None:
            raise InputError("lqer: give one of rank, ratio")
        k = rank_for_ratio(m, n, ratio) if ratio is not None else (16 if rank is None else rank)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
            raise InputError(f"lqer: rank {k!r} must be an integer in 1..min(m, n) = {min(m, n)} for a ({m}, {n}) weight")
        quant.check_params(shape, p)
        return quant, p, k, fdt_name, damp

    def check_params(self, shape: tuple[int, int], params: dict[str, Any]) -> None:
        self._parse(shape, params)

    def encode(self, w: Tensor, stats: Stats | None = None, **params: Any) -> CompressedTensor:
        quant, p, k, fdt_name, damp = self._parse(tuple(w.shape), params)
        if stats is None or stats.gram is None:
            raise InputError("lqer needs calibration statistics with a Gram matrix (run it through the pipeline)")
        m, n = w.shape
        qct = quant.encode(w, stats, **p)
        e = w.double() - quant.decode(qct).double()  # (m, n) quantization error
        t = whitening(stats.gram, stats.n, damp)
        tr = truncated_svd(t.apply(e), rank=k)
        root = tr.s.clamp_min(0).sqrt()
        u = tr.u * root  # (m, k)
        v = t.unapply(root[:, None] * tr.vh)  # (k, n)
        fdt = FACTOR_DTYPES[fdt_name]
        dq, mq = nest("q", qct)
        meta = {"shape": [m, n], "dtype": dtype_name(w.dtype), "rank": k, "q": mq,
                "err_kept": round(tr.energy_kept / tr.energy_total, 6) if tr.energy_total > 0 else 1.0}
        return CompressedTensor("lqer", {**dq, "U": u.to(fdt).contiguous(), "V": v.to(fdt).contiguous()}, meta)

    def stored_shapes(self, meta: dict[str, Any]) -> tuple[Layout, Layout]:
        """The nested quantized weight (m, n) as ``q.*`` and the correction's U (m, k), V (k, n)."""
        m, n = meta_shape(meta)
        k = meta_int(meta, "rank", 1, min(m, n))
        rq, oq = nested_layout("q", meta_dict(meta, "q"), (m, n))
        return {**rq, "U": ((m, k), FLOATS), "V": ((k, n), FLOATS)}, oq

    def decode(self, ct: CompressedTensor) -> Tensor:
        check_ct(ct)
        q = unnest("q", ct.data, ct.meta["q"])
        return get_codec(q.codec).decode(q) + ct.data["U"].float() @ ct.data["V"].float()

    def module(self, ct: CompressedTensor, bias: Tensor | None) -> nn.Module:
        from llmpress.io.folder import compressed_module

        check_ct(ct)
        base = compressed_module(unnest("q", ct.data, ct.meta["q"]), bias)
        return CorrectedLinear(base, LowRankLinear.from_factors(ct.data["U"], ct.data["V"], None))

    def state_names(self, ct: CompressedTensor) -> tuple[dict[str, str], str]:
        """Where :meth:`module` keeps each stored tensor: Q is ``base`` (with the bias), the
        correction's factors ``correction.up`` / ``correction.down``."""
        base, bias = nested_names("q", ct, "base.")
        return {**base, "U": "correction.up.weight", "V": "correction.down.weight"}, bias
