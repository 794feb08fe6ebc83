"""Grid detection bench: the embedded SmolLM2-135M (GGUF Q4_1 linears + a Q8_0 embedding,
dequantized to FP32) packed with and without grids, against its source GGUF's bits/param.

    .venv/bin/python bench/grid.py [--reps 2] [--threads 1 2]

Rows: bits/param of the whole packed folder (tensors, config and tokenizer files) over the
tensors' parameters, of the tensors alone, and the chunk-adaptive bound ``info`` reports (over
the grid's fields where a tensor is on one); encode and decode throughput in MB/s of the
decoded output (the original bytes), best of ``--reps``, the runs interleaved. Decode =
``verify(sha256=False)`` (every chunk decoded and its checksum checked). The BF16 path's decode
speed is measured in the same run on all-MiniLM-L6-v2 cast to BF16 (the issue: every new path
decodes at ≥ 0.5× its MB/s). Each run's output is checked bit for bit (sha256 of every file
after ``unpack``) once. Results: bench/out/grid.json (command, commit, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from _record import commit  # bench/ is the script's folder: first on sys.path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _gguf_bits(gguf: Path) -> dict:
    """bits/param of the GGUF's tensor data and of the whole file, over its parameters."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))
    params = sum(int(t.n_elements) for t in r.tensors)
    data = sum(int(t.n_bytes) for t in r.tensors)
    return {"params": params, "tensor_bits_per_param": 8 * data / params,
            "file_bits_per_param": 8 * gguf.stat().st_size / params}


def _bf16_minilm() -> Path:
    """all-MiniLM-L6-v2 cast to BF16 (the file bench/lossless.py measures)."""
    from safetensors.torch import load_file, save_file
    import torch

    from llmpress.models import resolve

    path = OUT / "minilm-l6-bf16.safetensors"
    if not path.exists():
        sd = load_file(str(resolve("minilm-l6").path / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(path))
    return path


def _sha_tree(p: Path) -> dict[str, str]:
    """{relative path: sha256} of a folder's files; a file's under the key ''."""
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {"" if p.is_file() else str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    from llmpress.lossless.bounds import info
    from llmpress.lossless.container import pack, unpack, verify
    from llmpress.models import EMBEDDED, DEFAULT_CAUSAL, resolve

    OUT.mkdir(exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    cmd = "python bench/grid.py " + " ".join(sys.argv[1:])
    smol = resolve(DEFAULT_CAUSAL).path
    gguf = EMBEDDED[DEFAULT_CAUSAL][1]()  # type: ignore[operator]
    cases = {"SmolLM2 FP32, grids": (smol, True), "SmolLM2 FP32, float path": (smol, False),
             "MiniLM BF16 (reference)": (_bf16_minilm(), True)}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        for threads in a.threads:
            for _ in range(a.reps):
                for i, (name, (src, grids)) in enumerate(cases.items()):
                    out = Path(tmp) / f"{i}.llmp"
                    out.unlink(missing_ok=True)
                    t = time.perf_counter()
                    r = pack(src, out, threads=threads, grids=grids)
                    enc = time.perf_counter() - t
                    t = time.perf_counter()
                    verify(out, threads=threads, sha256=False)
                    dec = time.perf_counter() - t
                    row = rows.setdefault(name, {"bytes_in": r["bytes_in"], "bytes_out": r["bytes_out"],
                                                 "tensor_bytes_in": r["tensor_bytes_in"],
                                                 "tensor_bytes_out": r["tensor_bytes_out"], "enc_s": {}, "dec_s": {}})
                    row["enc_s"][threads] = min(row["enc_s"].get(threads, float("inf")), enc)
                    row["dec_s"][threads] = min(row["dec_s"].get(threads, float("inf")), dec)
                    if "bit_exact" not in row:
                        inf = info(out)
                        row["bound_bits_per_param"] = inf["bits_per_param_bound_chunk"]
                        row["grids"] = inf["grids"]
                        back = Path(tmp) / "back"
                        unpack(out, back, force=True, threads=threads)
                        row["bit_exact"] = _sha_tree(back) == _sha_tree(src)
    ref = rows["MiniLM BF16 (reference)"]
    for row in rows.values():
        n = row["tensor_bytes_in"] / 4 if row is not ref else row["tensor_bytes_in"] / 2  # FP32 / BF16 words
        row["params"] = n
        row["bits_per_param"] = 8 * row["bytes_out"] / n
        row["tensor_bits_per_param"] = 8 * row["tensor_bytes_out"] / n
        row["enc_mb_s"] = {t: row["bytes_in"] / s / 1e6 for t, s in row["enc_s"].items()}
        row["dec_mb_s"] = {t: row["bytes_in"] / s / 1e6 for t, s in row["dec_s"].items()}
    for row in rows.values():
        row["dec_vs_bf16"] = {t: row["dec_mb_s"][t] / ref["dec_mb_s"][t] for t in row["dec_mb_s"]}
    g = _gguf_bits(gguf)
    print(f"command: {cmd}\ncommit: {commit()}   date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"source GGUF {gguf.name}: {g['tensor_bits_per_param']:.3f} bits/param in its tensor data, "
          f"{g['file_bits_per_param']:.3f} the whole file")
    head = f"{'case':28} {'bits/param':>10} {'tensors':>8} {'bound':>7} {'exact':>6}"
    for t in a.threads:
        head += f" {'enc MB/s ' + str(t) + 't':>12} {'dec MB/s ' + str(t) + 't':>12} {'dec/BF16':>8}"
    print(head)
    for name, row in rows.items():
        line = (f"{name:28} {row['bits_per_param']:10.3f} {row['tensor_bits_per_param']:8.3f} "
                f"{row['bound_bits_per_param']:7.3f} {str(row['bit_exact']):>6}")
        for t in a.threads:
            line += f" {row['enc_mb_s'][t]:12.1f} {row['dec_mb_s'][t]:12.1f} {row['dec_vs_bf16'][t]:8.2f}"
        print(line)
    for name, gr in rows["SmolLM2 FP32, grids"]["grids"].items():
        print(f"  grid {name}: {gr['tensors']} tensors, {gr['params']:,} params, bound {gr['bits_per_param_bound']:.3f} bits/param")
    print("bits/param: the whole .llmp over the tensors' parameters; tensors: their chunks alone; bound: info's "
          "chunk-adaptive bound; MB/s: original bytes / seconds (best of reps)")
    res = {"command": cmd, "commit": commit(), "date": started.isoformat(), "gguf": {"file": gguf.name, **g},
           "rows": rows}
    (OUT / "grid.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
