"""QLoRA on the CPU (bitsandbytes' fallback) at tiny size: what is 4-bit, what trains, what moves."""

from __future__ import annotations

import torch

from conftest import state_dict_of
from kit.core.recipes import load_recipe
from kit.train.run import prepare_model, train
from test_training import TINY


def _linear4bit(model) -> dict[str, int]:
    counts = {"vision": 0, "projector": 0, "llm": 0, "lm_head": 0}
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = "lm_head" if "lm_head" in name else "vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name else "llm"
            counts[key] += 1
    return counts


def test_only_the_llms_linear_layers_are_4bit_and_lora_plus_projector_train(tiny_base):
    recipe = load_recipe("llava15-lora", TINY + ["quantization=nf4", "lora.r=4", "lora.alpha=8"])
    model = prepare_model(recipe, tiny_base)
    # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert _linear4bit(model) == {"vision": 0, "projector": 0, "llm": 14, "lm_head": 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_qlora_training_moves_lora_and_projector_only(tiny_base, shapes, tmp_path):
    recipe = load_recipe("llava15-lora", TINY + ["quantization=nf4", "lora.r=4", "lora.alpha=8", "train.max_steps=3", "train.lr=1e-2"])
    out = train(recipe, base=str(tiny_base), data=shapes["instruct"], out=str(tmp_path / "q"), echo=lambda m: None)
    adapter = state_dict_of(out)
    base = state_dict_of(tiny_base)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    proj = {k: v for k, v in adapter.items() if "multi_modal_projector" in k}
    assert proj
    base_proj = {_tail(k): v for k, v in base.items() if "multi_modal_projector" in k}
    moved = [k for k, v in proj.items() if not torch.allclose(v.float(), base_proj[_tail(k)].float())]
    assert moved
    assert not any("vision_tower" in k for k in adapter)


def _tail(key: str) -> str:
    """Saved key names differ (transformers writes llava-hf's legacy layout; PEFT prefixes its own)."""
    return key[key.index("multi_modal_projector") :]
