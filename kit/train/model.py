"""The model a run trains: its base loaded in the run's precision (4-bit for QLoRA), the parts the
recipe freezes frozen for good, LoRA on the LLM's linear layers."""

from __future__ import annotations

import os
import re
import types
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import set_seed

from kit.base.family import PROJECTOR_MODULE, part_of
from kit.base.load import load_model, quantization_config
from kit.core.errors import KitError
from kit.core.precision import compute_dtype
from kit.core.recipes import Recipe


def lora_target_regex(model, targets) -> str:
    """Linear layers of the LLM only (never the projector, the tower or lm_head)."""
    leaf_names = set()
    for name, module in model.named_modules():
        if name.startswith("model.language_model.") and (
            isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        ):
            leaf_names.add(name.rsplit(".", 1)[-1])
    if targets != "all-linear":
        unknown = set(targets) - leaf_names
        if unknown:
            raise KitError(f"lora.targets {sorted(unknown)} are not linear layers of the LLM; choose from {sorted(leaf_names)}")
        leaf_names = set(targets)
    alternatives = "|".join(sorted(re.escape(n) for n in leaf_names))
    return rf"model\.language_model\.(?:.*\.)?(?:{alternatives})"


def prepare_model(recipe: Recipe, base: Path):
    """Load the base for training: dtype, quantization, frozen/trainable parts, LoRA."""
    # LoRA and any fresh weights are drawn here, before the Trainer seeds anything: without this two
    # runs of one command start from different adapters and a resumed run cannot match.
    set_seed(recipe.train.seed)
    dtype = compute_dtype(recipe.train.precision)
    qcfg = quantization_config(dtype) if recipe.quantization == "nf4" else None
    # 4-bit weights are placed at load time: each process on its own GPU.
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if qcfg is not None and torch.cuda.is_available() else None
    model = load_model(base, dtype=dtype, quantization_config=qcfg, device_map=device_map)
    model.config.use_cache = False
    trainable = set(recipe.train.trainable)
    # No prepare_model_for_kbit_training: it upcasts every weight that is not 4-bit (tower,
    # embeddings, lm_head) to fp32, which on a 7B base costs more memory than quantization saves.
    # Frozen weights stay in the compute dtype; only what trains is fp32 (below). Non-reentrant
    # checkpointing needs no input-grad hook.
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in trainable and not (recipe.lora and part_of(name) == "llm"))
    if recipe.lora is not None:
        cfg = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=lora_target_regex(model, recipe.lora.targets),
            # The projector travels inside the adapter, so plain PEFT restores it too.
            modules_to_save=[PROJECTOR_MODULE] if "projector" in trainable else None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    for part, module in (("vision", inner_model(model).vision_tower), ("projector", inner_model(model).multi_modal_projector)):
        if part not in trainable:
            keep_in_eval_mode(module)
    if "llm" not in trainable:
        keep_in_eval_mode(inner_model(model).language_model)
    # Master weights of what trains stay fp32 even when the frozen rest is bf16/fp16.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def inner_model(model):
    """The LlavaModel (vision_tower, multi_modal_projector, language_model), PEFT-wrapped or not."""
    if is_peft(model):
        model = model.get_base_model()
    return model.model


def keep_in_eval_mode(module: torch.nn.Module) -> None:
    """A frozen part must not change with training: Trainer calls model.train() every step, which
    would let BatchNorm in a CNN tower (the mini base's EfficientNet) use batch statistics and
    overwrite its running stats, and would switch dropout on."""
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: self, module)


def is_peft(model) -> bool:
    return isinstance(model, PeftModel)
