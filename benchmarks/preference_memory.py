"""Peak memory and step time of the preference stage (DPO) against SFT on the same model and batch.

    .venv/bin/python benchmarks/preference_memory.py [--base mini] [--steps 6] [--batch 2]

Builds pairs from the packaged medical sample (`kit data pairs`, medical vocabulary), then trains
the same base twice, each in its own process so each peak is its own: SFT on the pairs' chosen
answers as conversations, and DPO on the pairs, with the same LoRA, batch (pairs for DPO, samples
for SFT), precision and steps. Prints the peak resident memory (CPU; on a GPU also the peak CUDA
memory), the seconds per optimizer step, and DPO / SFT ratios. A DPO step reads each pair's two
sequences and runs the reference (the starting weights with the adapter off) without gradients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

KIT = str(Path(sys.executable).with_name("kit"))

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from kit.core.recipes import load_recipe
    from kit.train.run import train
    from transformers import TrainerCallback

    args = json.loads(sys.argv[1])
    steps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append(time.perf_counter() - self.t)

    recipe = load_recipe("llava15-lora", args["sets"])
    train(recipe, base=args["base"], data=args["data"], out=args["out"], max_steps=args["steps"], callbacks=[Clock()],
          echo=lambda m: None)
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    later = steps[1:] or steps  # the first step warms caches up
    print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "gpu": gpu,
                      "step_s": sum(later) / len(later)}))
""")


def run(kind: str, base: str, data: Path, out: Path, steps: int, batch: int) -> dict:
    sets = ["quantization=none", "lora.r=16", "lora.alpha=32", "lora.dropout=0", "train.precision=fp32", "train.num_workers=0",
            "train.gradient_checkpointing=false", f"train.batch_size={batch}", f"train.global_batch_size={batch}",
            "data.template=chat", "data.max_length=512", "train.save_steps=1000", "data.image_aspect=pad",
            "data.group_by_modality_length=false"]
    if kind == "dpo":
        sets.append("train.objective=dpo")
    args = {"sets": sets, "base": base, "data": str(data), "out": str(out), "steps": steps}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="mini")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([KIT, "data", "sample", "medical", "--out", str(root / "medical")], check=True, capture_output=True)
        pairs = root / "medical" / "pairs.json"
        subprocess.run([KIT, "data", "pairs", str(root / "medical"), "--out", str(pairs), "--vocab", "medical"], check=True)
        rows = [{"id": p["id"], "image": p["image"], "conversations": [*p["prompt"], {"from": "gpt", "value": p["chosen"]}]}
                for p in json.loads(pairs.read_text())]
        sft_data = root / "medical" / "chosen.json"
        sft_data.write_text(json.dumps(rows))
        sft = run("sft", a.base, sft_data, root / "sft", a.steps, a.batch)
        dpo = run("dpo", a.base, pairs, root / "dpo", a.steps, a.batch)
    gib = 2**30
    print(f"base {a.base}, batch {a.batch} (samples for SFT, pairs for DPO), {a.steps} steps, {len(rows)} pairs")
    print(f"{'stage':6} | {'peak RSS':>9} | {'peak GPU':>9} | {'s / step':>8}")
    for name, r in (("SFT", sft), ("DPO", dpo)):
        g = f"{r['gpu'] / gib:.2f} GiB" if r["gpu"] else "-"
        print(f"{name:6} | {r['rss'] / gib:6.2f} GiB | {g:>9} | {r['step_s']:8.2f}")
    ratio_gpu = f", peak GPU x{dpo['gpu'] / sft['gpu']:.2f}" if sft["gpu"] else ""
    print(f"DPO / SFT: peak RSS x{dpo['rss'] / sft['rss']:.2f}{ratio_gpu}, time per step x{dpo['step_s'] / sft['step_s']:.2f}")


if __name__ == "__main__":
    main()
