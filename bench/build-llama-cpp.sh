#!/usr/bin/env bash
# Build llama.cpp's command-line tools once, outside the repository, from the source that the
# llama-cpp-python sdist carries (no prebuilt llama.cpp runs on this Debian release).
# Prints the folder holding the binaries. Takes 15-30 minutes on 2 cores the first time; later
# calls return at once. Never run by `make test`.
#   LLAMA_CPP_HOME   where to build (default ~/.cache/llmpress/llama.cpp)
#   LLAMA_CPP_PY     llama-cpp-python version whose sdist to use
set -euo pipefail
HOME_DIR="${LLAMA_CPP_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/llmpress/llama.cpp}"
VERSION="${LLAMA_CPP_PY:-0.3.36}"
TOOLS=(llama-perplexity llama-quantize llama-imatrix llama-completion llama-bench)
BIN="$HOME_DIR/build/bin"

have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi

mkdir -p "$HOME_DIR"
cd "$HOME_DIR"
if [ ! -d "src/vendor/llama.cpp" ]; then
  PY="${PYTHON:-python3}"
  rm -rf dl src.tmp && mkdir dl
  "$PY" -m pip download -q --no-deps --no-binary :all: -d dl "llama-cpp-python==$VERSION" >&2
  mkdir src.tmp && tar -xzf dl/*.tar.gz -C src.tmp --strip-components=1
  rm -rf src dl && mv src.tmp src
fi
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build build -j"${JOBS:-2}" --target "${TOOLS[@]}" >&2
have_all
echo "$BIN"
