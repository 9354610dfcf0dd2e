"""Trainer arguments from a recipe, and the choice `gradient_checkpointing: auto` stands for."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from kit.base.folder import Base
from kit.base.memory import GIB, estimate
from kit.core.errors import KitError
from kit.core.precision import compute_dtype, use_tf32
from kit.core.recipes import Recipe


def training_args(recipe: Recipe, out: Path, max_steps: int | None) -> TrainingArguments:
    return TrainingArguments(**training_kwargs(recipe, out, max_steps))


def training_kwargs(recipe: Recipe, out: Path, max_steps: int | None) -> dict:
    """The Trainer arguments a recipe sets (TrainingArguments' names; TRL's configs take them too)."""
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = 1
    if t.global_batch_size:
        per_step = t.batch_size * world
        if t.global_batch_size % per_step:
            raise KitError(f"train.global_batch_size {t.global_batch_size} is not a multiple of batch_size x devices = {per_step}")
        accum = t.global_batch_size // per_step
    dtype = compute_dtype(t.precision)
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        # A ratio on purpose: transformers 5 reads warmup_steps < 1 as a fraction of all steps (its
        # warmup_ratio is deprecated), which is what LLaVA's scripts mean by --warmup_ratio 0.03.
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=max_steps if max_steps is not None else t.max_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tf32=use_tf32(t.tf32) or None,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.num_workers,
        remove_unused_columns=False,
        report_to=tracker(recipe, out),
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )


TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny"}


def tracker(recipe: Recipe, out: Path) -> list[str] | str:
    """`train.report_to` for the Trainer. wandb and mlflow write local files unless
    `train.tracker_online`: their clients are pointed at the run folder through their own
    environment variables, which the Trainer's callbacks read when training starts."""
    name, online = recipe.train.report_to, recipe.train.tracker_online
    if name == "none":
        return "none"
    if name in TRACKER_PACKAGES and importlib.util.find_spec(name) is None:
        raise KitError(f"train.report_to {name} needs the {name} package: pip install {TRACKER_PACKAGES[name]} "
                       "(or `pip install 'kit[trackers]'`), or choose tensorboard or none")
    if name == "wandb" and not online:
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_DIR"] = str(Path(out).absolute())
        os.environ.setdefault("WANDB_PROJECT", recipe.name)
    if name == "mlflow" and not online:
        os.environ["MLFLOW_TRACKING_URI"] = (Path(out).absolute() / "mlruns").as_uri()
        # MLflow 3 keeps file stores working only on request (it steers users to databases).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", recipe.name)
    return [name]


def close_tracker(recipe: Recipe) -> None:
    """Finish the tracker's run when training ends (the Trainer leaves a wandb run open until the
    process exits, and its summary is written only then)."""
    if recipe.train.report_to == "wandb":
        import wandb  # present: tracker() checked before training

        if wandb.run is not None:
            wandb.finish()


CHECKPOINTING_HEADROOM = 0.85  # the estimate is within ~6% of measured peaks; leave room for fragmentation


def resolve_checkpointing(recipe: Recipe, base: Base, longest: int, echo=print) -> Recipe:
    """`gradient_checkpointing: auto` -> True/False for this GPU and this data (see TrainArgs)."""
    if not torch.cuda.is_available():
        on, why = True, "no CUDA device"
    else:
        card = torch.cuda.get_device_properties(0).total_memory
        without = recipe.model_copy(update={"train": recipe.train.model_copy(update={"gradient_checkpointing": False})})
        need = estimate(without, base, longest).total
        on = need > CHECKPOINTING_HEADROOM * card
        why = f"estimated {need / GIB:.1f} GiB without it at {longest} tokens, {card / GIB:.0f} GiB on this GPU"
    echo(f"gradient checkpointing: {'on' if on else 'off'} (auto: {why})")
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"gradient_checkpointing": on})})
