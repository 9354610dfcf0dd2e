"""FSDP2 full-shard runs of kit on 2 CPU processes (gloo), launched the way a user launches them:
`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m kit finetune ...`.

Each case trains one family (full or LoRA) three ways: one process with the whole global batch,
two FSDP processes with half of it each, and two FSDP processes resuming the second run from its
step-2 checkpoint. The losses and the saved weights must agree (tolerance below), the resumed run
must end exactly where the uninterrupted one did, and the saved folder must load in plain
transformers / PEFT. Two cases run by default; the other two with `-m slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import families
from helpers import free_port, kit_env

REPO = Path(__file__).resolve().parent.parent
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
STEPS = 6
# fp32 on CPU: two processes sum the same per-token losses in another order (an all-reduce of two
# halves), so losses and weights agree to float rounding, not bit for bit.
LOSS_TOL = 1e-4
WEIGHT_TOL = 1e-5

COMMON = [
    "--max-steps", str(STEPS), "--set", "train.global_batch_size=8", "--set", "train.precision=fp32",
    "--set", "train.gradient_checkpointing=false", "--set", "train.num_workers=0", "--set", "train.logging_steps=1",
    "--set", "train.warmup_ratio=0", "--set", "train.save_steps=2", "--set", "train.save_total_limit=3",
    "--set", "data.max_length=512",
    "--set", "data.image_aspect=crop",
]
MODES = {
    "full": ["--recipe", "llava15-finetune", "--set", "train.lr=1e-3"],
    "lora": ["--recipe", "llava15-lora", "--set", "quantization=none", "--set", "lora.r=4", "--set", "lora.alpha=8",
             "--set", "lora.dropout=0", "--set", "train.lr=1e-2", "--set", "train.projector_lr=1e-3"],
}
CASES = [
    ("llava", "full"),
    ("qwen2_vl", "lora"),
    pytest.param("llava", "lora", marks=pytest.mark.slow),
    pytest.param("qwen2_vl", "full", marks=pytest.mark.slow),
]


SECONDS: dict[str, float] = {}


def kit_run(args: list[str], kit_cache: Path, cwd: Path, processes: int = 1, label: str | None = None) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "kit", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
               "-m", "kit", *args]
    start = time.monotonic()
    done = subprocess.run(cmd, env=kit_env(kit_cache), cwd=cwd, capture_output=True, text=True, timeout=600)
    SECONDS[label or "other"] = time.monotonic() - start
    return done


def losses(run: Path) -> dict[int, float]:
    rows = (run / "log.csv").read_text().splitlines()[1:]
    return {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows}


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (run / "adapter_config.json").is_file() else "model.safetensors"
    return load_file(str(run / name))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def bases(tiny_base, smol_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    return {"llava": tiny_base, "qwen2_vl": families.save("qwen2_vl", smol_tokenizer_dir, tmp_path_factory.mktemp("qwen2_vl") / "base")}


@pytest.mark.parametrize("family,mode", CASES)
def test_fsdp_two_processes_train_what_one_process_trains(family, mode, bases, shapes, kit_cache, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from kit.base.family import family_of

    base = bases[family]
    data = ["--base", str(base), "--data", shapes["instruct"], "--set", f"data.image_folder={shapes['root']}",
            "--set", "data.template=" + ("vicuna_v1" if family == "llava" else "chat")]
    args = [*MODES[mode], *data, *COMMON]

    one = kit_run(["finetune", *args, "--out", str(tmp_path / "one"), "--set", "train.batch_size=8"], kit_cache, tmp_path, label="one")
    assert one.returncode == 0, one.stderr[-4000:]
    two = kit_run(["finetune", *args, "--out", str(tmp_path / "fsdp"), "--set", "train.batch_size=4"], kit_cache, tmp_path, processes=2, label="fsdp")
    assert two.returncode == 0, two.stderr[-4000:]
    blocks = {"llava": "LlamaDecoderLayer, CLIPEncoderLayer", "qwen2_vl": "Qwen2VLDecoderLayer, Qwen2VLVisionBlock"}[family]
    assert f"fsdp: one shard unit per {blocks} (fsdp over 2 processes)" in two.stderr

    # Same global batch, same samples per step: the same losses and the same weights.
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    assert max(abs(l1[s] - l2[s]) for s in l1) < LOSS_TOL, (l1, l2)
    assert l1[STEPS] < l1[1], f"no learning: {l1}"
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    assert max_diff(w1, w2) < WEIGHT_TOL

    # What trained moved, the tower did not.
    fam = family_of(base)
    if mode == "full":
        before = dict(AutoModelForImageTextToText.from_pretrained(base).named_parameters())
        after = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "fsdp").named_parameters())
        moved = {fam.part_of(k) for k in after if not torch.equal(after[k], before[k])}
        assert moved == {"projector", "llm"}, moved
    else:
        assert any("lora_B" in k and w2[k].abs().max() > 0 for k in w2)
        assert all(fam.part_of(k) in ("llm", "projector") for k in w2)

    # A normal folder: plain transformers / PEFT load it and agree with the one-process model.
    def logits(run: Path):
        if mode == "lora":
            model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(run))
        else:
            model = AutoModelForImageTextToText.from_pretrained(run)
        ids = torch.tensor([[1, 5, 9, 12, 7]])
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    assert torch.allclose(logits(tmp_path / "one"), logits(tmp_path / "fsdp"), atol=1e-4)

    # The step-2 checkpoint is an FSDP checkpoint with its layout on its card; resumed by the same
    # launch it ends exactly where the uninterrupted run ended.
    ck = tmp_path / "fsdp" / "checkpoint-2"
    assert json.loads((ck / "kit.json").read_text())["layout"] == {"strategy": "fsdp", "world_size": 2}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ck, resumed / "checkpoint-2")
    again = kit_run(["finetune", *args, "--out", str(resumed), "--set", "train.batch_size=4", "--resume"], kit_cache, tmp_path, processes=2, label="resume")
    assert again.returncode == 0, again.stderr[-4000:]
    l3 = losses(resumed)
    assert sorted(l3) == list(range(3, STEPS + 1)) and all(abs(l3[s] - l2[s]) < 1e-6 for s in l3), (l2, l3)
    assert max_diff(weights(resumed), w2) < 1e-7
    if os.environ.get("KIT_SHARDED_REPORT"):  # the table in docs/scale-out.md
        with open(os.environ["KIT_SHARDED_REPORT"], "a") as f:
            f.write(json.dumps({"strategy": "fsdp", "family": family, "mode": mode, "loss_diff": max(abs(l1[s] - l2[s]) for s in l1),
                                "weight_diff": max_diff(w1, w2), "resume_diff": max_diff(weights(resumed), w2), "plain_load": True,
                                "seconds": {k: round(v, 1) for k, v in SECONDS.items()}}) + "\n")

    # One process cannot continue what two FSDP processes wrote: a one-line error, nothing written.
    before = sorted(p.name for p in resumed.iterdir())
    single = kit_run(["finetune", *args, "--out", str(resumed), "--set", "train.batch_size=8", "--resume"], kit_cache, tmp_path)
    assert single.returncode != 0
    err = single.stderr.strip().splitlines()[-1]
    assert "written by fsdp over 2 processes, this launch is one process" in err and "Traceback" not in single.stderr, single.stderr
    assert sorted(p.name for p in resumed.iterdir()) == before


def test_deepspeed_launch_on_cpu_is_refused_before_anything_is_written(tiny_base, shapes, kit_cache, tmp_path):
    """accelerate leaves DeepSpeed out on CPU processes and would train plain data parallel under a
    ZeRO config without a word; kit says so and stops."""
    out = tmp_path / "zero2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/deepspeed_zero2.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "kit", "finetune", "--recipe", "llava15-finetune",
           "--base", str(tiny_base), "--data", shapes["instruct"], "--set", f"data.image_folder={shapes['root']}", "--out", str(out),
           "--max-steps", "1", "--set", "train.batch_size=4", "--set", "train.global_batch_size=8"]
    r = subprocess.run(cmd, env=kit_env(kit_cache), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "error: DeepSpeed runs on CUDA GPUs only: on CPU processes accelerate leaves it out" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("error: DeepSpeed")[0]
    assert not out.exists()
