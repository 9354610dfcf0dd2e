"""The one training path shared by pretrain, finetune and adapt.

setup (base, data, model, trainable set) -> HF Trainer -> save (model or adapter + processor +
resolved recipe + card + logs). What differs between stages lives in the recipe, not in code.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from kit.core import cards
from kit.data.dataset import Collator, Report, build_dataset, supervised_loss
from kit.data.sampler import ModalityLengthSampler
from kit.core.errors import KitError
from kit.base.parts import check_llava_family, image_aspect_of, load_model, load_processor, part_of
from kit.core.recipes import Recipe
from kit.train.logs import CsvLogger, plot_loss

TRAINABLE_FILE = "trainable.safetensors"
DEFAULT_OUT_ROOT = {"pretrain": "outputs", "finetune": "outputs", "adapt": "adapters"}


@dataclass
class RunPlan:
    recipe: Recipe
    base: Path
    data: Path
    image_folder: Path | None
    out: Path
    resume: bool


def resolve_base(recipe: Recipe, base: str | None) -> Path:
    from kit.base.mini import mini_base

    # Stage 1 starts from an unaligned projector; later stages from the aligned one.
    choice = base or recipe.model.base or ("mini-raw" if recipe.stage == "pretrain" else "mini")
    if choice in ("mini", "mini-raw"):
        return mini_base(aligned=choice == "mini")
    path = Path(choice)
    if not path.is_dir():
        raise KitError(f"base {path} does not exist; pass --base with a model folder (or 'mini')")
    check_llava_family(path)
    return path


def plan_run(recipe: Recipe, base: str | None, data: str | None, out: str | None, resume: bool) -> RunPlan:
    data_path = data or recipe.data.path
    if not data_path:
        raise KitError(f"recipe {recipe.name} names no data; pass --data FILE (LLaVA .json/.jsonl)")
    data_path = Path(data_path)
    if not data_path.is_file():
        raise KitError(f"data file {data_path} does not exist; pass --data with a LLaVA .json or .jsonl file")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and out is None:
        raise KitError("several processes need one shared --out folder; pass --out DIR")
    if out is None:
        if resume:
            raise KitError("--resume needs --out: the folder of the run to continue")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = str(Path(DEFAULT_OUT_ROOT[recipe.stage]) / f"{recipe.name}-{stamp}")
    out_path = Path(out)
    if resume:
        if not last_checkpoint(out_path):
            raise KitError(f"--resume: no checkpoint-* folder in {out_path}; run without --resume to start fresh")
    elif int(os.environ.get("RANK", "0")) == 0 and out_path.exists() and any(out_path.iterdir()):
        # Only rank 0 checks: it may already have started writing when a slower rank gets here.
        raise KitError(f"--out {out_path} already exists and is not empty; pass --resume to continue it or choose another folder")
    image_folder = Path(recipe.data.image_folder) if recipe.data.image_folder else None
    return RunPlan(recipe, resolve_base(recipe, base), data_path, image_folder, out_path, resume)


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: its card is written last, so a save cut short by a kill has none."""
    if not out.is_dir():
        return None
    cks = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / cards.CARD_NAME).is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None


def compute_dtype(precision: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def quantization_config(compute: torch.dtype):
    from transformers import BitsAndBytesConfig

    # transformers 5 matches skip names by prefix/suffix: short names like "multi_modal_projector"
    # would silently quantize the projector and the tower. lm_head must be listed explicitly because
    # a custom list replaces the default skips.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    )


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
    from transformers import set_seed

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
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=lora_target_regex(model, recipe.lora.targets),
            # The projector travels inside the adapter, so plain PEFT restores it too.
            modules_to_save=["multi_modal_projector"] if "projector" in trainable else None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    for part, module in (("vision", _inner(model).vision_tower), ("projector", _inner(model).multi_modal_projector)):
        if part not in trainable:
            keep_in_eval_mode(module)
    if "llm" not in trainable:
        keep_in_eval_mode(_inner(model).language_model)
    # Master weights of what trains stay fp32 even when the frozen rest is bf16/fp16.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _inner(model):
    """The LlavaModel (vision_tower, multi_modal_projector, language_model), PEFT-wrapped or not."""
    if _is_peft(model):
        model = model.get_base_model()
    return model.model


def keep_in_eval_mode(module: torch.nn.Module) -> None:
    """A frozen part must not change with training: Trainer calls model.train() every step, which
    would let BatchNorm in a CNN tower (the mini base's EfficientNet) use batch statistics and
    overwrite its running stats, and would switch dropout on."""
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: self, module)


class KitTrainer(Trainer):
    """HF Trainer plus the three things LLaVA training needs: a projector learning rate, modality
    grouping, and checkpoints that hold only what trains (a stage-1 checkpoint is a few MB)."""

    def __init__(self, *args, kit_recipe: Recipe, kit_lengths: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.kit_recipe = kit_recipe
        self.kit_lengths = kit_lengths

    def create_optimizer(self, model=None):
        model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(model))
            proj_lr = self.kit_recipe.train.projector_lr or self.args.learning_rate
            groups: dict[tuple[bool, bool], list] = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((part_of(name) == "projector", name in decay), []).append(p)
            param_groups = [
                {"params": ps, "lr": proj_lr if is_proj else self.args.learning_rate, "weight_decay": self.args.weight_decay if dec else 0.0}
                for (is_proj, dec), ps in sorted(groups.items())
            ]
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            kwargs.pop("lr", None)
            self.optimizer = cls(param_groups, **kwargs)
        return self.optimizer

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
        return not self.final_save and not _is_peft(model) and not all(p.requires_grad for p in model.parameters())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._partial():
            return super()._save(output_dir, state_dict)
        from safetensors.torch import save_file

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
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(model or self.model)
        tensors = load_file(str(f))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
        if missing or set(tensors) - set(params):
            raise KitError(f"{f} does not match this run's trainable parameters (e.g. {(missing or sorted(set(tensors) - set(params)))[:2]}); was the recipe changed?")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


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
            cards.write_card(ck, _card(self.plan, "checkpoint", step=state.global_step))


def _card(plan: RunPlan, kind: str, **extra: Any) -> dict[str, Any]:
    return cards.new_card(
        kind,
        made_by=f"kit {plan.recipe.stage}",
        recipe=plan.recipe.model_dump(mode="json"),
        base=cards.describe_source(plan.base),
        data={"path": str(plan.data.resolve()), "sha256": cards.hash_files([plan.data])},
        **extra,
    )


def training_args(recipe: Recipe, out: Path, max_steps: int | None) -> TrainingArguments:
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = 1
    if t.global_batch_size:
        per_step = t.batch_size * world
        if t.global_batch_size % per_step:
            raise KitError(f"train.global_batch_size {t.global_batch_size} is not a multiple of batch_size x devices = {per_step}")
        accum = t.global_batch_size // per_step
    dtype = compute_dtype(t.precision)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=max_steps if max_steps is not None else t.max_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.num_workers,
        remove_unused_columns=False,
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )


CHECKPOINTING_HEADROOM = 0.85  # the estimate is within ~6% of measured peaks; leave room for fragmentation


def resolve_checkpointing(recipe: Recipe, base: Path, longest: int, echo=print) -> Recipe:
    """`gradient_checkpointing: auto` -> True/False for this GPU and this data (see TrainArgs)."""
    from kit.base.memory import GIB, estimate

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


def train(
    recipe: Recipe,
    base: str | None = None,
    data: str | None = None,
    out: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    echo=print,
) -> Path:
    """Run one stage. Data and base are fully checked before anything is written to `out`.

    Raises KitError for bad recipes, bases, data or resume requests.
    """
    plan = plan_run(recipe, base, data, out, resume)
    processor = load_processor(plan.base)
    dataset, report = build_dataset(
        plan.data,
        processor,
        recipe.data.template,
        recipe.data.max_length,
        recipe.data.image_aspect or image_aspect_of(plan.base),
        image_folder=plan.image_folder,
        on_bad_sample=recipe.data.on_bad_sample,
        system=recipe.data.system_prompt,
    )
    echo(f"data: {report.summary()}")
    for line in report.problem_lines(5):
        echo(f"  skipped {line}")
    if recipe.train.gradient_checkpointing == "auto":
        recipe = resolve_checkpointing(recipe, plan.base, max(report.lengths, default=recipe.data.max_length), echo)
        plan = replace(plan, recipe=recipe)
    if torch.cuda.is_available() and report.lengths:
        from kit.base.memory import GIB, estimate

        est = estimate(recipe, plan.base, int(sorted(report.lengths)[int(0.95 * (len(report.lengths) - 1))]))
        card = torch.cuda.get_device_properties(0).total_memory
        fits = "" if est.total <= card else " - more than this GPU has: lower train.batch_size or use quantization=nf4"
        echo(f"memory: estimated peak {est.total / GIB:.1f} GiB of {card / GIB:.0f} GiB{fits}")
    model = prepare_model(recipe, plan.base)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    echo(f"model: {plan.base} — training {n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M parameters ({', '.join(recipe.train.trainable)}{' via LoRA' if recipe.lora else ''})")

    args = training_args(recipe, plan.out, max_steps)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "recipe.yaml").write_text(recipe.to_yaml())
    trainer = KitTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(processor.tokenizer.pad_token_id, supervised_logits_only=True),
        compute_loss_func=supervised_loss,
        processing_class=processor,
        callbacks=[CsvLogger(plan.out / "log.csv"), CheckpointCardCallback(plan), *(callbacks or [])],
        kit_recipe=recipe,
        kit_lengths=dataset.modality_lengths(),
    )
    result = trainer.train(resume_from_checkpoint=str(last_checkpoint(plan.out)) if resume else None)
    save_final(trainer, plan, report, result.metrics)
    return plan.out


def save_final(trainer: KitTrainer, plan: RunPlan, report: Report, metrics: dict[str, Any]) -> None:
    """Every rank takes part (ZeRO-3 / FSDP gather the weights); rank 0 writes."""
    trainer.final_save = True
    trainer.save_model(str(plan.out))
    if not trainer.is_world_process_zero():
        return
    out = plan.out
    kind = "adapter" if _is_peft(trainer.accelerator.unwrap_model(trainer.model)) else "model"
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the card and recipe.yaml say the same
    plot_loss(out / "log.csv", out / "loss.png", title=f"{plan.recipe.name} ({plan.recipe.stage})")
    cards.write_card(
        out,
        _card(plan, kind, steps=trainer.state.global_step, metrics=metrics, data_report={"summary": report.summary(), "problems": len(report.problems)}),
    )
