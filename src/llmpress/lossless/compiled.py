"""Where the lossless codec's compiled kernels come from: an ahead-of-time build, else numba's JIT.

A fresh process that calls a numba dispatcher first imports numba and sets up its CPU target
(numba's whole library of typing and lowering registries) before the first cached kernel loads;
for ``unpack`` of a small model that is most of the process's time. So the decode path's kernels
(``chunk_kernel.decode_fields`` for both head widths, every float layout's merge, and the
entropy of a histogram for ``info``) are also built ahead of time into one CPython extension
module (``numba.pycc``; :func:`build`, run by ``llmpress warmup`` and ``make setup``). It lives in
the cache (``$LLMPRESS_CACHE/kernels/<key>/``), keyed by the kernel sources, numba, Python and the
CPU's features (it is compiled for this CPU), and a process that finds it imports it alone:
numpy, no numba. The exported functions release the GIL like the JIT ones (chunks decode in
parallel threads) and run the same code, so they give the same bytes (tests/test_lossless_startup.py).

Everything else, and every kernel when no build matches, is numba's JIT (``cache=True``) through
:class:`LazyModule`: the kernel modules are imported on first use, so a process that only
unpacks never imports numba. An exported function takes exactly its signature's dtypes and
C-contiguous arrays (its unboxing checks neither): callers pick it by dtype (:func:`decode_fields`,
:func:`merge`) and pass the arrays they made.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from .fields import FloatLayout

log = logging.getLogger(__name__)

MODULE = "_llmpress_lossless_aot"
# the kernel sources an AOT build compiles (any change to them is a new key)
SOURCES = ("kernels.py", "rans32.py", "freq_model.py", "chunk_kernel.py", "fields.py", "compiled.py")
# LLMPRESS_AOT=0: never load the ahead-of-time build (the JIT kernels only; tests compare both)
ENV = "LLMPRESS_AOT"
_NUMPY_SIG = {np.dtype(np.uint8): "u1", np.dtype(np.uint16): "u2", np.dtype(np.uint32): "u4"}


class LazyModule:
    """A module imported on its first attribute access (``K = LazyModule("...kernels")``): the
    call sites read ``K.rans_encode`` as before, and a process that never calls a JIT kernel never
    imports numba. ``importlib`` serialises concurrent first imports."""

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str) -> Any:
        mod = self.__dict__.get("_mod")
        if mod is None:
            mod = self.__dict__["_mod"] = importlib.import_module(self.__dict__["_name"])
        return getattr(mod, attr)


_K = LazyModule("llmpress.lossless.kernels")
_CK = LazyModule("llmpress.lossless.chunk_kernel")


# ----------------------------------------------------------------------------- the AOT build


def key() -> str:
    """What an AOT build must match: the kernel sources, numba's version, Python's ABI and the CPU."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    import importlib.metadata as md  # numba's version without importing numba

    h.update(f"{md.version('numba')}|{sys.implementation.cache_tag}|{platform.machine()}|{_cpu_flags()}".encode())
    return h.hexdigest()[:20]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "kernels" / key()


def _merge_name(lay: FloatLayout) -> str:
    return f"merge_e{lay.E}m{lay.M}k{lay.k}_" + "_".join(map(str, lay.tail_widths))


def exports() -> dict[str, tuple[Callable, str]]:
    """The functions an AOT build holds: exported name → (Python function, numba signature)."""
    from . import chunk_kernel as CK
    from . import kernels as K
    from .fields import LAYOUTS, FloatLayout

    out: dict[str, tuple[Callable, str]] = {"hist_entropy_bits": (K.hist_entropy_bits.py_func, "f8(i8[::1])")}
    for h in ("u1", "u2"):
        out[f"decode_fields_{h}"] = (CK.decode_fields.py_func,
                                     f"i8(u1[::1], i8, i8[::1], {h}[::1], u1[::1], u1[::1], u1[::1])")
    for lay in LAYOUTS.values():
        if isinstance(lay, FloatLayout):
            h, w = _NUMPY_SIG[np.dtype(lay.head_dtype)], _NUMPY_SIG[np.dtype(lay.word)]
            out[_merge_name(lay)] = (lay.jit_kernels()[1].py_func, f"void({h}[::1], u1[::1], u1[::1], u1[::1], {w}[::1])")
    return out


def build(force: bool = False) -> Path:
    """Compile the AOT module into the cache (once per key; ``force``: again) and return its path.

    Its functions release the GIL (numba.pycc's own flags do not: its compile flags are
    subclassed for the build). Written to a temporary folder and renamed into place, so a
    concurrent or interrupted build never leaves a half-written module that a process loads."""
    import tempfile
    import warnings

    dest = build_dir()
    have = _module_file(dest)
    if have is not None and not force:
        return have
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba.pycc is pending deprecation; it is what numba offers for AOT
        import numba.pycc.compiler as pcc
        from numba.core.compiler import Flags
        from numba.pycc import CC

    class _NoGilFlags(Flags):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.release_gil = True

    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    saved = pcc.Flags
    pcc.Flags = _NoGilFlags
    try:
        cc = CC(MODULE)
        cc.output_dir = str(tmp)
        cc.target_cpu = "host"  # the rANS decoder's vector loop needs the host's instructions (AVX2)
        cc.verbose = False
        for name, (fn, sig) in exports().items():
            cc.export(name, sig)(fn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cc.compile()
        for p in tmp.iterdir():  # the compiler's leftovers, if any
            if p.is_dir():
                import shutil

                shutil.rmtree(p, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another build got there first (same key: the same module)
            if _module_file(dest) is None:
                raise
    finally:
        pcc.Flags = saved
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the lossless kernels ahead of time in %.1f s: %s", time.perf_counter() - t0, dest)
    out = _module_file(dest)
    assert out is not None
    return out


def _module_file(d: Path) -> Path | None:
    files = sorted(d.glob(f"{MODULE}*.so")) + sorted(d.glob(f"{MODULE}*.pyd")) if d.is_dir() else []
    return files[0] if files else None


_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def module() -> ModuleType | None:
    """The AOT module for this key, imported once per process; None where none is built (or
    ``LLMPRESS_AOT=0``), and the JIT kernels serve."""
    if os.environ.get(ENV, "1") == "0":
        return None
    with _lock:
        if "m" not in _loaded:
            _loaded["m"] = _import()
        return _loaded["m"]


def _import() -> ModuleType | None:
    try:
        path = _module_file(build_dir())
    except OSError:
        return None
    if path is None:
        log.info("the lossless kernels are not built ahead of time (`llmpress warmup` builds them once); "
                 "numba compiles or loads them at first use")
        return None
    spec = importlib.util.spec_from_file_location(MODULE, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:  # a build this interpreter cannot load: the JIT kernels serve
        log.warning("%s: not loadable (%s); using the JIT kernels", path, e)
        return None
    return mod


# ----------------------------------------------------------------------------- the kernels


def decode_fields(head_dtype: np.dtype) -> Callable[..., int]:
    """``chunk_kernel.decode_fields`` for a head of ``head_dtype`` (uint8 or uint16)."""
    m = module()
    fn = getattr(m, f"decode_fields_{_NUMPY_SIG.get(np.dtype(head_dtype), '?')}", None) if m else None
    return fn if fn is not None else _CK.decode_fields


def merge(lay: FloatLayout) -> Callable[..., None]:
    """The layout's compiled merge ``(head, t0, t1, t2, x)``: the AOT build's where it has this layout."""
    m = module()
    fn = getattr(m, _merge_name(lay), None) if m else None
    return fn if fn is not None else lay.jit_kernels()[1]


def hist_entropy_bits(hist: np.ndarray) -> float:
    """n · H0 of a histogram ((A,) int64, C-contiguous)."""
    m = module()
    if m is not None and hist.dtype == np.int64 and hist.flags.c_contiguous and hist.ndim == 1:
        return m.hist_entropy_bits(hist)
    return _K.hist_entropy_bits(hist)
