"""Recipes: typed, validated YAML that names everything a training stage does.

A recipe is data. `load_recipe` finds it by name or path, applies `--set a.b=c` overrides, and
validates the result against `Recipe`; every problem is reported at once, on one line, by key.
This module imports no torch so that `kit recipes list` and `kit --help` stay instant.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from kit.core.errors import KitError
from kit.core.files import PACKAGE_ROOT
from kit.core.network import redact_url

REPO_ROOT = PACKAGE_ROOT.parent
RECIPE_DIRS_ENV = "KIT_RECIPES_PATH"

Part = Literal["projector", "llm", "vision"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArgs(_Strict):
    base: str | None = Field(None, description="Base model folder, or 'mini' for the embedded default.")
    adapter: str | None = Field(None, description="Start from this LoRA adapter (a folder kit trained; --from): its LoRA "
                                                  "and projector train on, and its base is the base.")


class DataArgs(_Strict):
    path: str | None = Field(None, description="LLaVA JSON/JSONL file; --data overrides it.")
    image_folder: str | None = Field(None, description="Folder that `image` paths are relative to; default: the data file's folder.")
    template: Literal["plain", "vicuna_v1", "chat"] = Field(
        "chat", description="plain (stage 1), vicuna_v1, or chat (the tokenizer's own chat template)."
    )
    image_placement: Literal["auto", "reference", "first_turn"] = Field(
        "auto",
        description="Where <image> goes: reference (LLaVA: stays in its turn, only that turn stripped), first_turn "
        "(kit: opens the first human turn, every human turn stripped); auto = reference for plain/vicuna_v1, first_turn for chat.",
    )
    image_aspect: Literal["pad", "crop"] | None = Field(
        None, description="pad to a mean-colour square (LLaVA-1.5) or resize + center crop; default: the base's setting."
    )
    max_length: int = Field(2048, gt=0, description="Token limit per sample, image tokens included.")
    on_bad_sample: Literal["error", "skip"] = Field(
        "error", description="Missing/corrupt image, truncated image tokens, nothing to supervise: stop, or skip and count."
    )
    undecided: Literal["exclude", "include"] = Field(
        "exclude", description="A reviewed folder as data (kit review): train on the conversations nobody decided on, or not."
    )
    group_by_modality_length: bool = Field(True, description="Batch image and text-only samples apart, similar lengths together.")
    system_prompt: str | None = Field(None, description="Overrides the template's system message.")
    sample: str | None = Field(None, description="Sample set used when no --data is given (`kit data sample NAME`).")
    caption_pairs: bool = Field(False, description="adapt: also train on stage-1 caption pairs of the same images (LLaVA-Med's concept alignment).")
    vqa_train: bool = Field(
        False, description="adapt: also train on the eval file's questions about the training images (a VQA train split, as in LLaVA-Med's downstream finetuning)."
    )


class GenerateArgs(_Strict):
    """How `kit adapt` turns a manifest folder into instruction data (`kit generate`)."""

    domain: str = Field("general", description="Prompt set (kit/generate/prompts/<domain>.yaml).")
    types: list[Literal["conversation", "detail", "complex"]] = Field(["conversation", "detail", "complex"], min_length=1)
    backend: Literal["hf", "openai"] = "hf"
    model: str | None = None
    base_url: str | list[str] | None = None  # several: replicas of one model (kit.generate.replicas)
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.7, ge=0, le=2)
    concurrency: int = Field(8, gt=0)
    grounding: Literal["reject", "flag", "off"] = Field(
        "reject", description="What to do with a conversation that claims what its image's source does not support "
                              "(kit.ground): reject it, keep it and list it in flagged.jsonl, or check nothing.")
    vocab: str | None = Field(None, description="Claim vocabulary: a packaged name (general, medical, industrial, "
                                                "documents) or a YAML file; default: the one named like `domain`.")

    @field_serializer("base_url")
    def _recorded_url(self, value: str | list[str] | None):
        """Written out (recipe.yaml, cards) without userinfo or query: a URL can carry a password."""
        if isinstance(value, list):
            return [redact_url(v) for v in value]
        return redact_url(value)


class GateArgs(_Strict):
    """Limits on how much worse than its base an adapted model may be (points, 0..100). A limit is
    broken only when the change passes it and the change's 95% interval excludes zero; `kit adapt`
    then ends with an error (the adapter is kept and its card records the failed gate)."""

    pope_f1_drop: float | None = Field(None, ge=0, description="Largest allowed drop of POPE F1 over all probes.")
    chair_i_rise: float | None = Field(None, ge=0, description="Largest allowed rise of CHAIR_i.")
    closed_drop: float | None = Field(None, ge=0, description="Largest allowed drop of closed-question accuracy.")


class EvalArgs(_Strict):
    """The held-out evaluation run before and after adaptation (LLaVA-Med style VQA)."""

    held_out: float = Field(0.25, gt=0, lt=1, description="Fraction of images (augmented copies stay together) kept out of training.")
    file: str = Field("eval.jsonl", description="VQA items in the data folder: image, question, answer, answer_type closed|open.")
    max_new_tokens: int = Field(24, gt=0)
    metric: Literal["llava-med", "strict"] = Field(
        "llava-med", description="llava-med: LLaVA-Med's published scoring, questions as written; strict: kit's, with short-answer prompts."
    )
    probes: bool = Field(True, description="Add POPE probes and CHAIR describe items built from the held-out images' "
                                           "boxes and findings (kit data probes) to the evaluation.")
    probes_per_image: int = Field(2, gt=0, description="Yes questions per held-out image and probe set (as many no questions).")
    gate: GateArgs | None = None


class PreferenceArgs(_Strict):
    """Preference tuning (`train.objective: dpo`): TRL's DPO trainer on pairs (kit data pairs); the
    reference is the starting weights with the new training switched off (no second model)."""

    beta: float = Field(0.1, gt=0, description="How far from the reference the model may move for a preference (DPO's beta).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"] = Field(
        "sigmoid", description="The preference loss (TRL's names): sigmoid is DPO, ipo IPO, robust cDPO with label noise ...")
    sft_weight: float = Field(0.0, ge=0, description="Weight of a supervised loss on the chosen answers beside the "
                                                     "preference loss (RPO): keeps the model writing what it wrote.")
    vocab: str = Field("general", description="kit adapt: the vocabulary its pairs are made and checked with (kit data pairs).")
    per_answer: int = Field(2, gt=0, description="kit adapt: pairs per grounded answer at most.")


class LoraArgs(_Strict):
    r: int = Field(64, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="'all-linear' = every linear layer of the LLM (not the projector, tower or lm_head)."
    )


class TrainArgs(_Strict):
    objective: Literal["sft", "dpo"] = Field("sft", description="sft: next-token loss on the answers (LLaVA); dpo: "
                                                                "preference pairs (see the preference section).")
    trainable: list[Part] = Field(..., min_length=1, description="Parts that train; the rest stay frozen.")
    lr: float = Field(..., gt=0)
    projector_lr: float | None = Field(None, gt=0, description="Learning rate of the projector; default: lr.")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run the epochs).")
    batch_size: int = Field(1, gt=0, description="Per-device micro-batch.")
    global_batch_size: int | None = Field(
        None, gt=0, description="Samples per optimizer step over all devices; gradient accumulation makes up the rest."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 where the hardware supports it, else fp32.")
    tf32: bool | Literal["auto"] = Field(
        "auto", description="TF32 matmuls (LLaVA's scripts pass --tf32 True); auto: on where the GPU has them (Ampere or newer)."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        True,
        description="Recompute activations in backward (saves memory, costs ~30% step time). auto: off when kit's "
        "memory estimate without it, at the longest sample, fits the GPU with 15% to spare; on otherwise and on CPU.",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed (torch and numpy take 0 .. 2**32-1).")
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    logging_steps: int = Field(10, gt=0)
    num_workers: int = Field(2, ge=0)
    report_to: Literal["tensorboard", "wandb", "mlflow", "none"] = Field(
        "tensorboard",
        description="Where training metrics go besides kit's own CSV and loss plot: tensorboard (event files in the run "
        "folder), wandb (offline: a wandb/ folder in the run folder, `wandb sync` uploads it later), mlflow (a local "
        "file store, mlruns/ in the run folder), or none.",
    )
    tracker_online: bool = Field(
        False,
        description="wandb / mlflow: log to the tracker's server as the environment configures it (WANDB_MODE, "
        "MLFLOW_TRACKING_URI) instead of local files. The metrics and the run's settings then leave the machine.",
    )

    @model_validator(mode="after")
    def _batches_divide(self) -> "TrainArgs":
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size}"
            )
        return self


class Recipe(_Strict):
    name: str
    description: str = ""
    stage: Literal["pretrain", "finetune", "adapt"]
    model: ModelArgs = ModelArgs()
    data: DataArgs = DataArgs()
    train: TrainArgs
    lora: LoraArgs | None = Field(None, description="Train LoRA adapters on the LLM instead of its full weights.")
    preference: PreferenceArgs | None = Field(None, description="train.objective dpo: beta, loss, SFT weight (defaults when absent).")
    quantization: Literal["none", "nf4"] = Field("none", description="nf4: QLoRA (4-bit NF4 + double quantization of the LLM).")
    generate: GenerateArgs | None = None
    eval: EvalArgs | None = None
    embedded: dict[str, Any] = Field(
        default_factory=dict, description="Overrides (dotted keys) applied when the base is the embedded mini model on a CPU."
    )
    notes: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.quantization != "none" and self.lora is None:
            raise ValueError("quantization needs lora: 4-bit weights cannot be trained directly; add a lora section")
        if self.lora is not None and "llm" not in self.train.trainable:
            raise ValueError("lora is set but train.trainable lacks 'llm'; add 'llm' or remove lora")
        if self.train.objective == "dpo":
            if self.lora is None and self.model.adapter is None:
                raise ValueError("train.objective dpo needs lora (or model.adapter): the reference is the same weights "
                                 "with the adapter switched off, so no second copy of the model is held")
            if self.preference is None:
                self.preference = PreferenceArgs()
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def recipe_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(RECIPE_DIRS_ENV, "").split(os.pathsep) if p]
    return dirs + [REPO_ROOT / "recipes"]


def available_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(recipe_dirs()):
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                found[f.stem] = f
    return dict(sorted(found.items()))


def resolve_recipe_path(name_or_path: str) -> Path:
    """Raises KitError when neither a file nor a shipped recipe of that name exists."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise KitError(f"recipe file {p} does not exist; give a path to a .yaml file or a name from `kit recipes list`")
        return p
    recipes = available_recipes()
    if name_or_path not in recipes:
        raise KitError(
            f"unknown recipe '{name_or_path}'; available: {', '.join(recipes) or '(none)'} (or give a path to a .yaml file)"
        )
    return recipes[name_or_path]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise KitError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except OSError as e:
        raise KitError(f"{path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise KitError(f"{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise KitError(f"{path}: a recipe must be a YAML mapping of keys (name, stage, train, ...)")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise KitError(f"--set '{item}': expected key=value, e.g. --set train.lr=2e-5")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise KitError(f"--set '{item}': empty key part; use dotted keys like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return data


def set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def format_validation_error(source: str, err: ValidationError, what: str = "recipe") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (remove it or check the spelling)")
        elif e["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            parts.append(f"'{loc}': {msg}{shown}" if loc != "(top level)" else msg)
    return f"{what} {source}: " + "; ".join(parts)


def validate_recipe(data: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise KitError(format_validation_error(source, e)) from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None, embedded: bool | Callable[[Recipe], bool] = False, *,
                stage: str | None = None) -> Recipe:
    """Read, override and validate a recipe, once. Raises KitError naming the file and key on any
    problem, and (with `stage`) for a recipe of another stage.

    `embedded`: whether the recipe's own `embedded` settings apply (first; the user's overrides still
    win), or a rule deciding it from the recipe as overridden (e.g. kit.base.mini.embedded_rule).
    """
    path = resolve_recipe_path(name_or_path)
    raw = _read_yaml(path)
    validate_recipe(copy.deepcopy(raw), str(path))  # the file itself must be valid, embedded section included
    recipe = validate_recipe(apply_overrides(copy.deepcopy(raw), overrides or []), str(path))
    if stage is not None and recipe.stage != stage:
        raise KitError(f"recipe '{recipe.name}' is for `kit {recipe.stage}`, not `kit {stage}`; run it with `kit {recipe.stage}`")
    if embedded if isinstance(embedded, bool) else embedded(recipe):
        data = copy.deepcopy(raw)
        for key, value in (raw.get("embedded") or {}).items():
            set_dotted(data, key.split("."), copy.deepcopy(value))
        recipe = validate_recipe(apply_overrides(data, overrides or []), str(path))
    return recipe
