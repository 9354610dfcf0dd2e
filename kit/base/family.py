"""The LLaVA family's layout, described once: which parameters are the vision tower, the projector
and the LLM, how to tell a LLaVA-family folder, and how many tokens one image becomes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.core.files import read_json

# Parameter-name prefixes of the parts a recipe can train or freeze.
PART_PREFIXES = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}
# Module names (not prefixes) that stay unquantized in QLoRA: transformers 5 matches skip names by
# prefix/suffix, so the short names would silently quantize the projector and the tower.
FULL_PRECISION_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
PROJECTOR_MODULE = "multi_modal_projector"


def part_of(name: str) -> str | None:
    """Which part ('vision', 'projector', 'llm') a parameter name belongs to; PEFT prefixes allowed."""
    name = name.removeprefix("base_model.model.")
    for part, prefixes in PART_PREFIXES.items():
        if any(name.startswith(p) for p in prefixes):
            return part
    return None


def check_llava_family(path: Path) -> dict[str, Any]:
    """The folder's config.json; KitError unless it holds a LLaVA-family model (vision tower + projector + LLM)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise KitError(f"base {path}: no config.json; give a folder made by `kit base build` or a llava-hf checkpoint")
    cfg = read_json(cfg_file, "model config", fix="restore the file")
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise KitError(
            f"base {path} is not a LLaVA-family model (model_type '{cfg.get('model_type')}' has no vision tower); "
            "build one with `kit base build` or use a llava-hf checkpoint"
        )
    return cfg


def image_token_count(processor) -> int:
    """How many tokens one `<image>` becomes, as the processor expands it."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or ip.size
    h = crop.get("height") or crop.get("shortest_edge")
    w = crop.get("width") or crop.get("shortest_edge")
    n = (h // processor.patch_size) * (w // processor.patch_size) + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n
