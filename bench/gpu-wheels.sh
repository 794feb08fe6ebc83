#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a session with a lent GPU runs bench/gpu.sh there.
#
# Fills .whl/ (git-ignored; it travels with the working tree, ≤ 64 MiB in all, kept under 50 MiB)
# with what the GPU machine lacks, as that machine's image was last described (KINDS.md: Python
# 3.12, torch 2.11+cu130, transformers 5.17, numba, typer, rich, safetensors, xxhash, pytest, ...
# already there; no network):
#   - wheels, no dependencies pulled, one version each, for CPython 3.12 on manylinux x86-64:
#     llmpress's own needs missing there (constriction, zstandard, gguf) and llm-compressor's GPTQ
#     with the packages it needs that are missing there (never torch, never transformers);
#   - .whl/tokenizer/: SmolLM2-135M's tokenizer files (the benchmark models are random weights
#     built on the GPU from configs; the tokenizer is the one real file they need);
#   - .whl/text/calib.txt and eval.txt: real English text from llmpress.text's corpora (the GPU
#     machine has no Debian text packages), so calibration and evaluation read real text there.
# Usage: bash bench/gpu-wheels.sh        (PY=python to choose the interpreter that runs llmpress here)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST/tokenizer" "$DEST/text"

PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# llmpress's dependencies (pyproject) that the GPU image does not hold
OURS=(constriction==0.5.0 zstandard==0.25.0 gguf==0.19.0)
# llm-compressor 0.14.0.1 (it accepts transformers ≤ 5.17, the image's) and what it imports that is missing there
LLMC=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 loguru==0.7.3
      datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "${OURS[@]}" "${LLMC[@]}"

# the tokenizer and the texts, from this machine's llmpress (offline: cached model, Debian corpora)
PYTHONPATH=src "$PY" - "$DEST" <<'EOF'
import shutil, sys
from pathlib import Path

from llmpress.models import resolve
from llmpress.text import load_text

dest = Path(sys.argv[1])
src = Path(resolve("smollm2-135m").path)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (src / name).exists():
        shutil.copy(src / name, dest / "tokenizer" / name)
# ~1.5 MB of each: enough for 32 x 512 calibration tokens and 16 Ki evaluation tokens
(dest / "text" / "calib.txt").write_text(load_text("calib-mix")[:1_500_000])
(dest / "text" / "eval.txt").write_text(load_text("debian-handbook")[:1_500_000])
print("tokenizer from", src)
EOF

du -sh "$DEST"
size=$(du -sm "$DEST" | cut -f1)
if [ "$size" -gt 50 ]; then echo "error: $DEST is ${size} MiB (> 50 MiB): it would not travel" >&2; exit 1; fi
ls "$DEST"/*.whl | sed 's|.*/||'
