"""Scale-out: the shipped accelerate/DeepSpeed configs are valid, and a 2-process DDP run (CPU, gloo)
trains identical weights on both ranks with the global batch split over them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

import families
from helpers import kit_env

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CONFIG_DIR = REPO / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

# Every accelerate config this repo ships, and what it must be.
EXPECTED = {
    "ddp.yaml": "MULTI_GPU",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    "fsdp.yaml": "FSDP",
}


def _launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {a.dest for a in launch_command_parser()._actions}


def _launch_env(path: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file path` would put in the workers' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def test_the_expected_configs_are_shipped():
    assert {p.name for p in CONFIGS} == set(EXPECTED)
    # The recipes point users at these exact files.
    for recipe, cfg in [("llava15-pretrain", "deepspeed_zero2.yaml"), ("llava15-finetune", "deepspeed_zero3.yaml")]:
        assert f"configs/accelerate/{cfg}" in (REPO / "recipes" / f"{recipe}.yaml").read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    assert raw["distributed_type"] in {t.value for t in DistributedType}
    assert raw["distributed_type"] == EXPECTED[path.name]

    # accelerate's own loader rejects unknown top-level keys...
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type == DistributedType(raw["distributed_type"])
    assert cfg.num_processes >= 2 and cfg.num_machines == 1
    assert not cfg.use_cpu
    # ...but copies nested ones onto the launch arguments unchecked: check them against the launcher's options.
    dests = _launch_dests()
    nested = {k for k in cfg.deepspeed_config} | {k if k.startswith("fsdp") else f"fsdp_{k}" for k in cfg.fsdp_config}
    assert nested <= dests, f"unknown keys for accelerate launch: {sorted(nested - dests)}"

    if cfg.distributed_type == DistributedType.DEEPSPEED:
        stage = 2 if "zero2" in path.name else 3
        ds_file = cfg.deepspeed_config["deepspeed_config_file"]
        # Relative paths resolve against the launch directory: the repo root.
        assert not Path(ds_file).is_absolute() and (REPO / ds_file).is_file(), ds_file
        assert (REPO / ds_file).parent == CONFIG_DIR
        ds = json.loads((REPO / ds_file).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        # With a config file, these must come from the JSON (accelerate refuses them in the YAML).
        assert "mixed_precision" not in raw and "zero_stage" not in cfg.deepspeed_config
    if cfg.distributed_type == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_json_is_hf_trainer_compatible(name: str, stage: int):
    ds = json.loads((CONFIG_DIR / name).read_text())
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ds["gradient_accumulation_steps"] == "auto"
    assert ds["bf16"]["enabled"] == "auto"
    z = ds["zero_optimization"]
    assert z["stage"] == stage and z["overlap_comm"] is True and z["contiguous_gradients"] is True
    if stage == 3:
        assert z["stage3_gather_16bit_weights_on_model_save"] is True
    # No optimizer/scheduler sections: HF Trainer (KitTrainer) builds them, projector_lr included.
    assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_accepts_the_config(path: Path, monkeypatch):
    """Go through `accelerate launch`'s own argument handling and build the plugin a worker would build."""
    args, env = _launch_env(path)
    assert int(args.num_processes) == 8
    with mock.patch.dict(os.environ, env):
        if args.use_deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            # The plugin reads the JSON named in the env (relative to the launch directory, the repo
            # root) and refuses fields that the YAML and the JSON both set.
            monkeypatch.chdir(REPO)
            plugin = DeepSpeedPlugin()
            assert plugin.zero_stage == (2 if "zero2" in path.name else 3)
        elif args.use_fsdp:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
        else:
            assert args.multi_gpu and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize("family", families.FAMILIES)
def test_fsdp_wraps_each_block_of_every_family(family, smol_tokenizer_dir, monkeypatch):
    """One fsdp.yaml for every family: kit names the block classes from families.yaml, and
    accelerate's own wrap policy then makes one unit of every LLM and tower block, nothing else."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from kit.base.family import family_of_model
    from kit.train.sharding import set_fsdp_wrap

    assert "fsdp_transformer_layer_cls_to_wrap" not in yaml.safe_load((CONFIG_DIR / "fsdp.yaml").read_text())["fsdp_config"]
    model, _ = families.build(family, smol_tokenizer_dir)
    fam = family_of_model(model)
    _, env = _launch_env(CONFIG_DIR / "fsdp.yaml")
    with mock.patch.dict(os.environ, env):
        assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in os.environ
        named = set_fsdp_wrap(model, fam)
        plugin = FullyShardedDataParallelPlugin()
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [n for n, m in model.named_modules() if policy(m)]
    llm_blocks = [f"{fam.blocks.llm}.{i}" for i in range(len(model.get_submodule(fam.blocks.llm)))]
    tower = next(p for p in fam.blocks.vision if p in dict(model.named_modules()))
    tower_blocks = [f"{tower}.{i}" for i in range(len(model.get_submodule(tower)))]
    assert sorted(wrapped) == sorted(llm_blocks + tower_blocks), wrapped
    assert named == list(dict.fromkeys(type(model.get_submodule(n)).__name__ for n in llm_blocks + tower_blocks))
    assert isinstance(model.get_submodule(fam.blocks.llm), torch.nn.ModuleList)


def test_fsdp_wrap_refuses_classes_the_model_lacks(smol_tokenizer_dir):
    from kit.base.family import family_of_model
    from kit.core.errors import KitError
    from kit.train.sharding import set_fsdp_wrap

    model, _ = families.build("qwen2_vl", smol_tokenizer_dir)
    _, env = _launch_env(CONFIG_DIR / "fsdp.yaml")
    env["FSDP_TRANSFORMER_CLS_TO_WRAP"] = "LlamaDecoderLayer,CLIPEncoderLayer"  # an old hand-edited config
    with mock.patch.dict(os.environ, env), pytest.raises(KitError) as e:
        set_fsdp_wrap(model, family_of_model(model))
    assert "names LlamaDecoderLayer, CLIPEncoderLayer, which this model does not have" in str(e.value)
    assert "Qwen2VLDecoderLayer, Qwen2VLVisionBlock" in str(e.value)


def test_ddp_two_processes_on_cpu_train_identical_weights(tiny_base, shapes, kit_cache, tmp_path):
    import torch
    from safetensors.torch import load_file

    from conftest import state_dict_of

    out, dump = tmp_path / "run", tmp_path / "dump"
    env = kit_env(kit_cache, [TESTS])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(TESTS / "ddp_worker.py"), str(tiny_base), shapes["instruct"], str(out), str(dump),
    ]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])

    infos = [json.loads((dump / f"rank{i}.json").read_text()) for i in (0, 1)]
    for i, info in enumerate(infos):
        assert info["rank"] == i
        assert info["dist_initialized"] and info["dist_world_size"] == 2 and info["dist_backend"] == "gloo"
        assert info["args_world_size"] == 2
        assert info["gradient_accumulation_steps"] == 1  # global 8 = batch 4 x 2 processes
        assert info["global_step"] == 4
        # Each rank sees its half of the batches, not the whole data set.
        assert info["batches_per_rank"] == math.ceil(info["samples"] / 8), info

    a, b = (load_file(str(dump / f"rank{i}.safetensors")) for i in (0, 1))
    assert set(a) == set(b) and a
    assert any("multi_modal_projector" in k for k in a) and any("language_model" in k for k in a)
    assert not any("vision_tower" in k for k in a)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-6, worst

    # Parameter names (model.multi_modal_projector...) and saved names (multi_modal_projector... in
    # transformers' on-disk layout) may differ by a prefix: match on the module path.
    def saved_proj(state: dict) -> torch.Tensor:
        hits = [k for k in state if k.endswith("multi_modal_projector.linear_1.weight")]
        assert len(hits) == 1, sorted(k for k in state if "projector" in k)
        return state[hits[0]].float()

    proj = next(k for k in a if k.endswith("multi_modal_projector.linear_1.weight"))
    base_w = saved_proj(state_dict_of(tiny_base))
    assert a[proj].shape == base_w.shape
    assert not torch.allclose(a[proj].float(), base_w), "projector did not move: no training happened"

    # Rank 0 wrote the run; the saved model is what both ranks trained.
    assert torch.equal(saved_proj(state_dict_of(out)), a[proj].float())
    assert json.loads((out / "kit.json").read_text())["steps"] == 4
    assert not list(tmp_path.glob("outputs*")), "a rank wrote outside --out"


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
@pytest.mark.parametrize("recipe_name", ["llava15-pretrain", "llava15-finetune", "llava15-lora"])
def test_hf_trainer_deepspeed_integration_fills_every_auto(name, recipe_name, tmp_path, monkeypatch):
    """What the Trainer does with the JSON on 8 GPUs (deepspeed's own config code, run here without
    a GPU): every "auto" becomes the recipe's value, and nothing in the file contradicts it."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from kit.core.recipes import load_recipe
    from kit.train.args import training_kwargs

    recipe = load_recipe(recipe_name, ["train.precision=bf16"])  # what `auto` is on the GPUs these configs are for
    monkeypatch.setenv("WORLD_SIZE", "8")
    kwargs = training_kwargs(recipe, tmp_path, 100)
    monkeypatch.delenv("WORLD_SIZE")
    args = TrainingArguments(**kwargs)
    ds = HfTrainerDeepSpeedConfig(json.loads((CONFIG_DIR / name).read_text()))
    ds.trainer_config_process(args)

    class Llm:  # what trainer_config_finalize reads: the LLM's width (LLaVA-1.5 7B)
        config = type("C", (), {"hidden_size": 4096})()

    ds.trainer_config_finalize(args, Llm(), num_training_steps=100)
    assert '"auto"' not in json.dumps(ds.config), ds.config
    t = recipe.train
    assert ds.config["train_micro_batch_size_per_gpu"] == t.batch_size
    assert ds.config["gradient_accumulation_steps"] == t.global_batch_size // (t.batch_size * 8)
    assert ds.config["gradient_clipping"] == t.max_grad_norm
    assert ds.config["bf16"]["enabled"] is True and ds.config["fp16"]["enabled"] is False
    assert ds.is_zero3() == (name == "zero3.json")
    if ds.is_zero3():
        assert ds.config["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
