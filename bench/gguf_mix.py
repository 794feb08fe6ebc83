"""``--gguf-mix`` against llama.cpp: the type of every tensor, ours beside llama-quantize's.

    .venv/bin/python bench/gguf_mix.py                       # SmolLM2-135M, Q4_K_M, Q3_K_M and Q2_K
    .venv/bin/python bench/gguf_mix.py ./some-model --mix q4_k_m

The model is exported as an F32 GGUF (``llmpress.export(..., format="gguf", type="f32")``),
``llama-quantize`` (built by ``bench/build-llama-cpp.sh``) quantizes it to each mix, gguf-py reads
the types it chose, and :func:`llmpress.quant.gguf_mix.mix_types` gives ours. Prints one table per mix
(tensor, row width, ours, llama.cpp's) and exits 1 if any tensor differs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
LLAMA_BIN = Path.home() / ".cache/llmpress/llama.cpp/build/bin"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--mix", action="append", choices=["q4_k_m", "q3_k_m", "q2_k"])
    ap.add_argument("--bin", type=Path, default=LLAMA_BIN, help="llama.cpp's build/bin")
    a = ap.parse_args()
    mixes = a.mix or ["q4_k_m", "q3_k_m", "q2_k"]
    quantize = a.bin / "llama-quantize"
    if not quantize.exists():
        print(f"no {quantize}: build llama.cpp with bench/build-llama-cpp.sh", file=sys.stderr)
        return 2

    import llmpress
    from gguf import GGUFReader
    from llmpress.quant.gguf_mix import mix_types, model_shapes, row_width

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"# {' '.join(sys.argv)}\n# commit {commit}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}")
    cfg, shapes = model_shapes(a.model)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        llmpress.export(a.model, str(f32), format="gguf", type="f32")
        for mix in mixes:
            out = Path(tmp) / f"{mix}.gguf"
            subprocess.run([str(quantize), str(f32), str(out), mix.upper()], check=True, capture_output=True)
            theirs = {t.name: t.tensor_type.name.lower() for t in GGUFReader(out).tensors}
            ours = mix_types(mix, cfg, shapes)
            rows = sorted(((g, row_width(cfg, g, shapes[n]), t, theirs.get(g, "—")) for n, (g, t) in ours.items()),
                          key=lambda r: (int(r[0].split(".")[1]) if r[0].startswith("blk.") else -1, r[0]))
            same = sum(r[2] == r[3] for r in rows)
            bad += len(rows) - same
            print(f"\n## {mix.upper()}: {same}/{len(rows)} tensors the same type"
                  " (embeddings/head: llama.cpp's pick shown; llmpress quantize keeps them)")
            print(f"| {'tensor':<28} | cols  | ours  | llama.cpp |")
            print(f"|{'-' * 30}|-------|-------|-----------|")
            for g, cols, t, th in rows:
                print(f"| {g:<28} | {cols:>5} | {t:<5} | {th:<9} |{'' if t == th else ' DIFFERS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
