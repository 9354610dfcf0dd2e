"""Loading a base of any family kit knows with plain transformers: weights (full or 4-bit),
processor, and the image handling its card records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from kit.base.family import Family, family_of
from kit.core.cards import CARD_NAME, Card, describe_source
from kit.core.errors import KitError
from kit.core.files import read_json
from kit.core.precision import default_device

ADAPTER_CONFIG = "adapter_config.json"


def quantization_config(compute: torch.dtype, family: Family):
    """QLoRA's 4-bit NF4 with double quantization, for the LLM's layers only."""
    from transformers import BitsAndBytesConfig

    # A custom skip list replaces the default skips, so lm_head is listed too.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=family.full_precision_modules(),
    )


def image_aspect_of(path: Path) -> str:
    """pad or crop: the base's setting from its card (pad, LLaVA-1.5's, when the card says nothing)."""
    card = Card.read(path)
    return (card.settings.get("image_aspect") if card else None) or "pad"


def load_processor(path: Path):
    proc = AutoProcessor.from_pretrained(path)
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise KitError(f"base {path}: no image+text processor found (processor_config.json); rebuild with `kit base build`")
    return proc


def load_model(path: Path, dtype: torch.dtype = torch.float32, nf4: bool = False, device_map=None):
    """Load a checkpoint of a known family with plain transformers, its LLM 4-bit when `nf4`.
    Raises KitError for anything else."""
    family = family_of(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if nf4:
        kwargs["quantization_config"] = quantization_config(dtype, family)
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    family.check_layout(model, f"base {path}")
    return model


def load_base(path: Path, dtype: torch.dtype, form: str = "full", device: torch.device | None = None):
    """The base in eval mode on `device` (default: the GPU if any): form 'full', 'nf4' (4-bit, as
    QLoRA trains) or 'dequantized' (nf4 then back to `dtype`: the weights a QLoRA adapter learned
    against). On CPU bitsandbytes' slow fallback serves the 4-bit forms."""
    dev = default_device(device)
    if form == "full":
        model = load_model(path, dtype=dtype).to(dev)
    else:
        # 4-bit weights are placed at load time.
        model = load_model(path, dtype=dtype, nf4=True,
                           device_map={"": dev.index or 0} if dev.type == "cuda" else None)
        if form == "dequantized":
            model.dequantize()
    return model.eval()


def adapter_base(path: Path) -> tuple[Path, str | None, Card | None]:
    """(base folder, fingerprint the adapter was trained on or None, card or None) — checked to exist and match."""
    path = Path(path)
    card = Card.read(path)
    base_str = card.base.path if card and card.base else None
    where = f"{path / CARD_NAME} ('base.path')"
    if not base_str:
        base_str = read_json(path / ADAPTER_CONFIG, "adapter config", fix="restore the file").get("base_model_name_or_path")
        where = f"{path / ADAPTER_CONFIG} ('base_model_name_or_path')"
    if not base_str:
        raise KitError(f"adapter {path} does not say which base it was trained on; add \"base\": {{\"path\": ...}} to {path / CARD_NAME}")
    base = Path(base_str)
    if not base.is_dir():
        raise KitError(
            f"adapter {path} was trained on base {base}, which does not exist (moved or deleted); "
            f"restore the base folder there, or edit {where} to point at its new location"
        )
    want = card.base.fingerprint if card and card.base else None
    if want:
        got = describe_source(base)["fingerprint"]
        if got != want:
            raise KitError(
                f"adapter {path} was trained on a different base than the folder now at {base} "
                f"(fingerprint {got}, expected {want}: its config.json or weight files changed); "
                f"restore the original base there, or edit {where} to point at it"
            )
    return base, want, card
