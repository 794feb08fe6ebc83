"""Lossless limits of a checkpoint: exponent entropy and two entropy bounds per tensor.

For a float tensor of n words of b bits with an E-bit exponent:

- **order-0 exponent bound**: n·(H0(exponent) + b − E) bits — the exponent coded at its
  per-tensor order-0 entropy, sign and mantissa stored. This is what an exponent-only coder
  such as ZipNN aims at.
- **chunk-adaptive bound**: Σ over ≈512 KiB chunks and over the fields of fields.py of
  min(n_c·H0_c(field), n_c·width) — the size an ideal coder with a fresh static model per chunk
  and field reaches (model cost not counted). ``pack --policy ans`` targets this one, so
  ``info`` on a ``.llmp`` file shows how close it came.

Non-float tensors count at their raw size in both bounds, except a GGUF tensor of ggml blocks
(gguf.py): its chunk-adaptive bound is taken over its fields (parameters, scales, mins, codes,
the codes at the smaller of one model and a model per class), reported per field. A float tensor found on a block grid
(grid.py: a checkpoint dequantized from GGUF blocks) has its chunk-adaptive bound taken over the
grid's fields (codes, parameters) for the chunks that reproduce bit for bit; its row names the grid.
A quantized folder's bit-packed codes (quantized.py: llmpress's and compressed-tensors' folders) have
theirs taken over the codes as pack codes them (chunk.codes_field: one symbol a code, or bytes of
whole codes, less their group's zero point where that measures smaller), reported in bits a code.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .chunk import _group, codes_field
from .entropy import entropy_bits
from . import gguf as GG
from . import grid as G
from .fields import CODES, FloatLayout, layout
from .quantized import CodesSpec, quantized_of
from .reader import CHUNK_BYTES, Packed
from .segments import chunks_of, plan_file
from .zeros import chunk_zeros


def _h(hist: np.ndarray | list[int]) -> float:
    c = np.asarray(hist, dtype=np.float64)
    c = c[c > 0]
    return float(-(c / c.sum() * np.log2(c / c.sum())).sum()) if c.size else 0.0


def chunk_bound_bits(raw: np.ndarray, dtype: str, grid: G.Grid | None = None) -> tuple[float, np.ndarray | None]:
    """(chunk-adaptive bound in bits, exponent histogram or None) of one chunk's bytes; with a
    ``grid``, over the grid's fields where the chunk reproduces on it."""
    lay = layout(dtype)
    parts = lay.split(raw)
    hist = np.bincount(parts[0] >> lay.k, minlength=1 << lay.E) if isinstance(lay, FloatLayout) else None
    fields = lay.fields
    gparts = G.split(grid, raw) if grid is not None else None
    if gparts is not None:
        fields, parts = grid.fields, gparts  # type: ignore[union-attr]
    bits = sum(min(entropy_bits(s, f.width), float(len(s) * f.width)) for f, s in zip(fields, parts))
    return bits, hist


def codes_chunk_bits(raw: np.ndarray, bits: int, zeros: np.ndarray | None = None) -> float:
    """Chunk-adaptive bound bits of one chunk of ``bits``-bit codes (with each code's zero point,
    ``zeros`` (codes,) uint8, where the segment has them): its field as pack codes it, at
    min(n·H0, n·width)."""
    _, (f,), x, h = codes_field(raw, bits, zeros)
    return min(entropy_bits(None, f.width, h), float(len(x) * f.width))


def gguf_chunk_bits(bt: GG.BlockType, raw: np.ndarray) -> dict[str, float]:
    """{field: chunk-adaptive bound bits} of one chunk of GGUF blocks: each field (a parameter's
    float fields summed) at min(n·H0, n·width); the codes at the smaller of one model and a model
    per class (chunk._group), as pack codes them."""
    parts = GG.split(bt, raw)
    out: dict[str, float] = {}
    for f, s in zip(bt.fields, parts):
        k = f.name.partition(".")[0]
        out[k] = out.get(k, 0.0) + min(entropy_bits(s, f.width), float(len(s) * f.width))
    if bt.nclasses > 1 and len(parts[-1]):
        order, counts = _group(bt, parts[:-1])
        codes = parts[-1].reshape(-1, bt.unit)[order].reshape(-1)
        g = sum(min(entropy_bits(c, bt.code_bits), float(len(c) * bt.code_bits))
                for c in np.split(codes, np.cumsum(counts * bt.unit)[:-1]))
        out["codes"] = min(out["codes"], g)
    return out


def tensor_row(dtype: str, shape: list[int], nbytes: int, bound_bits: float, hist: Any,
               grid: G.Grid | None = None, gguf: str = "", field_bits: dict[str, float] | None = None,
               codes: int = 0) -> dict[str, Any]:
    lay = layout(dtype)
    row: dict[str, Any] = {"dtype": dtype, "shape": list(shape), "params": math.prod(shape), "bytes": nbytes,
                           "grid": grid.short() if grid is not None else None}
    if codes:  # bit-packed codes: their count, and the bound over them
        n = 8 * nbytes // codes
        row.update(codes=codes, n_codes=n, exp_entropy=None, bound_order0_bytes=float(nbytes),
                   bound_chunk_bytes=bound_bits / 8, bits_per_code_bound=bound_bits / max(n, 1))
        return row
    if gguf:  # a GGUF tensor's blocks: its weights, the type, the bound by field
        bt = GG.BLOCKS[gguf]
        row.update(gguf=gguf, params=nbytes // bt.block_bytes * bt.weights, exp_entropy=None,
                   bound_order0_bytes=float(nbytes), bound_chunk_bytes=bound_bits / 8,
                   field_bound_bits=dict(field_bits or {}))
        return row
    if isinstance(lay, FloatLayout) and hist is not None and row["params"]:
        h = _h(hist)
        row["exp_entropy"] = h
        row["bound_order0_bytes"] = row["params"] * (h + 8 * lay.itemsize - lay.E) / 8
        row["bound_chunk_bytes"] = bound_bits / 8
    else:
        row["exp_entropy"] = None
        row["bound_order0_bytes"] = row["bound_chunk_bytes"] = float(nbytes)
    return row


def _scan(path: Path, chunk_bytes: int, progress: Callable[[int], None] | None,
          found: dict[str, CodesSpec] | None = None) -> dict[str, dict[str, Any]]:
    """Rows of one file's tensors; ``found``: the folder's codes tensors (quantized.quantized_of)."""
    from .container import _zero_tables

    rows = {}
    found = found or {}
    with open(path, "rb") as f:
        plan = plan_file(path, {k: v.bits for k, v in found.items()})
        tables = _zero_tables(f, plan, {k: v.zero for k, v in found.items() if v.zero is not None}, path)
        for seg in plan:
            if seg.kind != "tensor":
                continue
            if seg.gguf:
                rows[seg.name] = _scan_gguf(f, seg, chunk_bytes, progress)
                continue
            if seg.codes:
                rows[seg.name] = _scan_codes(f, seg, tables.get(seg.name), chunk_bytes, progress)
                continue
            bits, hist = 0.0, None
            grid = G.detect_segment(f, seg.offset, seg.dtype, seg.shape, seg.length)
            f.seek(seg.offset)
            for _, ln in chunks_of(seg, chunk_bytes):
                raw = np.frombuffer(f.read(ln), np.uint8)
                b, h = chunk_bound_bits(raw, seg.dtype, grid)
                bits += b
                hist = h if hist is None else hist + h
                if progress:
                    progress(len(raw))
            rows[seg.name] = tensor_row(seg.dtype, list(seg.shape), seg.length, bits, hist, grid)
    return rows


def _scan_codes(f: Any, seg: Any, table: Any, chunk_bytes: int, progress: Callable[[int], None] | None) -> dict[str, Any]:
    """The row of a codes tensor, read chunk by chunk as pack cuts it; ``table``: (ZeroRef, zero
    points) where its zero points read, else None."""
    from .container import _chunks_of

    bits = 0.0
    f.seek(seg.offset)
    for co, ln in _chunks_of(seg, chunk_bytes):
        raw = np.frombuffer(f.read(ln), np.uint8)
        zeros = None if table is None else chunk_zeros(table[1], table[0], 8 * co // seg.codes, CODES[seg.codes].symbols(ln))
        bits += codes_chunk_bits(raw, seg.codes, zeros)
        if progress:
            progress(len(raw))
    return tensor_row(seg.dtype, list(seg.shape), seg.length, bits, None, codes=seg.codes)


def _codes(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Over the codes tensors: tensors, codes, their widths, bytes, the chunk bound (bytes, bits a
    code, and its ratio to the codes' bytes); {} where there are none."""
    rs = [r for r in rows.values() if r.get("codes")]
    if not rs:
        return {}
    n, nbytes, bound = sum(r["n_codes"] for r in rs), sum(r["bytes"] for r in rs), sum(r["bound_chunk_bytes"] for r in rs)
    return {"tensors": len(rs), "codes": n, "bits": sorted({r["codes"] for r in rs}), "bytes": nbytes,
            "bits_per_code": 8 * nbytes / max(n, 1), "bound_chunk_bytes": bound,
            "bits_per_code_bound": 8 * bound / max(n, 1), "ratio_bound": bound / max(nbytes, 1)}


def _scan_gguf(f: Any, seg: Any, chunk_bytes: int, progress: Callable[[int], None] | None) -> dict[str, Any]:
    """The row of a GGUF tensor of blocks, read chunk by chunk from the open file ``f``."""
    bt = GG.BLOCKS[seg.gguf]
    fb: dict[str, float] = {}
    f.seek(seg.offset)
    for _, ln in chunks_of(seg, chunk_bytes):
        raw = np.frombuffer(f.read(ln), np.uint8)
        for k, v in gguf_chunk_bits(bt, raw).items():
            fb[k] = fb.get(k, 0.0) + v
        if progress:
            progress(len(raw))
    return tensor_row(seg.dtype, list(seg.shape), seg.length, sum(fb.values()), None, gguf=seg.gguf, field_bits=fb)


def _grids(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{grid: tensors, params, bytes, chunk bound bytes and bits a parameter} over the tensors on it."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows.values():
        if r["grid"] is not None:
            g = out.setdefault(r["grid"], {"tensors": 0, "params": 0, "bytes": 0, "bound_chunk_bytes": 0.0})
            g["tensors"] += 1
            g["params"] += r["params"]
            g["bytes"] += r["bytes"]
            g["bound_chunk_bytes"] += r["bound_chunk_bytes"]
    for g in out.values():
        g["bits_per_param_bound"] = 8 * g["bound_chunk_bytes"] / max(g["params"], 1)
    return out


def _gguf_types(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{GGUF block type: tensors, weights, bytes, and each field's bound in bits a weight}."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows.values():
        if r.get("gguf"):
            g = out.setdefault(r["gguf"], {"tensors": 0, "params": 0, "bytes": 0, "field_bound_bits": {}})
            g["tensors"] += 1
            g["params"] += r["params"]
            g["bytes"] += r["bytes"]
            for k, v in r["field_bound_bits"].items():
                g["field_bound_bits"][k] = g["field_bound_bits"].get(k, 0.0) + v
    for g in out.values():
        g["bits_per_weight"] = 8 * g["bytes"] / max(g["params"], 1)
        g["field_bound_bits_per_weight"] = {k: v / max(g["params"], 1) for k, v in g["field_bound_bits"].items()}
        g["bound_bits_per_weight"] = sum(g["field_bound_bits_per_weight"].values())
    return out


def info(src: str | os.PathLike, *, progress: Callable[[int], None] | None = None,
         chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Per-tensor and total: params, dtype, bytes, exponent entropy, the two bounds; for a
    ``.llmp`` file also the packed bytes and how far they are above the chunk-adaptive bound, and
    (``base``) the base model a delta file needs."""
    p = Path(src)
    packed: dict[str, int] = {}
    base = None
    if p.is_file() and p.suffix == ".llmp":
        with Packed(p) as pk:
            rows = {}
            for _, s in pk.tensors():
                st = s.get("stats", {})
                hist = st.get("exp_hist")
                if hist is not None:  # stored: the histogram's nonzero span, from exp_lo
                    full = [0] * (1 << layout(s["dtype"]).E)
                    lo = int(st.get("exp_lo", 0))
                    full[lo : lo + len(hist)] = hist
                    hist = full
                rows[s["name"]] = tensor_row(s["dtype"], s["shape"], s["length"], st.get("bound_bits", 0.0), hist,
                                             G.Grid.from_index(s["grid"]) if "grid" in s else None,
                                             s.get("gguf", ""), st.get("field_bits"), s.get("codes", 0))
                rows[s["name"]]["delta"] = "base" in s  # coded against the base model (its bound: the delta's)
                packed[s["name"]] = sum(c[1] for c in s["chunks"])
            base = pk.base_summary()
            total_in = sum(f["size"] for f in pk.index["files"])
            total_out = pk.size
    else:
        from ..models import resolve, safetensors_files

        rows = {}
        # a GGUF file as itself (its blocks by field), not as the folder resolve dequantizes it into
        if p.is_file() and GG.is_gguf(p):
            files, found = [p], {}
        else:
            source = resolve(src)
            files = safetensors_files(source)
            found = quantized_of(source.path) if source.path.is_dir() else {}  # a quantized folder's codes
        for f in files:
            rows.update(_scan(f, chunk_bytes, progress, found))
        total_in, total_out = None, None
    tot = {k: sum(r[k] for r in rows.values()) for k in ("params", "bytes", "bound_order0_bytes", "bound_chunk_bytes")}
    fl = [r for r in rows.values() if r["exp_entropy"] is not None]
    nfl = sum(r["params"] for r in fl)
    out: dict[str, Any] = {
        "tensors": rows, **tot,
        "exp_entropy": sum(r["exp_entropy"] * r["params"] for r in fl) / nfl if nfl else None,
        "ratio_bound_order0": tot["bound_order0_bytes"] / max(tot["bytes"], 1),
        "ratio_bound_chunk": tot["bound_chunk_bytes"] / max(tot["bytes"], 1),
        "bits_per_param_bound_chunk": 8 * tot["bound_chunk_bytes"] / max(tot["params"], 1),
        "grids": _grids(rows),
        "gguf": _gguf_types(rows),
        "codes": _codes(rows),
    }
    if base is not None:  # a delta file: the base it needs (its name as given to pack, tensors and files used)
        out["base"] = base
    if packed:
        for k, r in rows.items():
            r["packed_bytes"] = packed[k]
        out["packed_bytes"] = sum(packed.values())
        out["ratio"] = out["packed_bytes"] / max(tot["bytes"], 1)
        out["over_bound"] = out["packed_bytes"] / max(tot["bound_chunk_bytes"], 1) - 1
        out["bytes_in"], out["bytes_out"] = total_in, total_out
    return out
