"""The ways a run spreads over several GPUs, by the names `kit data check --strategy` and the
memory plan use (torch-free: the CLI reads its choices here)."""

from __future__ import annotations

from kit.core.errors import KitError

STRATEGY_HELP = {
    "ddp": "every GPU holds everything; gradients all-reduced through buckets as large as the gradients",
    "fsdp": "FSDP2 full shard: weights, gradients and Adam state split over the GPUs; one block gathered at a time",
    "zero2": "DeepSpeed ZeRO-2: gradients and Adam state (with fp32 master weights) split; the model's weights replicated",
    "zero3": "DeepSpeed ZeRO-3: weights too; blocks gathered as the forward and backward reach them",
}
STRATEGIES = tuple(STRATEGY_HELP)


def check_strategy(name: str) -> str:
    """`name`, or KitError naming the choices."""
    if name not in STRATEGY_HELP:
        raise KitError(f"--strategy {name}: choose one of {', '.join(STRATEGIES)}")
    return name
# The accelerate config that launches each (configs/accelerate/).
STRATEGY_CONFIG = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}

