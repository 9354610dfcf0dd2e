"""Loading a base of any family kit knows with plain transformers: weights (full or 4-bit),
processor, and the image handling its card records."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForImageTextToText, AutoProcessor

from kit.base.family import Family
from kit.base.folder import Base
from kit.core.errors import KitError
from kit.core.precision import default_device


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


def load_processor(path: Base | Path):
    proc = AutoProcessor.from_pretrained(os.fspath(path))
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise KitError(f"base {path}: no image+text processor found (processor_config.json); rebuild with `kit base build`")
    return proc


def model_config(base: Base):
    """A fresh transformers config from the base's config.json as already read (loading mutates it)."""
    config = copy.deepcopy(base.config)
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def load_model(base: Base | Path, dtype: torch.dtype = torch.float32, nf4: bool = False, device_map=None):
    """Load a checkpoint of a known family with plain transformers, its LLM 4-bit when `nf4`.
    Raises KitError for anything else."""
    base = Base.of(base)
    kwargs: dict[str, Any] = {"dtype": dtype, "config": model_config(base)}
    if nf4:
        kwargs["quantization_config"] = quantization_config(dtype, base.family)
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(base.path, **kwargs)
    base.family.check_layout(model, f"base {base.path}")
    return model


def load_base(path: Base | Path, dtype: torch.dtype, form: str = "full", device: torch.device | None = None):
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
