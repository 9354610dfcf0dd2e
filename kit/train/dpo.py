"""TRL's DPO trainer, fed by kit's data path (`train.objective: dpo`).

kit tokenises the pairs itself (kit.data.preference: the family's processor and template, every
processor tensor, the mask on exactly each final answer) and hands TRL ready batches; TRL computes
the log-probabilities, the reference and the loss. The model is kit's (LoRA on the LLM, QLoRA
where the recipe says, the projector inside the adapter); TRL keeps a frozen copy of the starting
adapter as "ref" and computes the reference with it active: the base weights are held once.
kit.train.run imports this module only for a preference run, so SFT runs work where trl is absent.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from trl import DPOConfig, DPOTrainer

from kit.core.errors import KitError
from kit.core.recipes import Recipe
from kit.data.preference import PairCollator, PreferenceDataset
from kit.train.args import training_kwargs
from kit.train.model import is_peft
from kit.train.trainer import ProjectorLr, ShardsOnCpu


class KitDPOTrainer(ShardsOnCpu, ProjectorLr, DPOTrainer):
    def __init__(self, *args, kit_recipe: Recipe, model, **kwargs):
        self.kit_recipe = kit_recipe
        dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, model=model, **kwargs)
        # On a 4-bit base TRL casts every trainable weight to bf16, the projector too, which then
        # meets fp32 image features where no autocast runs (CPU). kit trains them in the precision
        # its SFT path gives them, so QLoRA preference tuning is QLoRA as `kit adapt` runs it.
        for n, p in self.model.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])


def dpo_config(recipe: Recipe, out: Path, max_steps: int | None) -> DPOConfig:
    p = recipe.preference
    kwargs = training_kwargs(recipe, out, max_steps)
    losses, weights = [p.loss_type], [1.0]
    if p.sft_weight:
        losses.append("sft")
        weights.append(p.sft_weight)
    return DPOConfig(**kwargs, beta=p.beta, loss_type=losses, loss_weights=weights,
                     # kit's pairs are tokenised and checked against max_length already
                     max_length=None, precompute_ref_log_probs=False, disable_dropout=True)


def preference_trainer(model, recipe: Recipe, out: Path, max_steps: int | None, dataset: PreferenceDataset, processor,
                       callbacks: list) -> KitDPOTrainer:
    """TRL's DPO trainer on kit's model and batches. KitError when the model is not a PEFT model."""
    if not is_peft(model):
        raise KitError("preference tuning trains a LoRA adapter; the recipe needs a lora section (or model.adapter)")
    # TRL takes a `datasets` table; the rows only point into kit's dataset. An `images` column marks
    # the data as vision data, so TRL leaves tokenising and batching to kit's collator.
    rows = datasets.Dataset.from_dict({"index": list(range(len(dataset))),
                                       "images": [[str(p) for p in c.images] for c, _ in dataset.pairs]})
    return KitDPOTrainer(
        model=model,
        args=dpo_config(recipe, out, max_steps),
        train_dataset=rows,
        data_collator=PairCollator(dataset, dataset.processing.pad_id),
        processing_class=processor,
        callbacks=callbacks,
        kit_recipe=recipe,
    )
