"""Precision and device choice: one mapping from kit's precision names to torch dtypes, one default
device, and where a loaded model's inputs must go."""

from __future__ import annotations

from typing import Any

import torch

from kit.core.errors import KitError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def compute_dtype(precision: str, option: str = "train.precision") -> torch.dtype:
    """auto: bf16 where the GPU supports it, else fp32. KitError (naming `option`) for unknown names."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in named:
        raise KitError(f"{option} {precision}: choose {', '.join(PRECISIONS)}")
    return named[precision]


def tf32_available() -> bool:
    """TF32 tensor cores: NVIDIA compute capability 8.0 (Ampere) or newer."""
    return torch.cuda.is_available() and torch.version.cuda is not None and torch.cuda.get_device_capability(0) >= (8, 0)


def use_tf32(option: bool | str) -> bool:
    """The recipe's `train.tf32`; True where the hardware has none is an error, not a silent no-op."""
    if option == "auto":
        return tf32_available()
    if option and not tf32_available():
        raise KitError("train.tf32 is true but this machine has no TF32 GPU (NVIDIA Ampere or newer); set train.tf32=auto")
    return bool(option)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_device(device: Any = None) -> torch.device:
    """`device` if given, else the GPU when there is one."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def input_placement(model) -> tuple[torch.device, torch.dtype]:
    """Where a model's inputs go and the floating dtype pixel values need (4-bit weights are uint8
    and are skipped)."""
    first = next(p for p in model.parameters())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return first.device, dtype


def to_model(inputs: dict[str, Any], model) -> dict[str, Any]:
    """Inputs on the model's device; pixel values in its floating dtype."""
    device, dtype = input_placement(model)
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
