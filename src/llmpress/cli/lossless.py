"""Commands of the lossless codec: ``pack``, ``unpack``, ``verify``, ``info``, ``warmup``."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.table import Table
from tqdm import tqdm

from .app import FORCE_OPT, JSON_OPT, app, console, emit, kv_table

THREADS_OPT = typer.Option(None, "--threads", "-t", help="Worker threads (default: min(4, CPUs)).")
BASE_OPT = typer.Option(None, "--base", help="The base model a delta file was packed against (a folder, .safetensors or "
                        ".llmp file), checked by sha256 before anything is decoded.")


@contextlib.contextmanager
def _bar(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    # tqdm writes to stderr; it appears only when the job lasts longer than a second
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, delay=1.0, leave=False) as bar:
        yield bar.update


def _source_bytes(src: str) -> int:
    from ..lossless.gguf import is_gguf
    from ..models import resolve

    p = Path(src)
    if not (p.is_file() and is_gguf(p)):  # a GGUF file is packed as itself, not dequantized
        p = resolve(src).path
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _kernels_note() -> None:
    """One line on stderr while the kernels are not built ahead of time for this installation."""
    import os

    from ..lossless import compiled

    if os.environ.get(compiled.ENV, "1") != "0" and compiled.module() is None:
        console.print("[dim]note: the lossless kernels are not built for this installation; numba compiles them "
                      "at first use (slow once) and loads them in every process. `llmpress warmup` builds them "
                      "once, ahead of time.[/]", highlight=False)


def _show_sizes(title: str) -> Callable[[dict[str, Any]], None]:
    def show(r: dict[str, Any]) -> None:
        keys = ("bytes_in", "bytes_out", "ratio", "tensor_bytes_in", "tensor_bytes_out", "bound_bytes", "seconds", "files",
                "base", "base_files", "delta_modes", "out")
        shown = {k: r[k] for k in keys if k in r}
        if isinstance(shown.get("base"), dict):  # packed against a base: its name, chunks by mode
            shown["base"] = f"{r['base']['name']} ({r['base']['kind']})"
            shown["delta_modes"] = ", ".join(f"{m} {n}" for m, n in r["delta_modes"].items())
        console.print(kv_table(title, shown))

    return show


@app.command()
def pack(
    src: str = typer.Argument(..., help="MODEL: HF folder, .safetensors file, hub id or embedded default."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .llmp file."),
    policy: str = typer.Option("rans", "--policy", help="Entropy backends: 'rans' (default: our rANS), 'ans' (constriction), 'zstd', or 'smallest' (rANS, a GGUF's near-uniform codes coded too: a few % smaller, half the decode speed)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Coder threads (default: min(4, CPUs); with --workers: per worker, CPUs / workers)."),
    workers: int = typer.Option(1, "--workers", help="Code each input file in a Ray task, N at a time (the same bytes as one process)."),
    address: Optional[str] = typer.Option(None, "--address", help="An existing Ray cluster (host:port, ray://host:port or auto); default: a local one."),
    grids: bool = typer.Option(True, "--grids/--no-grids", help="Store FP32 tensors found to be dequantized block codes (e.g. GGUF Q4_1 widened to float) as their codes and block parameters, each chunk checked bit for bit (a file with one is .llmp format 3); --no-grids: the float path for all."),
    base: Optional[Path] = typer.Option(None, "--base", help="A base model the receiver already has (a folder, .safetensors or .llmp file): each float tensor with a counterpart of the same name, dtype and shape is coded against it (XOR or difference of the words, per chunk, where smaller), each identical config/tokenizer file stored as a reference; unpacking then needs --base (.llmp format 4)."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Pack a checkpoint losslessly into one .llmp file (every file restored byte for byte); with
    --base, a fine-tune as a delta against a base model the receiver has."""
    from ..lossless.container import pack as do_pack

    _kernels_note()

    with _bar(_source_bytes(src), "pack") as upd:
        r = do_pack(src, out, force=force, threads=threads, policy=policy, progress=upd, workers=workers,
                    address=address, grids=grids, base=base)
    if r["tensor_bytes_in"]:
        r["tensor_ratio"] = r["tensor_bytes_out"] / r["tensor_bytes_in"]
        r["over_bound"] = r["tensor_bytes_out"] / max(r["bound_bytes"], 1) - 1
    if r.get("base") is None:
        for k in ("base", "base_files", "delta_modes"):
            r.pop(k, None)
    emit(r, as_json, _show_sizes(f"packed {src} → {out}"))


@app.command()
def unpack(
    packed: Path = typer.Argument(..., help="A .llmp file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (or file, if one file was packed)."),
    threads: Optional[int] = THREADS_OPT,
    base: Optional[Path] = BASE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Restore the packed files byte for byte; every checksum is verified (a delta file: against --base)."""
    from ..lossless.container import unpack as do_unpack

    _kernels_note()
    total = _packed_total(packed)
    with _bar(total, "unpack") as upd:
        r = do_unpack(packed, out, force=force, threads=threads, progress=upd, base=base)
    emit(r, as_json, _show_sizes(f"unpacked {packed} → {out}"))


def _packed_total(packed: Path) -> int:
    """Bytes the packed file restores (for the progress bar)."""
    from ..lossless.reader import Packed

    with Packed(packed) as p:
        return sum(f["size"] for f in p.index["files"])


@app.command()
def verify(
    packed: Path = typer.Argument(..., help="A .llmp file."),
    threads: Optional[int] = THREADS_OPT,
    base: Optional[Path] = BASE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Decode everything in memory and check every chunk, tensor and file checksum (a delta file: against --base)."""
    from ..lossless.container import verify as do_verify

    _kernels_note()
    total = _packed_total(packed)
    with _bar(total, "verify") as upd:
        r = do_verify(packed, threads=threads, progress=upd, base=base)
    emit(r, as_json, lambda r: console.print(f"[green]ok[/] {packed}: {r['files']} files, {r['tensors']} tensors verified"))


def _show_info(r: dict[str, Any]) -> None:
    t = Table(title="lossless limits (bytes)")
    for c in ("tensor", "dtype", "grid / GGUF", "params", "bytes", "H(exp) bits", "order-0 bound", "chunk bound", "packed"):
        t.add_column(c, justify="left" if c in ("tensor", "dtype", "grid / GGUF") else "right")
    for name, row in r["tensors"].items():
        h = row["exp_entropy"]
        kind = row.get("grid") or row.get("gguf") or (f"codes {row['codes']}b" if row.get("codes") else None)
        t.add_row(name, row["dtype"], kind or ("delta" if row.get("delta") else "-"), f"{row['params']:,}", f"{row['bytes']:,}", "-" if h is None else f"{h:.3f}",
                  f"{row['bound_order0_bytes']:,.0f}", f"{row['bound_chunk_bytes']:,.0f}",
                  f"{row['packed_bytes']:,}" if "packed_bytes" in row else "-")
    h = r["exp_entropy"]
    t.add_row("TOTAL", "", "", f"{r['params']:,}", f"{r['bytes']:,}", "-" if h is None else f"{h:.3f}",
              f"{r['bound_order0_bytes']:,.0f} ({r['ratio_bound_order0']:.4f})",
              f"{r['bound_chunk_bytes']:,.0f} ({r['ratio_bound_chunk']:.4f})",
              f"{r['packed_bytes']:,} ({r['ratio']:.4f})" if "packed_bytes" in r else "-", style="bold")
    console.print(t)
    for name, g in r.get("grids", {}).items():
        console.print(f"grid {name}: {g['tensors']} tensors, {g['params']:,} params, chunk bound "
                      f"{g['bits_per_param_bound']:.3f} bits/param")
    for name, g in r.get("gguf", {}).items():
        fields = ", ".join(f"{k} {v:.3f}" for k, v in g["field_bound_bits_per_weight"].items())
        console.print(f"GGUF {name}: {g['tensors']} tensors, {g['params']:,} weights, {g['bits_per_weight']:.3f} bits/weight "
                      f"stored; chunk bound {g['bound_bits_per_weight']:.3f} bits/weight ({fields})")
    c = r.get("codes")
    if c:
        console.print(f"codes ({'/'.join(map(str, c['bits']))} bits): {c['tensors']} tensors, {c['codes']:,} codes, "
                      f"{c['bits_per_code']:.3f} bits/code stored; chunk bound {c['bits_per_code_bound']:.3f} bits/code "
                      f"({c['ratio_bound']:.4f} of their bytes)")
    console.print(f"chunk bound: {r['bits_per_param_bound_chunk']:.3f} bits/param")
    b = r.get("base")
    if b is not None:
        console.print(f"packed against the base model {b['name']} ({b['kind']}): {b['tensors']} of its tensors and "
                      f"{b['files']} of its files; unpack and verify need it (--base), checked by sha256")
    if "over_bound" in r:
        console.print(f"pack is {100 * r['over_bound']:.2f} % above the chunk-adaptive bound")


@app.command()
def info(
    src: str = typer.Argument(..., help="MODEL or a .llmp file."),
    as_json: bool = JSON_OPT,
) -> None:
    """Per tensor and in total: params, dtype, bytes, exponent entropy and the lossless bounds; the
    block grid a float tensor was found on (e.g. GGUF Q4_1 dequantized to FP32) and the bound it gives;
    a GGUF file's block type per tensor and each field's bound (codes, scales, mins, parameters);
    a quantized folder's bit-packed codes and their bound in bits a code; for a delta file, the base
    model it needs."""
    from ..lossless.bounds import info as do_info

    total = 0 if str(src).endswith(".llmp") else _source_bytes(src)
    with _bar(total, "info") as upd:
        r = do_info(src, progress=upd)
    emit(r, as_json, _show_info)


@app.command()
def warmup(
    force: bool = typer.Option(False, "--force", help="Build again even if a build for this installation exists."),
    as_json: bool = JSON_OPT,
) -> None:
    """Build the lossless codec's kernels ahead of time (once per installation; `make setup` runs it).

    Afterwards a fresh `pack`/`unpack`/`verify` loads them without importing numba. Without it they
    still work: numba compiles them at first use and caches them. LLMPRESS_AOT=0 ignores the build."""
    import time

    from ..lossless import compiled

    t0 = time.perf_counter()
    path = compiled.build(force=force)
    emit({"path": str(path), "seconds": time.perf_counter() - t0}, as_json,
         lambda r: console.print(f"[green]ok[/] lossless kernels built: {r['path']} ({r['seconds']:.1f} s)"))
