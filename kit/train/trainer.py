"""The one trainer: HF Trainer plus what LLaVA training needs, and the card every checkpoint carries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from kit.base.family import family_of_model
from kit.core.cards import Card, hash_files
from kit.data.reviewed import review_inputs
from kit.core.errors import KitError
from kit.core.recipes import Recipe
from kit.data.sampler import ModalityLengthSampler
from kit.train.model import is_peft
from kit.train.plan import RunPlan
from kit.train.sharding import current_layout, load_full_state, shard_on_cpu

TRAINABLE_FILE = "trainable.safetensors"


class ProjectorLr:
    """For a Trainer (HF's or TRL's) with `kit_recipe`: the projector learns at train.projector_lr."""

    kit_recipe: Recipe

    def create_optimizer(self, model=None):
        model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(model))
            family = family_of_model(model)
            proj_lr = self.kit_recipe.train.projector_lr or self.args.learning_rate
            groups: dict[tuple[bool, bool], list] = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((family.part_of(name) == "projector", name in decay), []).append(p)
            param_groups = [
                {"params": ps, "lr": proj_lr if is_proj else self.args.learning_rate, "weight_decay": self.args.weight_decay if dec else 0.0}
                for (is_proj, dec), ps in sorted(groups.items())
            ]
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            kwargs.pop("lr", None)
            self.optimizer = cls(param_groups, **kwargs)
        return self.optimizer


class ShardsOnCpu:
    """For a Trainer (HF's or TRL's): an FSDP launch shards on CPU process groups too (kit.train.sharding)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        shard_on_cpu(self)


class KitTrainer(ShardsOnCpu, ProjectorLr, Trainer):
    """HF Trainer plus the three things LLaVA training needs: a projector learning rate, modality
    grouping, and checkpoints that hold only what trains (a stage-1 checkpoint is a few MB)."""

    def __init__(self, *args, kit_recipe: Recipe, kit_lengths: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.kit_recipe = kit_recipe
        self.kit_lengths = kit_lengths

    def _get_train_sampler(self, train_dataset=None):
        if not self.kit_recipe.data.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthSampler(
            self.kit_lengths,
            batch_size=self.args.train_batch_size * self.args.world_size,
            megabatch_batches=max(1, self.args.gradient_accumulation_steps) * 8,
            seed=self.args.seed,
        )

    final_save = False  # the run's final save writes the whole model, checkpoints only what trains

    def _partial(self) -> bool:
        model = self.accelerator.unwrap_model(self.model)
        return not self.final_save and not is_peft(model) and not all(p.requires_grad for p in model.parameters())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._partial():
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if state_dict is not None:  # gathered for us under ZeRO-3 / FSDP
            tensors = {n: t.detach().cpu().contiguous() for n, t in state_dict.items() if n in names}
        else:
            tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n in names}
        save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        f = Path(resume_from_checkpoint) / TRAINABLE_FILE
        if not f.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model or self.model)
        tensors = load_file(str(f))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
        if missing or set(tensors) - set(params):
            raise KitError(f"{f} does not match this run's trainable parameters (e.g. {(missing or sorted(set(tensors) - set(params)))[:2]}); was the recipe changed?")
        load_full_state(model, tensors)


class CheckpointCardCallback(TrainerCallback):
    """Each checkpoint carries the resolved recipe and a card pointing at its base."""

    def __init__(self, plan: RunPlan):
        self.plan = plan

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ck.is_dir():
            (ck / "recipe.yaml").write_text(self.plan.recipe.to_yaml())
            run_card(self.plan, "checkpoint", step=state.global_step, layout=current_layout().to_json()).write(ck)


def run_card(plan: RunPlan, kind: str, **extra: Any) -> Card:
    """The card of a checkpoint or of the run's final folder: recipe, base, data, and `extra`."""
    return Card.new(
        kind,
        made_by=f"kit {plan.recipe.stage}",
        recipe=plan.recipe,
        base=plan.base.source(),
        data={"path": str(plan.data.resolve()), "sha256": hash_files(review_inputs(plan.data))},
        **extra,
    )
