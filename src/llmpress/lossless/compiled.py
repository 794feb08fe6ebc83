"""Where the lossless codec's compiled kernels come from: an ahead-of-time build, else numba's JIT.

A fresh process that calls a numba dispatcher first imports numba and sets up its CPU target
(numba's whole library of typing and lowering registries) before the first cached kernel loads;
for ``pack``/``unpack`` of a small model that is most of the process's time. So the kernels the
``rans`` policy's encode and decode call from Python (:data:`AOT`: each with the signatures it is
called with, and every float layout's split and merge) are also built ahead of time into one
CPython extension module (``numba.pycc``; :func:`build`, run by ``llmpress warmup`` and
``make setup``). It lives in the cache (``$LLMPRESS_CACHE/kernels/<key>/``), keyed by the kernel
sources, numba, Python and the CPU's features (it is compiled for this CPU), and a process that
finds it imports it alone: numpy, no numba. The exported functions release the GIL like the JIT
ones (chunks code in parallel threads) and run the same code, so they give the same bytes
(tests/test_lossless_startup.py).

Call sites name kernels through :class:`Kernels` (``K = Kernels("kernels")``; ``K.rans_encode(...)``):
a call whose arguments match an exported signature (dtype, dimensions, C-contiguous arrays;
integers) runs the AOT function; any other, and every kernel when no build matches, runs numba's
JIT kernel (``cache=True``), its module imported at that first call. An exported function's own
unboxing checks neither dtype nor layout: the match is checked here, before every call.
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
SOURCES = ("kernels.py", "rans32.py", "freq_model.py", "chunk_kernel.py", "grid_kernel.py", "gguf_kernel.py", "delta_kernel.py", "fields.py",
           "compiled.py", "codes_kernel.py", "rans8.py")
# LLMPRESS_AOT=0: never load the ahead-of-time build (the JIT kernels only; tests compare both)
ENV = "LLMPRESS_AOT"
PACKAGE = __name__.rsplit(".", 1)[0]
# kernel module -> function -> the signatures exported ahead of time (those its callers use)
AOT: dict[str, dict[str, tuple[str, ...]]] = {
    "kernels": {"hist_entropy_bits": ("f8(i8[::1])",),
                "normalize_freqs": ("i8[::1](i8[::1], i8)",),
                "pack_bits": ("u1[::1](u1[::1], i8)",),
                "unpack_bits": ("void(u1[::1], i8, u1[::1])", "void(u1[::1], i8, u2[::1])"),
                "add_codes": ("void(u1[::1], i8, u1[::1])",),
                "fill_zeros": ("void(u1[:, ::1], i8, i8, i8, u1[::1])",),
                "add_zero_runs": ("void(u1[::1], i8, u1[:, ::1], i8, i8, i8)",),
                "decode_table": ("Tuple((u2[::1], u4[::1]))(i8[::1], i8)",),
                "rans_decode": ("i8(u2[::1], i8, u2[::1], u4[::1], i8, u1[::1])",
                                "i8(u2[::1], i8, u2[::1], u4[::1], i8, u2[::1])"),
                "rans_encode": ("u2[::1](u1[::1], i8[::1], i8)", "u2[::1](u2[::1], i8[::1], i8)")},
    "freq_model": {"write_model": ("u1[::1](i8[::1], i8)",), "read_model": ("UniTuple(i8, 2)(u1[::1], i8, i8[::1])",)},
    "rans32": {"encode": ("u1[::1](u1[::1], i8[::1], i8)", "u1[::1](u2[::1], i8[::1], i8)"),
               "decode_stream": ("i8(u1[::1], i8, u1[::1])", "i8(u1[::1], i8, u2[::1])")},
    "codes_kernel": {"decode_codes": ("i8(u1[::1], i8, i8, u1[:, ::1], i8, i8, i8, u1[::1], u1[::1])",),
                     "half_table": ("i8(u2[:, ::1], u1[::1], u1[:, ::1])",),
                     "decode_bytes": ("i8(u1[::1], u1[::1])",)},
    "chunk_kernel": {"decode_fields": tuple(f"i8(u1[::1], i8, i8[::1], {h}[::1], u1[::1], u1[::1], u1[::1])"
                                            for h in ("u1", "u2"))},
    "grid_kernel": {"block_minmax": ("void(f4[:, ::1], f4[::1], f4[::1])",),
                    "affine_codes": ("void(f4[:, ::1], f4[::1], f4[:, ::1], i8, u1[:, ::1], i8[::1])",),
                    "scale_gcd": ("void(u4[:, ::1], i8[::1], i8[::1], i8[:, ::1], i8[::1], i8[::1], i8[::1])",)},
    "gguf_kernel": {"legacy_merge": ("void(u1[::1], u1[:, ::1], i8, i8)",),
                    "q4k_merge": ("void(u1[::1], u1[:, ::1], i8, i8)",),
                    "q6k_merge": ("void(u1[::1], u1[:, ::1])",),
                    # a GGUF chunk: buf, kind, bits, unit, classes, widths, counts, blocks, out, scratch, zstd streams
                    "decode_chunk": ("i8(u1[::1], i8, i8, i8, i8, i8[::1], i8[::1], i8, u1[::1], u1[::1], u1[::1], "
                                     "u1[::1], i8[::1], u1[::1])",)},
    # a delta chunk's words against its base's (u1: FP8, u2: BF16/F16, u4: F32)
    "delta_kernel": {"delta_hists": tuple(f"void({w}[::1], {w}[::1], i8[:, ::1], i8[:, ::1])" for w in ("u1", "u2", "u4")),
                     "delta_planes": tuple(f"void({w}[::1], {w}[::1], i8, u1[:, ::1])" for w in ("u1", "u2", "u4")),
                     "merge_planes": tuple(f"void(u1[:, ::1], {w}[::1], i8, {w}[::1])" for w in ("u1", "u2", "u4")),
                     "merge4": tuple(f"void(u1[::1], u1[::1], u1[::1], u1[::1], {w}[::1], i8, {w}[::1])"
                                     for w in ("u1", "u2", "u4")),
                     "decode_delta": tuple(f"i8(u1[::1], i8, {w}[::1], {w}[::1], u1[::1], u1[::1], u1[::1], u1[::1])"
                                           for w in ("u1", "u2", "u4"))},
}
_SIG_CODE = {np.dtype(np.uint8): "u1", np.dtype(np.uint16): "u2", np.dtype(np.uint32): "u4"}


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _argkey(a: Any) -> str | None:
    """An argument's part of an exported name: ``uint8_1`` for a C-contiguous 1-D uint8 array,
    ``int`` for an integer; None for anything no export takes."""
    if isinstance(a, np.ndarray):
        if not (a.flags.c_contiguous and a.flags.aligned):
            return None
        name = _DTYPE_NAMES.get(a.dtype)
        if name is None:  # numpy computes a dtype's name in Python at every ask: a visible cost a call
            name = _DTYPE_NAMES[a.dtype] = a.dtype.name
        return f"{name}_{a.ndim}"
    return "int" if isinstance(a, (int, np.integer)) else None


class _Dispatch:
    """One kernel: the AOT variant whose argument key matches, else the JIT kernel."""

    def __init__(self, variants: dict[tuple, Callable], jit: Callable[[], Callable]):
        self.variants, self._jit = variants, jit

    def __call__(self, *args: Any) -> Any:
        fn = self.variants.get(tuple(_argkey(a) for a in args))
        return fn(*args) if fn is not None else self._jit()(*args)


class Kernels:
    """A kernel module of this package, its functions resolved on first access: the AOT build's
    (through :class:`_Dispatch`) where it exports them, else the JIT module's (imported, numba
    with it, at that first access). ``importlib`` serialises concurrent first imports."""

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def _module(self) -> ModuleType:
        return importlib.import_module(f"{PACKAGE}.{self.__dict__['_name']}")

    def __getattr__(self, attr: str) -> Any:
        variants = _variants(f"{self.__dict__['_name']}__{attr}")
        fn = _Dispatch(variants, lambda: getattr(self._module(), attr)) if variants else getattr(self._module(), attr)
        self.__dict__[attr] = fn
        return fn


def _variants(prefix: str) -> dict[tuple, Callable]:
    """The AOT module's functions named ``prefix__<argkey>__<argkey>...``, by argument key."""
    m = module()
    if m is None:
        return {}
    out = {}
    for name in dir(m):
        if name.startswith(prefix + "__"):
            out[tuple(name[len(prefix) + 2 :].split("__"))] = getattr(m, name)
    return out


def layout_kernels(lay: FloatLayout) -> tuple[Callable, Callable]:
    """A float layout's ``(split, merge)``: the AOT build's where it has this layout, else numba's."""
    base = _layout_name(lay)
    out = []
    for i, what in enumerate(("split", "merge")):
        v = _variants(f"{base}__{what}")
        out.append(_Dispatch(v, lambda i=i: lay.jit_kernels()[i]) if v else lay.jit_kernels()[i])
    return out[0], out[1]


def _layout_name(lay: FloatLayout) -> str:
    return f"layout_e{lay.E}m{lay.M}k{lay.k}_" + "_".join(map(str, lay.tail_widths))


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


def _export_name(prefix: str, sig: str) -> str:
    from numba.core import sigutils, types

    args, _ = sigutils.normalize_signature(sig)

    def key(t: Any) -> str:
        if isinstance(t, types.Array):
            return f"{t.dtype}_{t.ndim}"
        assert isinstance(t, types.Integer), t
        return "int"

    return prefix + "__" + "__".join(key(t) for t in args)


def exports() -> dict[str, tuple[Callable, str]]:
    """The functions an AOT build holds: exported name → (Python function, numba signature)."""
    from .fields import LAYOUTS, FloatLayout

    out: dict[str, tuple[Callable, str]] = {}
    for mod, fns in AOT.items():
        m = importlib.import_module(f"{PACKAGE}.{mod}")
        for fn, sigs in fns.items():
            for sig in sigs:
                out[_export_name(f"{mod}__{fn}", sig)] = (getattr(m, fn).py_func, sig)
    for lay in LAYOUTS.values():
        if isinstance(lay, FloatLayout):
            h, w = _SIG_CODE[np.dtype(lay.head_dtype)], _SIG_CODE[np.dtype(lay.word)]
            split, merge = lay.jit_kernels()
            base = _layout_name(lay)
            sig = f"void({w}[::1], {h}[::1], u1[:, ::1], i8[::1], i8[:, ::1])"
            out[_export_name(f"{base}__split", sig)] = (split.py_func, sig)
            sig = f"void({h}[::1], u1[::1], u1[::1], u1[::1], {w}[::1])"
            out[_export_name(f"{base}__merge", sig)] = (merge.py_func, sig)
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
