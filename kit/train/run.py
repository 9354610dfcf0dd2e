"""The one training path shared by pretrain, finetune and adapt.

setup (base, data, model, trainable set) -> HF Trainer -> save (model or adapter + processor +
resolved recipe + card + logs). What differs between stages lives in the recipe, not in code.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from kit.base.load import load_processor
from kit.base.memory import GIB, estimate
from kit.core.recipes import Recipe
from kit.core.stages import Stages
from kit.data.collator import Collator, supervised_loss
from kit.data.dataset import Report, build_dataset
from kit.data.preference import build_preference_dataset
from kit.train.args import close_tracker, resolve_checkpointing, training_args
from kit.train.logs import CsvLogger, plot_loss
from kit.train.model import is_peft, prepare_model
from kit.train.plan import RunPlan, last_checkpoint, plan_run
from kit.train.preference import LOGGED, drop_reference, preference_record
from kit.train.sharding import current_layout, set_fsdp_wrap
from kit.train.trainer import CheckpointCardCallback, KitTrainer, run_card


def train(recipe: Recipe, base: str | None = None, data: str | None = None, out: str | None = None,
          max_steps: int | None = None, resume: bool = False, callbacks: list[TrainerCallback] | None = None,
          echo=print) -> Path:
    """Plan (kit.train.plan.plan_run) and run one stage. Raises KitError for bad recipes, bases, data
    or resume requests, before anything is written."""
    return run(plan_run(recipe, base, data, out=out, resume=resume), max_steps, callbacks, echo=echo)


def run(plan: RunPlan, max_steps: int | None = None, callbacks: list[TrainerCallback] | None = None, echo=print,
        stages: Stages | None = None) -> Path:
    """Train as `plan` says; the data is fully checked before anything is written to `plan.out`.
    `stages` times the data checks and the training as two stages."""
    stages = stages or Stages(echo=lambda m: None)
    with stages.stage("checks"):
        processor, dataset, report = _checked_data(plan, echo)
    with stages.stage("training"):
        return _train(plan, processor, dataset, report=report, max_steps=max_steps, callbacks=callbacks, echo=echo)


def plan_data(plan: RunPlan, on_bad_sample: str | None = None) -> tuple[Any, Any, Report]:
    """(processor, dataset, report) of a run's data, tokenized for its base as the recipe says."""
    recipe = plan.recipe
    processor = load_processor(plan.base)
    data = recipe.data
    # The datasets choose the prompt format (kit.data.prompt_spec) from these, by the one rule.
    common = dict(max_length=data.max_length, image_aspect=data.image_aspect or plan.base.image_aspect, image_folder=plan.image_folder,
                  on_bad_sample=on_bad_sample or data.on_bad_sample, system=data.system_prompt, image_placement=data.image_placement,
                  family=plan.base.family)
    if recipe.train.objective == "dpo":
        dataset, report = build_preference_dataset(plan.data, processor, data.template, **common)
        return processor, dataset, report
    dataset, report = build_dataset(plan.data, processor, data.template, undecided=data.undecided, **common)
    return processor, dataset, report


def _checked_data(plan: RunPlan, echo) -> tuple[Any, Any, Report]:
    processor, dataset, report = plan_data(plan)
    echo(f"data: {report.summary()}")
    if isinstance(report, Report) and report.review is not None:
        echo(report.review.line())
    for line in report.problem_lines(5):
        echo(f"  skipped {line}")
    return processor, dataset, report


def _train(plan: RunPlan, processor, dataset, report: Report, max_steps: int | None,
           callbacks: list[TrainerCallback] | None, echo) -> Path:
    recipe = plan.recipe
    lengths = report.lengths if isinstance(report, Report) else report.lengths["chosen"] + report.lengths["rejected"]
    if recipe.train.gradient_checkpointing == "auto":
        recipe = resolve_checkpointing(recipe, plan.base, max(lengths, default=recipe.data.max_length), echo=echo)
        plan = replace(plan, recipe=recipe)
    lengths = report.lengths if isinstance(report, Report) else report.lengths["chosen"] + report.lengths["rejected"]
    if torch.cuda.is_available() and lengths:
        est = estimate(recipe, plan.base, int(sorted(lengths)[int(0.95 * (len(lengths) - 1))]))
        card = torch.cuda.get_device_properties(0).total_memory
        fits = "" if est.total <= card else " - more than this GPU has: lower train.batch_size or use quantization=nf4"
        echo(f"memory: estimated peak {est.total / GIB:.1f} GiB of {card / GIB:.0f} GiB{fits}")
    model = prepare_model(recipe, plan.base)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    echo(f"model: {plan.base.path} — training {n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M parameters ({', '.join(recipe.train.trainable)}{' via LoRA' if recipe.lora else ''})")
    wrapped = set_fsdp_wrap(model, plan.base.family)
    if wrapped:
        echo(f"fsdp: one shard unit per {', '.join(wrapped)} ({current_layout().describe()})")

    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "recipe.yaml").write_text(recipe.to_yaml())
    if recipe.train.objective == "dpo":
        from kit.train.dpo import preference_trainer  # trl only for preference runs (GPU images may lack it)

        trainer = preference_trainer(model, recipe, plan.out, max_steps=max_steps, dataset=dataset, processor=processor,
                                     callbacks=[CsvLogger(plan.out / "log.csv", extra=LOGGED), CheckpointCardCallback(plan), *(callbacks or [])])
    else:
        trainer = _sft_trainer(model, recipe, plan, dataset=dataset, processor=processor, max_steps=max_steps, callbacks=callbacks)
    try:
        result = trainer.train(resume_from_checkpoint=str(last_checkpoint(plan.out)) if plan.resume else None)
    finally:
        close_tracker(recipe)
    save_final(trainer, plan, report, metrics=result.metrics)
    return plan.out


def _sft_trainer(model, recipe, plan: RunPlan, dataset, processor, max_steps: int | None, callbacks) -> KitTrainer:
    args = training_args(recipe, plan.out, max_steps)
    return KitTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(dataset.processing.pad_id, supervised_logits_only=True),
        compute_loss_func=supervised_loss,
        processing_class=processor,
        callbacks=[CsvLogger(plan.out / "log.csv"), CheckpointCardCallback(plan), *(callbacks or [])],
        kit_recipe=recipe,
        kit_lengths=dataset.modality_lengths(),
    )


# Written last when a final save is moved into place: until it is there the folder does not load
# as a model or adapter, so a save killed midway never leaves weights without their card.
COMMIT_FILES = ("adapter_config.json", "config.json")
FINAL_STAGING = ".final-save"


def save_final(trainer: KitTrainer, plan: RunPlan, report: Report, metrics: dict[str, Any]) -> None:
    """Every rank takes part (ZeRO-3 / FSDP gather the weights); rank 0 writes. The weights, the
    processor and the card are written beside the run's folder first, then moved in, the file that
    makes the folder loadable last."""
    out = plan.out
    staging = out / FINAL_STAGING
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.final_save = True
    drop_reference(trainer.accelerator.unwrap_model(trainer.model))
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    kind = "adapter" if is_peft(trainer.accelerator.unwrap_model(trainer.model)) else "model"
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the card and recipe.yaml say the same
    plot_loss(out / "log.csv", out / "loss.png", title=f"{plan.recipe.name} ({plan.recipe.stage})")
    data_report = {"summary": report.summary(), "problems": len(report.problems)}
    extra = dict(plan.card_extra)
    if isinstance(report, Report) and report.review is not None:
        extra["review"] = report.review.to_json()
    if plan.recipe.train.objective == "dpo":
        extra["preference"] = preference_record(plan.recipe, report, trainer.state.log_history)
    run_card(plan, kind, steps=trainer.state.global_step, metrics=metrics, data_report=data_report, **extra).write(staging)
    commit_into(staging, out)


def commit_into(staging: Path, out: Path) -> None:
    """Move a finished save into `out`, the files that make it loadable (COMMIT_FILES) last."""
    for f in sorted(staging.iterdir(), key=lambda p: p.name in COMMIT_FILES):
        os.replace(f, out / f.name)
    staging.rmdir()
