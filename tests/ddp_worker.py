"""One rank of the 2-process DDP test (tests/test_scaleout.py); run under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py BASE DATA OUT DUMP

Trains llava15-finetune for 4 steps (batch 4 per rank x 2 ranks = global 8, no accumulation) and,
at the end of training, writes this rank's trainable parameters to DUMP/rank{RANK}.safetensors and
what it saw of the process group to DUMP/rank{RANK}.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

from helpers import tiny
from kit.core.recipes import load_recipe
from kit.train.run import train

# The shared tiny settings, with global batch 8 over 2 processes.
OVERRIDES = tiny(train__global_batch_size=8, train__lr="3e-3", train__max_steps=4)


class DumpTrainable(TrainerCallback):
    def __init__(self, dump_dir: Path):
        self.dump_dir = dump_dir
        self.batches_per_rank = None
        self.samples = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batches_per_rank = len(train_dataloader)
        self.samples = len(train_dataloader.dataset)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(self.dump_dir / f"rank{rank}.safetensors"))
        info = {
            "rank": rank,
            "env_world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "dist_initialized": dist.is_available() and dist.is_initialized(),
            "dist_world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
            "dist_backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "args_world_size": args.world_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "global_step": state.global_step,
            "batches_per_rank": self.batches_per_rank,
            "samples": self.samples,
        }
        (self.dump_dir / f"rank{rank}.json").write_text(json.dumps(info))


def main(base: str, data: str, out: str, dump: str) -> None:
    torch.set_num_threads(1)
    dump_dir = Path(dump)
    dump_dir.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe("llava15-finetune", OVERRIDES)
    train(recipe, base=base, data=data, out=out, callbacks=[DumpTrainable(dump_dir)], echo=lambda m: None)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(f"usage: {sys.argv[0]} BASE_DIR DATA_FILE OUT_DIR DUMP_DIR")
    main(*sys.argv[1:])
