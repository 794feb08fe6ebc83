"""CompressedTensor, the Codec base class and the codec registry.

Every method in llmpress turns one weight tensor into a :class:`CompressedTensor`:
named tensors (``data``) plus a small ``meta`` dict, with one honest number, the bits it
stores (:meth:`CompressedTensor.nbits`). Methods are codecs registered by name; recipes
and the CLI look them up with :func:`get_codec`, never through if-chains.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from .errors import InputError, NotFoundError

META_VERSION = 1


@dataclass
class CompressedTensor:
    """One compressed weight: stored tensors plus metadata.

    ``data`` holds everything that must be stored to decode (packed integer codes,
    scales, zero points, factors, coded byte planes). ``meta`` holds small scalars and
    lists (codec name, original shape and dtype, bits, group size, version).
    """

    codec: str
    data: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbits(self) -> int:
        """Bits stored: every element of every tensor in ``data`` plus the JSON meta."""
        tensor_bits = sum(t.numel() * t.element_size() * 8 for t in self.data.values())
        return tensor_bits + 8 * len(self.meta_json().encode())

    def numel(self) -> int:
        """Number of weights this tensor stands for (from the original shape)."""
        n = 1
        for d in self.meta["shape"]:
            n *= int(d)
        return n

    def bpw(self) -> float:
        """Bits per weight, everything stored counted."""
        return self.nbits() / max(1, self.numel())

    def meta_json(self) -> str:
        return json.dumps({"codec": self.codec, **self.meta}, sort_keys=True, separators=(",", ":"))

    def to_state(self, prefix: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Flatten to safetensors entries ``{prefix}.{key}`` and one metadata string."""
        tensors = {f"{prefix}.{k}": v.contiguous() for k, v in self.data.items()}
        return tensors, {prefix: self.meta_json()}

    @classmethod
    def from_state(cls, prefix: str, tensors: dict[str, Tensor], meta_json: str) -> "CompressedTensor":
        meta = json.loads(meta_json)
        codec = meta.pop("codec")
        start = prefix + "."
        data = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
        return cls(codec=codec, data=data, meta=meta)


def gram_matrix(x: Tensor, parts: int = 3, out: Tensor | None = None) -> Tensor:
    """XᵀX of x (T, in), float32, exactly symmetric. From ``in ≥ 384`` the columns are cut into
    ``parts`` blocks and only the products on and above the block diagonal are computed, then
    mirrored (6 products of 9 instead of 9). With ``out`` (in, in) each block's float32 product
    is added into it in place (a float64 accumulator: no whole float32 (in, in) copy is made,
    which for an 8B model's down_proj would be as large as the accumulator's half) and ``out`` is
    returned."""
    n = x.shape[1]
    if n < 384:
        g = x.T @ x
        return g if out is None else out.add_(g)
    b = -(-n // parts)
    cols = [slice(i, min(i + b, n)) for i in range(0, n, b)]
    g = torch.empty(n, n, dtype=x.dtype, device=x.device) if out is None else out
    for i, ci in enumerate(cols):
        for cj in cols[i:]:
            blk = x[:, ci].T @ x[:, cj]  # (|ci|, |cj|)
            if out is None:
                g[ci, cj] = blk
                if cj is not ci:
                    g[cj, ci] = blk.T
            else:
                g[ci, cj] += blk
                if cj is not ci:
                    g[cj, ci] += blk.T
            del blk
    return g


@dataclass
class Stats:
    """Calibration statistics of one linear layer's input, accumulated over tokens.

    ``gram`` is H = sum_t x_t x_tᵀ (in, in), float64; ``abs_mean`` is mean_t |x_t| (in,);
    ``sq_mean`` is mean_t x_t² (in,); ``n`` counts tokens.
    """

    gram: Tensor | None = None
    abs_mean: Tensor | None = None
    sq_mean: Tensor | None = None
    n: int = 0
    # what a method derives from these statistics and may reuse for every linear fed this input
    # (e.g. GPTQ's inverse-Hessian factor), keyed by the method; dropped with the Stats
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def add(self, x: Tensor, gram: bool = True) -> None:
        """Accumulate a batch of inputs ``x`` of shape (..., in)."""
        x32 = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (T, in)
        t = x32.shape[0]
        if t == 0:
            return
        self.derived.clear()  # derived from the statistics before this batch
        if gram:
            # (in, in): float32 products (~3× faster), summed in place into the float64 accumulator
            if self.gram is None:
                self.gram = torch.zeros(x32.shape[1], x32.shape[1], dtype=torch.float64, device=x32.device)
            gram_matrix(x32, out=self.gram)
        # per-batch sums in float32 (no float64 copy of the batch), accumulated in float64
        a = x32.abs().sum(0).double()
        s = x32.square().sum(0).double()
        if self.abs_mean is None:
            self.abs_mean, self.sq_mean = a / t, s / t
        else:
            tot = self.n + t
            self.abs_mean = (self.abs_mean * self.n + a) / tot
            self.sq_mean = (self.sq_mean * self.n + s) / tot
        self.n += t


Layout = dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]  # {key: (shape, allowed dtypes)}


class Codec:
    """A method that encodes one weight tensor and decodes it back: the base every registered
    codec derives from. It declares everything the runner, the loaders and the checks call, with
    the defaults of a codec that needs none of it; a codec overrides what it provides.

    The runner reads ``needs_stats`` (collect calibration statistics for its layers), ``gram``
    (the Gram matrix XᵀX among them) and ``gram_float32`` (it reads the Gram matrix in float32
    only, so the runner may narrow it once the statistics pass is over), asks
    :meth:`check_params` and :meth:`why_not_shape` of every rule before any work, and calls
    :meth:`prepare_block` once a block's statistics are in. Loaders call :meth:`module` and
    :meth:`state_names`; the folder checks call :meth:`stored_shapes` and :meth:`check_values`.
    ``options`` and ``grid_defaults`` are the parameters it defaults to (recorded beside sweep
    results, so a changed default is never mistaken for the same point)."""

    name: str = ""
    needs_stats: bool = False
    gram: bool = False
    gram_float32: bool = False
    lossless: bool = False
    options: dict[str, Any] = {}
    grid_defaults: dict[str, Any] = {}

    def check_params(self, shape: tuple[int, int], params: dict[str, Any]) -> None:
        """Raise an InputError for a parameter this codec does not know or cannot use on an
        (out, in) weight; called before any calibration runs."""
        raise NotImplementedError

    def why_not_shape(self, shape: tuple[int, int], params: dict[str, Any]) -> str | None:
        """Why an (out, in) weight cannot take ``params`` (a refusal collected over all layers), or None."""
        return None

    def encode(self, w: Tensor, stats: "Stats | None" = None, **params: Any) -> "CompressedTensor":
        raise NotImplementedError

    def decode(self, ct: "CompressedTensor") -> Tensor:
        raise NotImplementedError

    def prepare_block(self, block: torch.nn.Module, prefix: str, params: dict[str, dict[str, Any]],
                      stats: dict[str, "Stats"], config: Any = None) -> dict[str, Tensor]:
        """Rewrite a block before its linears are encoded (AWQ folds its scales here); returns
        {state key: tensor} of what it changed outside the encoded weights. Default: nothing."""
        return {}

    def stored_shapes(self, meta: dict[str, Any]) -> tuple[Layout, Layout]:
        """The tensors ``meta`` implies: (required, optional) {key: (shape, dtypes)}."""
        raise NotImplementedError

    def check_values(self, ct: "CompressedTensor") -> None:
        """Refuse stored values an index would be read with out of range. Default: none to check."""

    def module(self, ct: "CompressedTensor", bias: Tensor | None) -> torch.nn.Module:
        """The inference module of one compressed linear. Default: a dense Linear of the decoded
        weight (a codec whose modules stay compressed in memory overrides it)."""
        from .io.folder import dense_linear

        return dense_linear(self.decode(ct), bias)

    def state_names(self, ct: "CompressedTensor") -> tuple[dict[str, str], str]:
        """Where :meth:`module` keeps each stored tensor: ({data key: state-dict name}, the bias's
        name). Default: none (the default module holds the decoded weight, not the stored tensors)."""
        raise InputError(f"codec {ct.codec!r} has no inference module whose tensors are the stored ones")


_REGISTRY: dict[str, Codec] = {}
C = TypeVar("C")


def register(name: str) -> Callable[[type[C]], type[C]]:
    """Class decorator: instantiate the codec and register it under ``name``."""

    def deco(cls: type[C]) -> type[C]:
        if not issubclass(cls, Codec):
            raise TypeError(f"codec {name!r}: {cls.__name__} does not derive from tensor.Codec")
        if name in _REGISTRY:
            raise InputError(f"codec {name!r} registered twice")
        inst = cls()
        inst.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = inst  # type: ignore[assignment]
        return cls

    return deco


def _load_builtin_codecs() -> None:
    # Importing the method packages registers their codecs.
    import importlib

    for mod in ("llmpress.quant", "llmpress.lowrank"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a package not written yet
            if e.name != mod:
                raise


def get_codec(name: str) -> Codec:
    """Look a codec up by name; a clear error lists the known ones."""
    if name not in _REGISTRY:
        _load_builtin_codecs()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotFoundError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY)) or '(none)'}") from None


def codec_names() -> list[str]:
    _load_builtin_codecs()
    return sorted(_REGISTRY)


def decode(ct: CompressedTensor) -> Tensor:
    return get_codec(ct.codec).decode(ct)
