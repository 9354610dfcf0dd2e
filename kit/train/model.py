"""The model a run trains: its base loaded in the run's precision (4-bit for QLoRA), the parts the
recipe freezes frozen for good, LoRA on the LLM's linear layers. Which modules are which comes from
the family's description (kit.base.family)."""

from __future__ import annotations

import os
import re
import types
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import set_seed

from kit.base.family import Family, family_of_model
from kit.base.folder import Base
from kit.base.load import load_model
from kit.core.errors import KitError
from kit.core.precision import compute_dtype
from kit.core.recipes import Recipe

LINEAR_TYPES = ("Linear4bit", "Linear8bitLt")


def is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in LINEAR_TYPES


def llm_linear_names(model, family: Family | None = None) -> list[str]:
    """Full names of the LLM's linear layers (never the projector, the tower or the head)."""
    family = family or family_of_model(model)
    return [name for name, module in model.named_modules() if family.in_llm_body(name) and is_linear(module)]


def lora_target_regex(model, targets, family: Family | None = None) -> str:
    """Linear layers of the LLM only, as a regex PEFT matches against full module names."""
    family = family or family_of_model(model)
    leaf_names = {name.rsplit(".", 1)[-1] for name in llm_linear_names(model, family)}
    if not leaf_names:
        raise KitError(f"{type(model).__name__}: no linear layers found under {family.llm}; kit cannot place LoRA there")
    if targets != "all-linear":
        unknown = set(targets) - leaf_names
        if unknown:
            raise KitError(f"lora.targets {sorted(unknown)} are not linear layers of the LLM; choose from {sorted(leaf_names)}")
        leaf_names = set(targets)
    alternatives = "|".join(sorted(re.escape(n) for n in leaf_names))
    return rf"{re.escape(family.llm)}\.(?:.*\.)?(?:{alternatives})"


def prepare_model(recipe: Recipe, base: Base | Path):
    """Load the base for training: dtype, quantization, frozen/trainable parts, LoRA."""
    base = Base.of(base)
    # LoRA and any fresh weights are drawn here, before the Trainer seeds anything: without this two
    # runs of one command start from different adapters and a resumed run cannot match.
    set_seed(recipe.train.seed)
    dtype = compute_dtype(recipe.train.precision)
    nf4 = recipe.quantization == "nf4"
    # 4-bit weights are placed at load time: each process on its own GPU.
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if nf4 and torch.cuda.is_available() else None
    model = load_model(base, dtype=dtype, nf4=nf4, device_map=device_map)
    family = base.family
    model.config.use_cache = False
    trainable = set(recipe.train.trainable)
    # No prepare_model_for_kbit_training: it upcasts every weight that is not 4-bit (tower,
    # embeddings, lm_head) to fp32, which on a 7B base costs more memory than quantization saves.
    # Frozen weights stay in the compute dtype; only what trains is fp32 (below). Non-reentrant
    # checkpointing needs no input-grad hook.
    for name, p in model.named_parameters():
        part = family.part_of(name)
        p.requires_grad_(part in trainable and not (recipe.lora and part == "llm"))
    if recipe.model.adapter:
        # An adapter kit trained goes on training: its LoRA and its projector copy, as it was saved.
        model = PeftModel.from_pretrained(model, recipe.model.adapter, is_trainable=True)
    elif recipe.lora is not None:
        # Under LoRA only modules travel (modules_to_save); a bare parameter of the projector stays as it is.
        projector = family.projector_modules(model) if "projector" in trainable else []
        for name, p in model.named_parameters():
            if family.part_of(name) == "projector" and not any(name == m or name.startswith(m + ".") for m in projector):
                p.requires_grad_(False)
        cfg = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=lora_target_regex(model, recipe.lora.targets, family),
            # The projector travels inside the adapter, so plain PEFT restores it too.
            modules_to_save=projector or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    base_model = model.get_base_model() if is_peft(model) else model
    for name in frozen_roots(base_model, family, trainable):
        keep_in_eval_mode(base_model.get_submodule(name))
    # Master weights of what trains stay fp32 even when the frozen rest is bf16/fp16.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def frozen_roots(model, family: Family, trainable: set[str]) -> list[str]:
    """The largest modules of frozen parts that hold nothing trainable (Qwen's tower holds its
    projector: with the projector training, the tower's other children are the roots)."""
    roots: list[str] = []
    for name, module in model.named_modules():
        part = family.part_of(name)
        if part is None or part in trainable or any(name.startswith(r + ".") for r in roots):
            continue
        if any(family.part_of(n) in trainable for n, _ in module.named_modules(prefix=name)):
            continue
        roots.append(name)
    return roots


def keep_in_eval_mode(module: torch.nn.Module) -> None:
    """A frozen part must not change with training: Trainer calls model.train() every step, which
    would let BatchNorm in a CNN tower (the mini base's EfficientNet) use batch statistics and
    overwrite its running stats, and would switch dropout on."""
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: self, module)


def is_peft(model) -> bool:
    return isinstance(model, PeftModel)
