"""Peak GPU memory estimate for a recipe on a base, before any weight is loaded.

The model is built on the meta device (no memory) to count parameters per part; the estimate adds
weights in their stored precision, what trains (fp32 master weights, gradients and two Adam
moments: 16 bytes per parameter), activations (checkpointed or not) and the fp32 logits of the
loss. Checked against measured H100 peaks in benchmarks/README.md (8-layer LLaVA-1.5 shape, 2.3B:
LoRA 8.8 vs 9.0 GiB, full 33.7 vs 32.4 GiB). `gradient_checkpointing: auto` counts as on here: this
estimate, taken with it off, is what decides it (kit.train.args.resolve_checkpointing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from kit.base.folder import Base
from kit.base.load import model_config
from kit.core.errors import KitError
from kit.core.recipes import Recipe
from kit.core.strategies import STRATEGIES, check_strategy

GIB = 1024**3
OVERHEAD_GIB = 0.8  # CUDA context, allocator fragmentation, cuBLAS workspaces
COMM_GIB = 0.5  # NCCL communicators and their buffers, with more than one GPU
ADAM_BYTES = 8  # two fp32 moments per trained parameter


@dataclass
class Estimate:
    weights: float
    trainable: float
    activations: float
    logits: float
    total: float
    detail: dict
    strategy: str = "ddp"
    gpus: int = 1
    working: float = 0.0  # gathered blocks (FSDP, ZeRO-3), gradient buckets (DDP, ZeRO)

    def lines(self) -> list[str]:
        split = f"  (split over {self.gpus} GPUs)" if self.gpus > 1 and self.strategy in ("fsdp", "zero3") else ""
        split_train = f", split over {self.gpus} GPUs" if self.gpus > 1 and self.strategy != "ddp" else ""
        out = [
            f"weights (frozen, stored precision)  {self.weights / GIB:7.2f} GiB{split}",
            f"trainable (fp32 + grads + Adam)      {self.trainable / GIB:7.2f} GiB  ({self.detail['trainable_params'] / 1e6:.1f}M parameters{split_train})",
        ]
        if self.working:
            out.append(f"gathered blocks / gradient buckets  {self.working / GIB:7.2f} GiB")
        overhead = OVERHEAD_GIB + (COMM_GIB if self.gpus > 1 else 0)
        return out + [
            f"activations                         {self.activations / GIB:7.2f} GiB  (batch {self.detail['batch']} x {self.detail['tokens']} tokens)",
            f"logits (loss)                       {self.logits / GIB:7.2f} GiB",
            f"estimated peak{' per GPU' if self.gpus > 1 else ''}             {self.total / GIB:7.2f} GiB (incl. {overhead:.1f} GiB CUDA{' + NCCL' if self.gpus > 1 else ''} overhead)",
        ]


def parse_gpu(spec: str) -> float:
    """'24GB', '80G', '40 GiB' -> bytes. Raises KitError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib)?\s*", spec.lower())
    if not m:
        raise KitError(f"--gpu {spec!r}: give the card's memory like 24GB or 80GB")
    return float(m.group(1)) * GIB


def model_parts(base: Base | Path):
    """(parameter counts per part and of the largest block, the LLM's linear shapes, its text config):
    what every estimate of one base reads, from its config on the meta device."""
    base = Base.of(base)
    cfg = model_config(base)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    family = base.family
    counts = {"vision": 0, "projector": 0, "llm_linear": 0, "llm_other": 0}
    linears: list[tuple[int, int]] = []
    for name, module in model.named_modules():
        if family.in_llm_body(name) and isinstance(module, torch.nn.Linear):
            linears.append((module.in_features, module.out_features))
    for name, p in model.named_parameters():
        part = family.part_of(name)
        if part == "vision":
            counts["vision"] += p.numel()
        elif part == "projector":
            counts["projector"] += p.numel()
        elif family.in_llm_body(name) and name.endswith(".weight") and p.dim() == 2 and "embed" not in name:
            counts["llm_linear"] += p.numel()
        else:
            counts["llm_other"] += p.numel()
    text = cfg.get_text_config()
    counts["largest_block"] = _largest_block(model, family)
    return counts, linears, text


def _largest_block(model, family) -> int:
    """Parameters of the largest repeated block (what FSDP / ZeRO-3 gather at once)."""
    return max((sum(p.numel() for p in b.parameters()) for blocks in family.block_lists(model).values() for b in blocks), default=0)


def estimate(recipe: Recipe, base: Base | Path, tokens: int, gpus: int = 1, strategy: str = STRATEGIES[0], parts=None) -> Estimate:
    """Peak bytes per GPU for one training step at the recipe's batch size and `tokens` per sample,
    on `gpus` GPUs under `strategy` (kit.core.strategies). The formula is written out in
    docs/scale-out.md. `parts`: model_parts(base), when the caller has them already."""
    check_strategy(strategy)
    if gpus < 1:
        raise KitError(f"--gpus {gpus}: give the number of GPUs (1 or more)")
    if recipe.quantization == "nf4" and strategy in ("fsdp", "zero3"):
        raise KitError(f"--strategy {strategy} shards 4-bit weights, which kit has not run (QLoRA spreads with ddp or zero2); "
                       "choose ddp or zero2, or set quantization=none")
    counts, linears, text = parts or model_parts(base)
    half = 4 if recipe.train.precision == "fp32" else 2
    nf4 = recipe.quantization == "nf4"
    trainable_parts = set(recipe.train.trainable)
    weights = counts["vision"] * half + counts["llm_other"] * half
    weights += counts["llm_linear"] * (0.5 + 0.5 / 64 * 1.03 if nf4 else half)  # nf4 + double-quantized absmax
    trainable = 0
    if recipe.lora is not None:
        lora = sum(recipe.lora.r * (i + o) for i, o in linears)
        trainable += lora
    elif "llm" in trainable_parts:
        trainable += counts["llm_linear"] + counts["llm_other"]
        weights -= counts["llm_linear"] * half + counts["llm_other"] * half
    if "projector" in trainable_parts:
        trainable += counts["projector"]
        if recipe.lora is not None:
            weights += counts["projector"] * half  # PEFT keeps the original next to the trained copy
    else:
        weights += counts["projector"] * half
    states = trainable * (4 + 4 + ADAM_BYTES)  # fp32 master weight, its gradient, Adam
    b, h = recipe.train.batch_size, text.hidden_size
    layers, inter = text.num_hidden_layers, getattr(text, "intermediate_size", 4 * h)
    per_layer = b * tokens * (16 * h + 3 * inter) * half  # attention + MLP intermediates kept for backward
    if recipe.lora is not None and recipe.lora.dropout > 0:
        # PEFT drops out each adapted layer's input separately: q, k, v (and gate, up) each keep their
        # own dropped copy plus its mask for backward, beside the base layer's saved input.
        per_layer += b * tokens * sum(i for i, _ in linears) / max(layers, 1) * (half + 1)
    if recipe.train.gradient_checkpointing:
        activations = layers * b * tokens * h * half + per_layer
    else:
        activations = layers * per_layer
    logits = b * tokens * text.vocab_size * (4 * 2 + half)  # fp32 logits + their gradient, and the half copy
    weights, states, working = _spread(weights, trainable, states, half=half, block=counts["largest_block"], hidden=h, gpus=gpus, strategy=strategy)
    overhead = (OVERHEAD_GIB + (COMM_GIB if gpus > 1 else 0)) * GIB
    total = weights + states + working + activations + logits + overhead
    return Estimate(weights, states, activations, logits=logits, total=total,
                    detail={"trainable_params": trainable, "batch": b, "tokens": tokens, "parts": counts},
                    strategy=strategy, gpus=gpus, working=working)


def _spread(weights: float, trainable: int, states: float, half: int, block: int, hidden: int, gpus: int,
            strategy: str) -> tuple[float, float, float]:
    """(frozen weights, training states, working buffers) per GPU. `states` is one process's 16
    bytes per trained parameter; DeepSpeed keeps its own bf16 copy of the model and the fp32
    master in the optimizer instead (the same 16 bytes with bf16, 12 + 4 in fp32)."""
    if gpus == 1:
        return weights, states, 0.0
    if strategy == "ddp":
        return weights, states, trainable * 4.0  # gradient buckets: a second copy of the fp32 gradients
    if strategy == "fsdp":
        # Everything sharded in its stored dtype; per block in flight: its gathered weights in the
        # compute precision (this block and the prefetched next one) and its full fp32 gradient
        # before the reduce-scatter.
        return weights / gpus, states / gpus, block * (2 * half + 4.0)
    buckets = 4.5 * hidden * hidden * half  # reduce_bucket_size "auto" = hidden^2; overlap_comm keeps ~4.5 buckets
    master = 4 if half == 2 else 0
    sharded = trainable * (master + ADAM_BYTES + half) / gpus  # master, Adam, gradient partitions
    if strategy == "zero2":
        return weights, trainable * half + sharded, buckets
    return weights / gpus, trainable * half / gpus + sharded, buckets + 2 * block * half  # zero3
