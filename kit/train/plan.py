"""The run plan: which base, which data, which output folder, checked before anything is written."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.base.folder import ADAPTER_CONFIG, AdapterInfo, Base
from kit.base.mini import mini_base
from kit.core.cards import CARD_NAME, Card
from kit.core.errors import KitError
from kit.core.recipes import Recipe
from kit.data.reviewed import is_generated_folder
from kit.train.sharding import check_launch, check_resume_layout

DEFAULT_OUT_ROOT = {"pretrain": "outputs", "finetune": "outputs", "adapt": "adapters"}


@dataclass
class RunPlan:
    recipe: Recipe
    base: Base
    data: Path
    image_folder: Path | None
    out: Path
    resume: bool
    card_extra: dict[str, Any] = field(default_factory=dict)  # more for the final card (kit adapt: the review it trained under)


def resolve_base(recipe: Recipe, base: str | None) -> Base:
    """--base, else the recipe's, else the mini base: raw for stage 1 (it aligns the projector),
    aligned for later stages. KitError for a missing or non-LLaVA folder."""
    if recipe.model.adapter:
        return _adapter_base(recipe.model.adapter, base)
    choice = base or recipe.model.base or ("mini-raw" if recipe.stage == "pretrain" else "mini")
    if choice in ("mini", "mini-raw"):
        return Base.open(mini_base(aligned=choice == "mini"))
    path = Path(choice)
    if not path.is_dir():
        raise KitError(f"base {path} does not exist; pass --base with a model folder (or 'mini')")
    return Base.open(path)


def _adapter_base(adapter: str, base: str | None) -> Base:
    """The base an adapter to start from was trained on; KitError when it is not an adapter or a
    --base given besides it is another model."""
    path = Path(adapter)
    if not (path / ADAPTER_CONFIG).is_file():
        raise KitError(f"--from {path}: not an adapter folder (no {ADAPTER_CONFIG}); give a LoRA adapter kit trained")
    trained_on = AdapterInfo.open(path).base
    if base is not None:
        given = Base.open(mini_base() if base == "mini" else Path(base))
        if given.fingerprint != trained_on.fingerprint:
            raise KitError(f"--from {path} was trained on {trained_on.path}, not on --base {base}; leave --base out (the adapter's base is used)")
    return trained_on


def plan_output(recipe: Recipe, out: str | None, resume: bool) -> Path:
    """The run's folder (default: outputs/ or adapters/<recipe>-<time>). KitError when it cannot be
    used: --resume without a checkpoint there, or a non-empty folder without --resume; or a launch
    that would not do what its config says (kit.train.sharding.check_launch)."""
    check_launch()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and out is None:
        raise KitError("several processes need one shared --out folder; pass --out DIR")
    if out is None:
        if resume:
            raise KitError("--resume needs --out: the folder of the run to continue")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = str(Path(DEFAULT_OUT_ROOT[recipe.stage]) / f"{recipe.name}-{stamp}")
    out_path = Path(out)
    if resume:
        checkpoint = last_checkpoint(out_path)
        if not checkpoint:
            raise KitError(f"--resume: no checkpoint-* folder in {out_path}; run without --resume to start fresh")
        card = Card.read(checkpoint)
        check_resume_layout(getattr(card, "layout", None), checkpoint)
    elif int(os.environ.get("RANK", "0")) == 0 and out_path.exists() and any(out_path.iterdir()):
        # Only rank 0 checks: it may already have started writing when a slower rank gets here.
        raise KitError(f"--out {out_path} already exists and is not empty; pass --resume to continue it or choose another folder")
    return out_path


def data_file(recipe: Recipe, data: str | None) -> Path:
    """--data, else the recipe's data.path; KitError unless it is an existing file or a `kit
    generate` folder (trained under its review's rule, kit.data.reviewed)."""
    data_path = data or recipe.data.path
    if not data_path:
        raise KitError(f"recipe {recipe.name} names no data; pass --data FILE (LLaVA .json/.jsonl)")
    data_path = Path(data_path)
    if data_path.is_dir():
        if not is_generated_folder(data_path):
            raise KitError(f"--data {data_path} is a folder without data.json; give a LLaVA .json / .jsonl file or a kit "
                           "generate folder (reviewed with kit review)")
        return data_path
    if not data_path.is_file():
        raise KitError(f"data file {data_path} does not exist; pass --data with a LLaVA .json or .jsonl file")
    return data_path


def plan_run(recipe: Recipe, base: str | None, data: str | None, out: str | None, resume: bool) -> RunPlan:
    """Everything checked, nothing written."""
    data_path = data_file(recipe, data)
    out_path = plan_output(recipe, out, resume)
    return RunPlan(recipe, resolve_base(recipe, base), data_path, image_folder=image_folder(recipe), out=out_path, resume=resume)


def image_folder(recipe: Recipe) -> Path | None:
    return Path(recipe.data.image_folder) if recipe.data.image_folder else None


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: its card is written last, so a save cut short by a kill has none."""
    if not out.is_dir():
        return None
    cks = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / CARD_NAME).is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None
