"""What a CompressedTensor must hold, checked from its meta before any of its data is read.

A stored meta (``llmpress.json``, ``config.json``) is input: a hand edit or a corrupted file
can say ``shape: [1e6, 1e6]`` beside a few kilobytes of codes. Each codec states the tensors
its meta implies (:meth:`stored_shapes`: ``{key: (shape, dtypes)}`` required, and the optional
ones), and :func:`check_stored` compares them with what is stored — shapes and dtypes only, so
a loader can call it with the safetensors header before reading a byte of data. Nothing is
allocated from a meta value that the stored tensors do not confirm.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .errors import InputError

# key -> (shape, the dtypes it may be stored in)
from .tensor import Layout  # noqa: E402  {key: (shape, allowed dtypes)}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_DIM = 1 << 31  # no weight dimension of any model comes near


def meta_int(meta: Mapping[str, Any], key: str, lo: int, hi: int = MAX_DIM) -> int:
    """``meta[key]`` as an int in [lo, hi], or an InputError naming the key."""
    v = meta.get(key) if isinstance(meta, Mapping) else None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InputError(f"meta {key}={v!r}: an integer in [{lo}, {hi}] expected")
    return v


def meta_choice(meta: Mapping[str, Any], key: str, known: Iterable[Any], default: Any = None) -> Any:
    v = meta.get(key, default) if isinstance(meta, Mapping) else None
    known = list(known)
    if isinstance(v, bool) or v not in known:
        raise InputError(f"meta {key}={v!r}: one of {', '.join(map(str, known))} expected")
    return v


def meta_shape(meta: Mapping[str, Any]) -> tuple[int, int]:
    """The (out, in) a meta states, each a positive int."""
    s = meta.get("shape") if isinstance(meta, Mapping) else None
    if not (isinstance(s, list) and len(s) == 2 and all(isinstance(d, int) and not isinstance(d, bool) for d in s)
            and all(1 <= d <= MAX_DIM for d in s)):
        raise InputError(f"meta shape={s!r}: [out, in] of positive integers expected")
    return s[0], s[1]


def meta_dict(meta: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = meta.get(key) if isinstance(meta, Mapping) else None
    if not isinstance(v, dict) or not isinstance(v.get("codec"), str):
        raise InputError(f"meta {key}: a nested {{codec, ...}} object expected, got {type(v).__name__}")
    return v


def nested_layout(prefix: str, inner: dict[str, Any], shape: tuple[int, int]) -> tuple[Layout, Layout]:
    """The layout of a nested CompressedTensor (``{prefix}.{key}``) that must stand for ``shape``."""
    from .tensor import get_codec

    meta = {k: v for k, v in inner.items() if k != "codec"}
    if meta_shape(meta) != shape:
        raise InputError(f"meta {prefix}.shape={meta.get('shape')!r}: {list(shape)} expected")
    req, opt = get_codec(inner["codec"]).stored_shapes(meta)
    return ({f"{prefix}.{k}": v for k, v in req.items()}, {f"{prefix}.{k}": v for k, v in opt.items()})


def check_stored(codec_name: str, meta: Mapping[str, Any], stored: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Raise an InputError unless ``stored`` ({key: (shape, dtype)}) is exactly what the codec's
    meta implies: every required key, no unknown one, each shape and dtype as stated."""
    from .tensor import get_codec

    if not isinstance(meta, Mapping):
        raise InputError(f"meta: an object expected, got {type(meta).__name__}")
    req, opt = get_codec(codec_name).stored_shapes(meta)
    missing = sorted(set(req) - set(stored))
    unknown = sorted(set(stored) - set(req) - set(opt))
    if missing or unknown:
        raise InputError(f"stored tensors {sorted(stored)} do not fit codec {codec_name!r}"
                         + (f": missing {missing}" if missing else "") + (f": unexpected {unknown}" if unknown else ""))
    for k, (shape, dtype) in stored.items():
        want, dtypes = {**opt, **req}[k]
        if tuple(shape) != tuple(want):
            raise InputError(f"stored {k!r} has shape {list(shape)}; its meta implies {list(want)}")
        if dtype not in dtypes:
            raise InputError(f"stored {k!r} is {str(dtype).removeprefix('torch.')}; its meta implies "
                             f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}")


def check_ct(ct: Any) -> None:
    """:func:`check_stored` on a CompressedTensor's own tensors (meta-device ones too)."""
    from .tensor import get_codec

    check_stored(ct.codec, ct.meta, {k: (tuple(v.shape), v.dtype) for k, v in ct.data.items()})
    if not any(v.is_meta for v in ct.data.values()):
        get_codec(ct.codec).check_values(ct)
