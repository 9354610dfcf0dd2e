"""The GPU memory estimate: ordering across recipes, and agreement with peaks measured on an H100."""

from __future__ import annotations

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from kit.core.errors import KitError
from kit.base.memory import GIB, estimate, parse_gpu
from kit.core.recipes import load_recipe


def _config_folder(tmp_path, hidden, inter, layers, heads, vocab):
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
        text_config=LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=vocab),
        image_token_index=vocab - 1,
    )
    cfg.save_pretrained(tmp_path)
    return tmp_path


def test_qlora_lora_full_order_on_a_llava15_7b_shape(tmp_path):
    base = _config_folder(tmp_path, 4096, 11008, 32, 32, 32064)
    qlora = estimate(load_recipe("medical"), base, 2048).total
    lora = estimate(load_recipe("medical", ["quantization=none"]), base, 2048).total
    full = estimate(load_recipe("llava15-finetune", ["train.batch_size=4"]), base, 2048).total
    assert qlora < 16 * GIB < lora < 26 * GIB < full  # QLoRA 7B fits a 16 GB card, bf16 LoRA a 24-32 GB one


@pytest.mark.parametrize(
    "recipe, overrides, measured_gib",
    [  # benchmarks/results/gpu_train_h100_2026-11-26.json: 8-layer 7B-width Llama + CLIP-L/336, batch 4, 658 tokens
        ("llava15-lora", ["train.batch_size=4"], 9.02),
        ("llava15-finetune", ["train.batch_size=4"], 32.41),
    ],
)
def test_estimate_agrees_with_measured_h100_peaks(tmp_path, recipe, overrides, measured_gib):
    base = _config_folder(tmp_path, 4096, 11008, 8, 32, 49153)
    est = estimate(load_recipe(recipe, overrides), base, 658).total / GIB
    assert abs(est - measured_gib) / measured_gib < 0.2, est


def test_parse_gpu():
    assert parse_gpu("24GB") == 24 * GIB and parse_gpu("80 GiB") == 80 * GIB
    with pytest.raises(KitError, match="like 24GB"):
        parse_gpu("big")


@pytest.mark.parametrize("card_gib, expect", [(80, False), (24, True)])
def test_auto_gradient_checkpointing_follows_the_estimate_and_the_card(tmp_path, monkeypatch, card_gib, expect):
    """QLoRA on LLaVA-1.5-7B (batch 4) at 1024 tokens needs ~44 GiB without recomputation: an 80 GB
    card skips it (faster steps), a 24 GB one keeps it; without CUDA it stays on."""
    import types

    import torch

    from kit.train.run import resolve_checkpointing

    base = _config_folder(tmp_path, 4096, 11008, 32, 32, 32064)
    recipe = load_recipe("llava15-qlora")
    assert recipe.train.gradient_checkpointing == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=card_gib * GIB))
    said = []
    resolved = resolve_checkpointing(recipe, base, 1024, echo=said.append)
    assert resolved.train.gradient_checkpointing is expect
    assert recipe.train.gradient_checkpointing == "auto"  # the caller's recipe is not changed
    assert said and ("on" if expect else "off") in said[0] and f"{card_gib} GiB on this GPU" in said[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_checkpointing(recipe, base, 1024, echo=said.append).train.gradient_checkpointing is True


def test_per_gpu_estimate_by_strategy_on_a_llava15_7b_shape(tmp_path):
    """LLaVA-1.5-7B stage 2 (full, batch 16 x 2048, checkpointing) on 8 GPUs, LLaVA's own setting:
    112 GB of training states alone do not fit one 80 GB card; sharding them does."""
    base = _config_folder(tmp_path, 4096, 11008, 32, 32, 32064)
    recipe = load_recipe("llava15-finetune")
    one = estimate(recipe, base, 2048)
    by = {s: estimate(recipe, base, 2048, gpus=8, strategy=s) for s in ("ddp", "fsdp", "zero2", "zero3")}
    n = one.detail["trainable_params"]
    assert 6.5e9 < n < 7.5e9 and one.trainable == n * 16
    assert one.total > 80 * GIB and by["ddp"].total > one.total  # DDP adds gradient buckets, shards nothing
    assert by["ddp"].working == n * 4
    assert by["fsdp"].trainable == one.trainable / 8 and by["fsdp"].weights == one.weights / 8
    assert by["zero2"].weights == one.weights and by["zero3"].weights == one.weights / 8
    assert by["zero3"].total < by["zero2"].total < by["ddp"].total
    assert by["fsdp"].total < 80 * GIB and by["zero3"].total < 80 * GIB
    # Activations and logits are per micro-batch: the same on every GPU whatever the strategy.
    assert {(e.activations, e.logits) for e in by.values()} == {(one.activations, one.logits)}
    # Doubling the GPUs halves what FSDP shards, nothing else.
    sixteen = estimate(recipe, base, 2048, gpus=16, strategy="fsdp")
    assert sixteen.trainable == by["fsdp"].trainable / 2 and sixteen.working == by["fsdp"].working


def test_per_gpu_estimate_refuses_what_kit_does_not_run(tmp_path):
    base = _config_folder(tmp_path, 256, 512, 2, 4, 1000)
    for strategy in ("fsdp", "zero3"):
        with pytest.raises(KitError, match="shards 4-bit weights"):
            estimate(load_recipe("medical"), base, 128, gpus=2, strategy=strategy)
    assert estimate(load_recipe("medical"), base, 128, gpus=2, strategy="zero2").total > 0
    with pytest.raises(KitError, match="--strategy tp: choose one of ddp, fsdp, zero2, zero3"):
        estimate(load_recipe("medical"), base, 128, gpus=2, strategy="tp")


def test_data_check_plans_memory_per_gpu_and_says_which_strategy_fits(tiny_base, shapes, capsys):
    from helpers import run_cli

    args = ["data", "check", "--recipe", "llava15-finetune", "--base", str(tiny_base), "--data", shapes["instruct"],
            "--set", f"data.image_folder={shapes['root']}"]
    code, out, err = run_cli(capsys, *args, "--gpus", "2", "--strategy", "fsdp", "--gpu", "1GB")
    assert code == 0, err
    assert "fsdp over 2 GPUs):" in out and "split over 2 GPUs" in out and "estimated peak per GPU" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("    ") and line.split()[0] in ("ddp", "fsdp", "zero2", "zero3")}
    assert set(table) == {"ddp", "fsdp", "zero2", "zero3"}
    assert table["fsdp"][-1] == "fsdp.yaml" and table["zero3"][-1] == "deepspeed_zero3.yaml"
    assert float(table["fsdp"][1]) < float(table["ddp"][1])
    code, out, err = run_cli(capsys, *args, "--gpus", "2", "--strategy", "tp")
    assert code == 2 and err.strip() == "error: --strategy tp: choose one of ddp, fsdp, zero2, zero3" and not out
