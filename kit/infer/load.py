"""Load anything kit trained for inference from its folder alone: a full model or a PEFT adapter.

A full model folder (config.json with a vision_config) loads with AutoModelForImageTextToText. An
adapter folder (adapter_config.json) names its base in its kit.json card (path + fingerprint); the
base is checked, loaded, and the adapter put on top. No `--model-base` flag, no naming rules.

Without kit, an adapter loads with plain transformers + PEFT (the projector travels inside the
adapter through `modules_to_save`, so nothing else is needed)::

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained("path/to/base")
    model = PeftModel.from_pretrained(model, "path/to/adapter")
    processor = AutoProcessor.from_pretrained("path/to/adapter")

A QLoRA adapter (recipe quantization nf4) was trained against 4-bit weights: load the base with the
same BitsAndBytesConfig as training (kit.base.load.quantization_config) to reproduce it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from kit.base.family import family_of
from kit.base.folder import ADAPTER_CONFIG, AdapterInfo, Base
from kit.base.load import load_base, load_processor
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.precision import compute_dtype, default_device
from kit.data.prompt_spec import PromptSpec

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _layout(path: Path) -> str:
    """'adapter' or 'model' by the files the folder holds; KitError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise KitError(f"{path} does not exist or is not a folder; give a model or adapter folder written by kit")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    hint = ""
    if (path / "trainable.safetensors").is_file():
        hint = " (it is a partial training checkpoint: resume the run with --resume, or use the run's final folder)"
    raise KitError(f"{path} is neither a model folder (config.json) nor an adapter folder ({ADAPTER_CONFIG}){hint}")


def folder_kind(path: Path) -> str:
    """'adapter' or 'model' (of a vision-language family kit knows); KitError for anything else."""
    kind = _layout(path)
    if kind == "model":
        family_of(path)
    return kind


def open_folder(path: Path) -> AdapterInfo | Base:
    """The folder opened as what it is: an adapter (its base opened and checked) or a full model,
    config.json read once. KitError as folder_kind, or for a missing or changed base."""
    return AdapterInfo.open(path) if _layout(path) == "adapter" else Base.open(path)


def processor_for(path: Path, base: Base | Path | None):
    """The processor saved with `path`, else its base's."""
    if any((Path(path) / f).is_file() for f in PROCESSOR_FILES):
        return load_processor(path)
    if base is None:
        raise KitError(f"{path}: no processor files (processor_config.json); the folder is incomplete")
    return load_processor(base)


def base_form(quantization: str, device: torch.device) -> str:
    """'nf4' where a QLoRA adapter's base can be loaded 4-bit as in training (CUDA), else 'full'."""
    return "nf4" if quantization == "nf4" and device.type == "cuda" else "full"


NF4_ON_CPU_NOTE = ("trained against a 4-bit (nf4) base; without CUDA the base is loaded unquantized on CPU, "
                   "so answers can differ slightly from the trained model's")


@dataclass
class Loaded:
    """A model ready to answer, and everything known about how to prompt it.

    kind: 'model' (a full model folder) or 'adapter' (a PEFT adapter on `base`); `base` is the
    adapter's base, or the model folder itself. quantization: 'none' | 'nf4' (how the adapter was
    trained). notes: things the caller should tell the user."""

    model: Any
    processor: Any
    spec: PromptSpec
    card: Card
    kind: str
    path: Path
    base: Base
    quantization: str = "none"
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)


def load_for_inference(path: Path, dtype: torch.dtype = torch.float32, device=None) -> Loaded:
    """The model in eval mode from a full model folder or a PEFT adapter folder, with how training
    prompted it. Raises KitError for a folder that is neither, a missing base, or a base whose
    fingerprint differs."""
    path = Path(path)
    opened = open_folder(path)
    notes: list[str] = []
    dev = default_device(device)
    if isinstance(opened, Base):
        base, kind, quant = opened, "model", "none"
        card = base.card or Card(kind="model")
        model = load_base(base, dtype, "full", device=dev)
        processor = processor_for(path, None)
    else:
        adapter, kind = opened, "adapter"
        base, card, quant = adapter.base, adapter.card, adapter.quantization
        if not adapter.has_card:
            notes.append(f"{path} has no kit.json card: the base's fingerprint could not be checked")
        form = base_form(quant, dev)
        if quant == "nf4" and form == "full":
            notes.append(f"this adapter was {NF4_ON_CPU_NOTE}")
            dev = torch.device("cpu")
        model = load_base(base, compute_dtype(card.precision) if form == "nf4" else dtype, form, device=dev)
        model = PeftModel.from_pretrained(model, str(path))
        processor = processor_for(path, base)
    model.eval()
    spec = PromptSpec.of_card(card, processor, base.family, base_aspect=base.image_aspect)
    return Loaded(model, processor, spec, card=card, kind=kind, path=path, base=base, quantization=quant, device=str(dev), notes=notes)


def describe_folder(path: Path) -> dict[str, Any]:
    """One folder, for listings: kind, base, recipe name, created, steps, metrics (from its card).

    Never loads weights. kind is the card's ('base', 'model', 'adapter', 'checkpoint') or, without a
    card, what the files say; 'unknown' for a folder kit cannot load.
    """
    path = Path(path)
    try:
        card = Card.read(path)
    except KitError:
        card = None
    try:
        kind = folder_kind(path)
    except KitError:
        kind = "unknown"
    recipe = card.recipe if card else None
    return {
        "path": str(path),
        "kind": card.kind if card else kind,
        "loads_as": kind,
        "base": card.base.path if card and card.base else None,
        "recipe": recipe.name if recipe else None,
        "quantization": recipe.quantization if recipe else None,
        "created": card.created if card else None,
        "steps": card.steps if card else None,
        "metrics": card.metrics if card else {},
        "evaluation": (card.evaluation if card else None) or {},
    }
