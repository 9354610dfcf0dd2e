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
same BitsAndBytesConfig as training (kit.train.quantization_config) to reproduce it exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kit.core import cards
from kit.core.errors import KitError

ADAPTER_CONFIG = "adapter_config.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KitError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); restore the file") from None
    if not isinstance(data, dict):
        raise KitError(f"{path}: expected a JSON object")
    return data


def _card(path: Path) -> dict[str, Any]:
    try:
        return cards.read_card(path) or {}
    except json.JSONDecodeError as e:
        raise KitError(f"{path / cards.CARD_NAME}:{e.lineno}: invalid JSON ({e.msg}); restore the file") from None


def folder_kind(path: Path) -> str:
    """'adapter' or 'model'; KitError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise KitError(f"{path} does not exist or is not a folder; give a model or adapter folder written by kit")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        if "vision_config" in cfg:
            return "model"
        raise KitError(
            f"{path} holds a model_type '{cfg.get('model_type')}' model without a vision tower; give a LLaVA-family model or a kit adapter folder"
        )
    hint = ""
    if (path / "trainable.safetensors").is_file():
        hint = " (it is a partial training checkpoint: resume the run with --resume, or use the run's final folder)"
    raise KitError(f"{path} is neither a model folder (config.json) nor an adapter folder ({ADAPTER_CONFIG}){hint}")


def adapter_base(path: Path) -> tuple[Path, str | None, dict[str, Any]]:
    """(base folder, fingerprint the adapter was trained on or None, card) — checked to exist and match."""
    path = Path(path)
    card = _card(path)
    base_info = card.get("base") if isinstance(card.get("base"), dict) else {}
    base_str = base_info.get("path")
    where = f"{path / cards.CARD_NAME} ('base.path')"
    if not base_str:
        base_str = _read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path")
        where = f"{path / ADAPTER_CONFIG} ('base_model_name_or_path')"
    if not base_str:
        raise KitError(f"adapter {path} does not say which base it was trained on; add \"base\": {{\"path\": ...}} to {path / cards.CARD_NAME}")
    base = Path(base_str)
    if not base.is_dir():
        raise KitError(
            f"adapter {path} was trained on base {base}, which does not exist (moved or deleted); "
            f"restore the base folder there, or edit {where} to point at its new location"
        )
    want = base_info.get("fingerprint")
    if want:
        got = cards.describe_source(base)["fingerprint"]
        if got != want:
            raise KitError(
                f"adapter {path} was trained on a different base than the folder now at {base} "
                f"(fingerprint {got}, expected {want}: its config.json or weight files changed); "
                f"restore the original base there, or edit {where} to point at it"
            )
    return base, want, card


def _processor_from(path: Path, base: Path | None):
    from kit.base.parts import load_processor

    if any((path / f).is_file() for f in PROCESSOR_FILES):
        return load_processor(path)
    if base is None:
        raise KitError(f"{path}: no processor files (processor_config.json); the folder is incomplete")
    return load_processor(base)


def _default_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _recipe_settings(card: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """How the model was prompted in training: template, system prompt, image aspect."""
    from kit.base.parts import image_aspect_of

    data = ((card.get("recipe") or {}).get("data")) or {}
    aspect = data.get("image_aspect")
    if aspect is None:
        settings = card.get("settings") or {}
        aspect = settings.get("image_aspect") or (image_aspect_of(base) if base is not None else "pad")
    return {"template": data.get("template"), "system_prompt": data.get("system_prompt"), "image_aspect": aspect}


def load_for_inference(path: Path, dtype: torch.dtype = torch.float32, device=None) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, processor, info) from a full model folder or a PEFT adapter folder.

    info: kind ('model' | 'adapter'), path, base (adapter only), quantization ('none' | 'nf4'),
    template / system_prompt / image_aspect (how training prompted it; None where unknown), notes
    (things the caller should tell the user), card.
    Raises KitError for a folder that is neither, a missing base, or a base whose fingerprint differs.
    """
    from kit.base.parts import load_model

    path = Path(path)
    kind = folder_kind(path)
    notes: list[str] = []
    dev = _default_device(device)
    if kind == "model":
        card = _card(path)
        model = load_model(path, dtype=dtype)
        model.to(dev)
        processor = _processor_from(path, None)
        info = {"kind": "model", "path": str(path), "base": None, "quantization": "none"}
        settings = _recipe_settings(card, path)
    else:
        from peft import PeftModel

        base, _, card = adapter_base(path)
        quant = ((card.get("recipe") or {}).get("quantization")) or "none"
        if quant == "nf4" and torch.cuda.is_available() and dev.type == "cuda":
            from kit.train.run import compute_dtype, quantization_config

            precision = (((card.get("recipe") or {}).get("train")) or {}).get("precision", "auto")
            qdtype = compute_dtype(precision)
            model = load_model(base, dtype=qdtype, quantization_config=quantization_config(qdtype), device_map={"": dev.index or 0})
        else:
            if quant == "nf4":
                notes.append(
                    "this adapter was trained against a 4-bit (nf4) base; without CUDA the base is loaded unquantized on CPU, "
                    "so answers can differ slightly from the trained model's"
                )
                dev = torch.device("cpu")
            model = load_model(base, dtype=dtype)
            model.to(dev)
        model = PeftModel.from_pretrained(model, str(path))
        processor = _processor_from(path, base)
        info = {"kind": "adapter", "path": str(path), "base": str(base), "quantization": quant}
        settings = _recipe_settings(card, base)
        if not card:
            notes.append(f"{path} has no kit.json card: the base's fingerprint could not be checked")
    model.eval()
    info.update(settings)
    info["notes"] = notes
    info["card"] = card
    info["device"] = str(dev)
    return model, processor, info


def describe(path: Path) -> dict[str, Any]:
    """One folder, for listings: kind, base, recipe name, created, steps, metrics (from its card).

    Never loads weights. kind is the card's ('base', 'model', 'adapter', 'checkpoint') or, without a
    card, what the files say; 'unknown' for a folder kit cannot load.
    """
    path = Path(path)
    card = {}
    try:
        card = _card(path)
    except KitError:
        pass
    try:
        kind = folder_kind(path)
    except KitError:
        kind = "unknown"
    base = card.get("base")
    recipe = card.get("recipe") or {}
    return {
        "path": str(path),
        "kind": card.get("kind") or kind,
        "loads_as": kind,
        "base": base.get("path") if isinstance(base, dict) else base,
        "recipe": recipe.get("name"),
        "quantization": recipe.get("quantization"),
        "created": card.get("created"),
        "steps": card.get("steps"),
        "metrics": card.get("metrics") or {},
        "evaluation": card.get("evaluation") or {},
    }
