"""build -> pretrain -> finetune on a tiny LLaVA: what moves, what stays, that it learns, and resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from conftest import held_out_loss, state_dict_of
from helpers import tiny
from kit.core.recipes import load_recipe
from kit.train.run import train
from kit.train.logs import read_losses

TINY = tiny()


def _changed(before: dict, after: dict, atol: float = 0.0) -> set[str]:
    assert set(before) == set(after), set(before) ^ set(after)
    return {k for k in before if not torch.allclose(before[k].float(), after[k].float(), atol=atol, rtol=0)}


def _part(k: str) -> str:
    return "projector" if "multi_modal_projector" in k else "vision" if "vision_tower" in k else "llm"


@pytest.fixture(scope="module")
def pretrained(tiny_base, shapes, tmp_path_factory):
    recipe = load_recipe("llava15-pretrain", TINY + ["train.lr=1e-2", "train.max_steps=40"])
    return train(recipe, base=str(tiny_base), data=shapes["pretrain"], out=str(tmp_path_factory.mktemp("pt") / "run"), echo=lambda m: None)


def test_base_build_loads_in_plain_transformers_without_kit(tiny_base):
    code = f"""
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
m = AutoModelForImageTextToText.from_pretrained({str(tiny_base)!r})
p = AutoProcessor.from_pretrained({str(tiny_base)!r})
msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "hi"}}]}}]
text = p.apply_chat_template(msgs, add_generation_prompt=True)
x = p(images=Image.new("RGB", (40, 30), (9, 99, 200)), text=text, return_tensors="pt")
n = int((x["input_ids"] == m.config.image_token_id).sum())
out = m(**x)
assert not any(k == "kit" or k.startswith("kit.") for k in sys.modules)
print(type(m).__name__, n, tuple(out.logits.shape))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    name, n, _ = r.stdout.split(maxsplit=2)
    assert name == "LlavaForConditionalGeneration"
    assert int(n) == 16  # (32 / 8)^2 patches, CLS dropped ("default" strategy)
    card = json.loads((tiny_base / "kit.json").read_text())
    assert card["kind"] == "base" and card["settings"]["projector"] == "mlp2x_gelu"
    assert "{% generation %}" in (tiny_base / "chat_template.jinja").read_text().replace("{%- generation -%}", "{% generation %}")


def test_pretrain_moves_only_the_projector_and_learns(tiny_base, pretrained, held_out_shapes):
    changed = _changed(state_dict_of(tiny_base), state_dict_of(pretrained))
    assert changed and {_part(k) for k in changed} == {"projector"}
    assert len(changed) == 4  # linear_1/linear_2 weight and bias
    before = held_out_loss(tiny_base, held_out_shapes["pretrain"], "plain")
    after = held_out_loss(pretrained, held_out_shapes["pretrain"], "plain")
    assert after < 0.85 * before, (before, after)
    assert len(read_losses(pretrained / "log.csv")) == 40
    assert (pretrained / "loss.png").stat().st_size > 1000
    assert list((pretrained / "runs").rglob("events.out.tfevents*"))
    card = json.loads((pretrained / "kit.json").read_text())
    assert card["kind"] == "model" and card["recipe"]["stage"] == "pretrain" and card["steps"] == 40


def test_full_finetune_moves_projector_and_llm_not_vision(pretrained, shapes, held_out_shapes, tmp_path):
    recipe = load_recipe("llava15-finetune", TINY + ["train.lr=3e-3", "train.max_steps=12"])
    out = train(recipe, base=str(pretrained), data=shapes["instruct"], out=str(tmp_path / "ft"), echo=lambda m: None)
    changed = _changed(state_dict_of(pretrained), state_dict_of(out))
    parts = {_part(k) for k in changed}
    assert parts == {"projector", "llm"}
    assert not any("vision_tower" in k for k in changed)
    before = held_out_loss(pretrained, held_out_shapes["instruct"], "vicuna_v1")
    after = held_out_loss(out, held_out_shapes["instruct"], "vicuna_v1")
    assert after < 0.8 * before, (before, after)


def test_lora_finetune_writes_a_peft_adapter_that_plain_peft_loads(pretrained, shapes, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    recipe = load_recipe("llava15-lora", TINY + ["train.max_steps=6", "lora.r=4", "lora.alpha=8", "train.lr=1e-2", "train.projector_lr=1e-3"])
    out = train(recipe, base=str(pretrained), data=shapes["instruct"], out=str(tmp_path / "lora"), echo=lambda m: None)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    adapter = state_dict_of(out)
    lora_keys = [k for k in adapter if "lora_" in k]
    assert lora_keys and all("language_model" in k for k in lora_keys)
    assert any("multi_modal_projector" in k for k in adapter), "projector must travel inside the adapter"
    base = AutoModelForImageTextToText.from_pretrained(pretrained)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, out).merge_and_unload()
    changed = {_part(k) for k in _changed(ref, {k: v for k, v in model.state_dict().items() if k in ref})}
    assert changed == {"projector", "llm"}


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


def test_resume_matches_an_uninterrupted_run(pretrained, shapes, tmp_path):
    over = TINY + ["train.lr=3e-3", "train.max_steps=6", "train.save_steps=3", "train.warmup_ratio=0.2"]
    recipe = load_recipe("llava15-finetune", over)
    full = train(recipe, base=str(pretrained), data=shapes["instruct"], out=str(tmp_path / "full"), echo=lambda m: None)
    part = tmp_path / "part"
    train(recipe, base=str(pretrained), data=shapes["instruct"], out=str(part), callbacks=[StopAt(3)], echo=lambda m: None)
    assert (part / "checkpoint-3").is_dir()
    resumed = train(recipe, base=str(pretrained), data=shapes["instruct"], out=str(part), resume=True, echo=lambda m: None)
    a, b = state_dict_of(full), state_dict_of(resumed)
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert _changed(state_dict_of(pretrained), b)  # it trained at all
