#!/usr/bin/env bash
# One short prepared run (≤ 8 minutes) for a session with a lent GPU: run it as is, from the
# repository root, on that machine (no network; torch and transformers preinstalled there):
#
#   before, HERE, where PyPI is reachable:   bash bench/gpu-wheels.sh      (fills .whl/, git-ignored)
#   there, through the device tool:          run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
#
# 1. installs the carried wheels (.whl/*.whl) and llmpress itself with --no-deps into /tmp/llmpress-site
#    (never torch or transformers: the machine's own stay);
# 2. runs the CUDA-marked tests (tests/test_device.py -m cuda), with the carried tokenizer and text
#    standing in for SmolLM2 and the Debian corpora;
# 3. bench/gpu.py: GPTQ seconds on SmolLM2-135M- and Llama-3.2-1B-shaped models (random weights
#    drawn on the GPU) for llmpress and, when it imports, llm-compressor, on the same GPU; tokens/s of
#    `llmpress eval --device cuda`; one table with the command, commit and date.
# Logs and the table also go to $OUT (the device tool brings them back) or bench/out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGDIR=${OUT:-bench/out/gpu}
mkdir -p "$LOGDIR"
PY=${PY:-python3}
SITE=/tmp/llmpress-site
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "== llmpress GPU run: commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u '+%F %T UTC')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)"

# 1. the wheels the image lacks, then llmpress (src/ first on the path: the working tree as it is)
mkdir -p "$SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "warning: the carried wheels did not all install"
else
  echo "warning: no .whl/ carried (run bench/gpu-wheels.sh where PyPI is reachable, then carry .whl)"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE/llmpress-pkg" . \
  >/dev/null 2>&1 || echo "note: pip could not build llmpress here (setuptools); src/ is used directly"
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import llmpress, llmpress.pipeline; print('llmpress', llmpress.__version__, 'from', llmpress.__file__)" || exit 1
echo "-- setup done at $(elapsed) s"

# 2. the CUDA-marked tests
export LLMPRESS_TEST_TOKENIZER="$PWD/.whl/tokenizer" LLMPRESS_TEST_TEXT="$PWD/.whl/text/calib.txt"
[ -d "$LLMPRESS_TEST_TOKENIZER" ] || unset LLMPRESS_TEST_TOKENIZER LLMPRESS_TEST_TEXT
timeout 180 "$PY" -m pytest -q -m cuda tests/test_device.py -p no:cacheprovider -o addopts="" -rA 2>&1 \
  | tee "$LOGDIR/cuda-tests.log" | tail -25
echo "-- tests done at $(elapsed) s"

# 3. GPTQ and eval timings (the rest of 8 minutes, less a margin)
BUDGET=$(( 470 - $(elapsed) ))
timeout $(( BUDGET + 20 )) "$PY" bench/gpu.py --deadline "$BUDGET" 2> "$LOGDIR/gpu-bench.err" | tee "$LOGDIR/gpu-bench.md"
tail -15 "$LOGDIR/gpu-bench.err"
echo "== done in $(elapsed) s"
