#!/usr/bin/env python
"""Fine-tunes as deltas: `pack` alone against `pack --base`, on a real fine-tune pair.

The pairs come from bench/delta_pair.py (SmolLM2-135M fully fine-tuned with AdamW on the Debian
Administrator's Handbook, saved as BF16 releases against the BF16-cast base, and as FP32 against
the FP32 base; cached under bench/out/delta/). For every step count found there, and for each
precision, one row: the fine-tune packed alone and against its base (bytes, ratio of the
fine-tune's bytes, × smaller), which share of the delta tensors' chunks took XOR, the difference
or the tensor alone, encode MB/s (input bytes a second) and decode MB/s (output bytes a second,
in memory, every chunk checksum checked, the base's sha256 check excluded and timed apart), beside
the plain path's decode MB/s on the same fine-tune. Optionally a recovery-trained folder against
the quantized folder it started from (``--recovered FOLDER_BEFORE FOLDER_AFTER``).

    .venv/bin/python bench/delta.py                      # every pair under bench/out/delta/
    .venv/bin/python bench/delta.py --pairs /tmp/pair    # another cache
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llmpress  # noqa: E402
from llmpress.lossless.base import BaseModel  # noqa: E402
from llmpress.lossless.container import _pool  # noqa: E402
from llmpress.lossless.reader import Packed  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _record import record  # noqa: E402

OUT = HERE / "out"


def _decode_mbs(path: Path, base: Path | None, threads: int) -> tuple[float, float]:
    """(decode MB/s of output bytes, seconds of the base check) of one .llmp, in memory."""
    with Packed(path) as p, _pool(threads) as ex:
        t0 = time.perf_counter()
        bm = BaseModel(base) if base is not None and p.needs_base else None
        if bm is not None:
            p.attach_base(bm)
        t1 = time.perf_counter()
        n = 0
        for f in p.index["files"]:
            for part in p.file_chunks(f, ex, ahead=4 * threads):
                n += len(part)
        t2 = time.perf_counter()
        if bm is not None:
            bm.close()
    return n / (t2 - t1) / 1e6, t1 - t0


def _best(fn, reps: int):
    """The fastest of ``reps`` runs (a shared machine: the least disturbed one)."""
    return max((fn() for _ in range(reps)), key=lambda r: r[0])


def row(name: str, ft: Path, base: Path, tmp: Path, threads: int, reps: int) -> dict:
    alone, delta = tmp / "alone.llmp", tmp / "delta.llmp"
    a = llmpress.pack(ft, alone, force=True, threads=threads)
    d = llmpress.pack(ft, delta, force=True, threads=threads, base=base)
    a_dec, _ = _best(lambda: _decode_mbs(alone, None, threads), reps)
    d_dec, check_s = _best(lambda: _decode_mbs(delta, base, threads), reps)
    modes = d["delta_modes"]
    nchunks = max(sum(modes.values()), 1)
    params = sum(t["bytes"] for t in d["tensors"].values())  # bytes; params below from the dtype
    itemsize = 2 if "bf16" in name or "BF16" in name else 4
    return {"case": name, "bytes_in": a["bytes_in"], "alone_bytes": a["bytes_out"], "alone_ratio": a["ratio"],
            "delta_bytes": d["bytes_out"], "delta_ratio": d["ratio"], "x_smaller": a["bytes_out"] / d["bytes_out"],
            "delta_bits_per_param": 8 * d["tensor_bytes_out"] / max(params / itemsize, 1),
            "alone_bits_per_param": 8 * a["tensor_bytes_out"] / max(params / itemsize, 1),
            "chunks": nchunks, "share": {m: n / nchunks for m, n in modes.items()},
            "tensors_delta": sum(1 for t in d["tensors"].values() if t["delta"]), "tensors": len(d["tensors"]),
            "base_files": d["base_files"],
            "encode_mbs_alone": a["bytes_in"] / a["seconds"] / 1e6, "encode_mbs_delta": d["bytes_in"] / d["seconds"] / 1e6,
            "decode_mbs_alone": a_dec, "decode_mbs_delta": d_dec, "decode_vs_plain": d_dec / a_dec,
            "base_check_s": check_s, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, default=OUT / "delta")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="decode runs per file (the fastest is kept)")
    ap.add_argument("--recovered", type=Path, nargs=2, metavar=("BEFORE", "AFTER"),
                    help="a quantized llmpress folder and the same after llmpress finetune")
    ap.add_argument("--json", type=Path, default=OUT / "delta.json")
    a = ap.parse_args()
    cases = []
    for prec in ("bf16", "fp32"):
        steps = sorted(int(m.group(1)) for p in a.pairs.glob(f"ft-{prec}-*") if (m := re.fullmatch(rf"ft-{prec}-(\d+)", p.name)))
        cases += [(f"SmolLM2-135M {prec.upper()}, {s} steps", a.pairs / f"ft-{prec}-{s}", a.pairs / f"base-{prec}", s)
                  for s in steps]
    if a.recovered:
        cases.append((f"recovery-trained {a.recovered[1].name}", a.recovered[1], a.recovered[0], None))
    rows = []
    with tempfile.TemporaryDirectory(dir=OUT) as td:
        for name, ft, base, steps in cases:
            r = row(name, ft, base, Path(td), a.threads, a.reps)
            r["steps"] = steps
            meta = a.pairs / f"ft-{steps}.json"
            if steps is not None and meta.is_file():
                r["training"] = {k: v for k, v in json.loads(meta.read_text()).items() if k not in ("command", "date")}
            rows.append(r)
            print(f"{name}: alone {r['alone_bytes']:,} delta {r['delta_bytes']:,} ({r['x_smaller']:.2f}× smaller)", flush=True)
    rec = {**record(), "threads": a.threads, "rows": rows}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(a.json)
    print(f"\n{rec['command']}  (commit {rec['commit']}, {rec['date']}, {a.threads} threads)\n")
    hdr = ("case", "input", "pack", "ratio", "pack --base", "ratio", "× smaller", "bits/param", "xor", "diff", "alone",
           "enc MB/s", "enc --base", "dec MB/s", "dec --base", "dec ×plain")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        s = r["share"]
        print(f"| {r['case']} | {r['bytes_in']:,} | {r['alone_bytes']:,} | {r['alone_ratio']:.4f} | {r['delta_bytes']:,} | "
              f"{r['delta_ratio']:.4f} | {r['x_smaller']:.2f} | {r['alone_bits_per_param']:.2f} → {r['delta_bits_per_param']:.2f} | "
              f"{100 * s['xor']:.1f} % | {100 * s['diff']:.1f} % | {100 * s['alone']:.1f} % | "
              f"{r['encode_mbs_alone']:.0f} | {r['encode_mbs_delta']:.0f} | {r['decode_mbs_alone']:.0f} | "
              f"{r['decode_mbs_delta']:.0f} | {r['decode_vs_plain']:.2f} |")


if __name__ == "__main__":
    main()
