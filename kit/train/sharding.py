"""Training over several processes: which layout the launcher asked for (DDP, FSDP, ZeRO-2/3 and
how many processes), what FSDP shards (one unit per block, from the family's description), FSDP2 on
CPU process groups, and the layout a checkpoint records so that a resume continues under the same one.

The launcher (accelerate launch, torchrun) says everything through the environment; kit reads it
here once per run and never asks the user to name a model's classes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from kit.base.family import Family
from kit.core.errors import KitError

WRAP_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


@dataclass(frozen=True)
class Layout:
    """How one run is spread: `strategy` (single, or one of kit.core.strategies.STRATEGIES) over `world_size` processes."""

    strategy: str
    world_size: int

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "world_size": self.world_size}

    def describe(self) -> str:
        return "one process" if self.strategy == "single" else f"{self.strategy} over {self.world_size} processes"


def current_layout() -> Layout:
    """The layout this process was launched into (accelerate's and torchrun's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _flag("ACCELERATE_USE_FSDP"):
        return Layout("fsdp", world)
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return Layout(f"zero{deepspeed_stage()}", world)
    return Layout("ddp" if world > 1 else "single", world)


def check_launch() -> None:
    """KitError, before anything is written, for a launch that would not do what its config says:
    accelerate starts DeepSpeed only on CUDA GPUs (on CPU processes it silently trains plain data
    parallel), and kit shards CPU process groups with FSDP2 only."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise KitError("DeepSpeed runs on CUDA GPUs only: on CPU processes accelerate leaves it out and trains plain data "
                       "parallel; launch with configs/accelerate/fsdp.yaml to shard on CPU, or run on GPUs")
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise KitError("FSDP on CPU processes needs FSDP2: set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml has it)")


def deepspeed_stage() -> int:
    """The ZeRO stage accelerate launch passed on: its own setting, else the JSON file's."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and Path(path).is_file():
        return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
    return 0


def block_classes(model, family: Family) -> list[str]:
    """Class names of the family's repeated blocks in this model: the LLM's decoder layer, then the
    tower's block when its path is there. KitError when the LLM's list is missing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lists = family.block_lists(base)
    if family.blocks.llm not in lists:
        raise KitError(f"{type(base).__name__} has no {family.blocks.llm}, where kit's '{family.name}' family keeps the LLM's "
                       "decoder layers; FSDP cannot tell what to shard (fix `blocks` in families.yaml)")
    return list(dict.fromkeys(type(block).__name__ for blocks in lists.values() for block in blocks))


def set_fsdp_wrap(model, family: Family) -> list[str] | None:
    """Under an FSDP launch with transformer-based wrapping, name the block classes for accelerate
    (its plugin reads them from the environment when the Trainer builds it). A list the launch
    config names itself is kept when this model has those classes. None when FSDP is not in use."""
    if not _flag("ACCELERATE_USE_FSDP") or os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP":
        return None
    present = block_classes(model, family)
    given = [c.strip() for c in os.environ.get(WRAP_ENV, "").split(",") if c.strip()]
    if given:
        have = {type(m).__name__ for m in model.modules()}
        unknown = [c for c in given if c not in have]
        if unknown:
            raise KitError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(unknown)}, which this model does not have; "
                           f"remove the key from the accelerate config (kit then wraps {', '.join(present)})")
        return given
    os.environ[WRAP_ENV] = ",".join(present)
    return present


def shard_on_cpu(trainer) -> None:
    """Make an FSDP launch on CPU processes shard. accelerate turns any CPU process group into plain
    data parallel and drops the FSDP plugin without a word; torch's FSDP2 runs on gloo meshes, so the
    state accelerate shares between its objects is switched to FSDP and the plugin put back, after
    which the Trainer's FSDP paths (sharding, gathering for saves, sharded optimizer states) run as
    they do on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not _flag("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()  # FSDP2: check_launch refused an FSDP1 launch on CPU
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def load_full_state(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into a model's parameters, sharded or not: under FSDP2 each
    process keeps its own shard of every tensor."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(t)


def check_resume_layout(card_layout: dict | None, checkpoint: Path) -> None:
    """KitError when `checkpoint` was written under another layout than this launch's: its data
    order, accumulation and optimizer files belong to that layout. A card without one predates the
    record and is trusted."""
    if not card_layout:
        return
    was, now = Layout(**card_layout), current_layout()
    if (was.strategy, was.world_size) != (now.strategy, now.world_size):
        raise KitError(f"--resume: {checkpoint} was written by {was.describe()}, this launch is {now.describe()}; "
                       f"relaunch with the settings it was written with ({was.describe()}) to continue it")
