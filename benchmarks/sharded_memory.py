"""kit's per-GPU memory plan (kit.base.memory.estimate, `kit data check --gpus N --strategy S`)
against what 1 and 2 CPU processes actually hold: one process, DDP and FSDP2 runs of `kit finetune`
(full) on two LLaVA-shaped bases that differ only in depth.

A CPU process's peak resident memory (VmHWM) also holds the Python interpreter, torch's libraries
and the data, which no GPU estimate counts; the difference between the deeper and the shallower
base cancels all of that, so the table compares the estimate's growth with the measured growth,
per process, strategy by strategy (the CUDA/NCCL overhead constants are left out: there is no GPU).
Under FSDP a CPU process also holds what a GPU run keeps in host memory: rank 0 gathers the whole
model for the final save (FULL_STATE_DICT, 4 bytes per fp32 parameter); the table adds that term
separately ("host copy") so the GPU formula itself is what is compared.

    .venv/bin/python benchmarks/sharded_memory.py [--layers 4 12] [--hidden 512] [--out results/sharded_memory_cpu.json]

CPU, ~3 min.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kit.base.build import build  # noqa: E402
from kit.base.memory import COMM_GIB, GIB, OVERHEAD_GIB, estimate  # noqa: E402
from kit.base.mini import load_smollm2_tokenizer  # noqa: E402
from kit.core.recipes import load_recipe  # noqa: E402
from kit.ingest.shapes import write_shapes_dataset  # noqa: E402

STRATEGIES = {"one process": (1, "ddp"), "ddp x2": (2, "ddp"), "fsdp x2": (2, "fsdp")}
SETTINGS = ["train.batch_size=4", "train.global_batch_size=8", "train.precision=fp32", "train.gradient_checkpointing=false",
            "train.num_workers=0", "train.save_steps=1000", "data.max_length=256", "train.warmup_ratio=0"]


def make_base(root: Path, layers: int, hidden: int) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = load_smollm2_tokenizer()
    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(root / "vision")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                                 num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 )).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return build(root / "base", root / "vision", root / "llm", None)


def peak_per_process(cmd: list[str], env: dict, cwd: Path) -> tuple[list[float], float]:
    """Run `cmd`; the peak resident bytes of each Python process under it that loaded the model
    (the two largest: the launcher and torchrun's agent stay small), and the wall time."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        for p in [root, *root.children(recursive=True)]:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
            except OSError:
                continue
            hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")), 0)
            peaks[p.pid] = max(peaks.get(p.pid, 0), hwm)
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return sorted(peaks.values())[-(2 if "--num_processes" in cmd else 1):], time.time() - start


def run(base: Path, data: dict, out: Path, processes: int, strategy: str) -> tuple[list[float], float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    args = ["finetune", "--recipe", "llava15-finetune", "--base", str(base), "--data", data["instruct"],
            "--set", f"data.image_folder={data['root']}", "--out", str(out), "--max-steps", "3"]
    for s in SETTINGS:
        args += ["--set", s]
    if processes == 1:
        cmd = [sys.executable, "-m", "kit", *args, "--set", "train.batch_size=8"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = REPO / "configs" / "accelerate" / f"{strategy}.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(port), "-m", "kit", *args]
    return peak_per_process(cmd, env, out.parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[4, 12])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sharded_memory_cpu.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kit-sharded-"))
    data = write_shapes_dataset(work / "shapes", 48, seed=3, size=64)
    bases = {n: make_base(work / f"l{n}", n, a.hidden) for n in a.layers}
    recipe = load_recipe("llava15-finetune", SETTINGS)
    rows = []
    for label, (procs, strategy) in STRATEGIES.items():
        measured, est, secs, host = {}, {}, {}, {}
        for n, base in bases.items():
            peaks, secs[n] = run(base, data, work / f"{label.replace(' ', '_')}-{n}", procs, strategy)
            measured[n] = max(peaks)
            r = recipe if procs == 2 else load_recipe("llava15-finetune", [*SETTINGS, "train.batch_size=8"])
            e = estimate(r, base, 112, gpus=procs, strategy=strategy)
            est[n] = e.total - (OVERHEAD_GIB + (COMM_GIB if procs > 1 else 0)) * GIB
            host[n] = 4 * sum(v for k, v in e.detail["parts"].items() if k != "largest_block") if strategy == "fsdp" else 0
        lo, hi = a.layers
        grow_m, grow_e, grow_h = measured[hi] - measured[lo], est[hi] - est[lo], host[hi] - host[lo]
        rows.append({"strategy": label, "measured_peak_mib": {str(k): round(v / 2**20) for k, v in measured.items()},
                     "growth_measured_mib": round(grow_m / 2**20), "growth_estimated_mib": round(grow_e / 2**20),
                     "host_copy_mib": round(grow_h / 2**20), "ratio": round((grow_e + grow_h) / grow_m, 2),
                     "seconds": {str(k): round(v, 1) for k, v in secs.items()}})
    one = rows[0]["growth_measured_mib"]
    print(f"{'strategy':12s} {'peak/process ' + str(a.layers[0]) + 'L':>16s} {str(a.layers[1]) + 'L':>8s} {'growth measured':>16s} "
          f"{'estimated':>10s} {'host copy':>10s} {'est/meas':>9s} {'vs one process':>15s}")
    for r in rows:
        m = r["measured_peak_mib"]
        print(f"{r['strategy']:12s} {m[str(a.layers[0])]:13d} MiB {m[str(a.layers[1])]:5d} MiB {r['growth_measured_mib']:12d} MiB "
              f"{r['growth_estimated_mib']:6d} MiB {r['host_copy_mib']:6d} MiB {r['ratio']:9.2f} {r['growth_measured_mib'] / one:14.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"layers": a.layers, "hidden": a.hidden, "steps": 3, "batch_global": 8,
                                       "tokens_p95": 112, "rows": rows, "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
