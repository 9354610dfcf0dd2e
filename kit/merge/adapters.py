"""Adapter folders as merge inputs: what each one was trained on and how, and how a card names it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kit.base.folder import AdapterInfo
from kit.core import options
from kit.core.cards import CARD_NAME, describe_source, hash_files
from kit.core.errors import KitError
from kit.infer.load import folder_kind

PRECISIONS = options.MERGE_PRECISIONS


def precision_problems(base_precision: str, tolerance: float) -> list[str]:
    """What is wrong with the options every merge takes, as --flag messages."""
    out = []
    if base_precision not in PRECISIONS:
        out.append(f"--base-precision {base_precision}: choose {' or '.join(PRECISIONS)}")
    if not tolerance >= 0:
        out.append(f"--tolerance {tolerance}: give a number >= 0 (max |Δlogit|)")
    return out


def check_out(out: Path, force: bool, inputs: list[Path]) -> None:
    """Raise KitError when `out` cannot be written: non-empty without `force`, a file, or an input."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KitError(f"--out {out} is a file; give a folder path")
    resolved = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if resolved == p or p.is_relative_to(resolved):
            raise KitError(f"--out {out} would replace an input ({p}); choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise KitError(f"--out {out} already exists and is not empty; choose another folder or pass --force to replace it")
        if not (out / CARD_NAME).is_file():
            raise KitError(f"--out {out} holds files kit did not write (no {CARD_NAME}); --force replaces only kit's own "
                           "output folders: choose another folder")


def adapter_info(path: Path) -> AdapterInfo:
    """An adapter folder as a merge input (kit.base.folder.AdapterInfo), its weights file present.

    Raises KitError for a folder that is not an adapter, a missing/changed base, or broken files.
    """
    path = Path(path)
    if folder_kind(path) != "adapter":
        raise KitError(f"{path} is a full model, not an adapter; there is nothing to merge")
    check_weights(path)
    return AdapterInfo.open(path)


def check_weights(path: Path) -> None:
    """KitError for an adapter folder without its weights file."""
    if not any(Path(path).glob("adapter_model.*")):
        raise KitError(f"adapter {path}: no adapter_model.safetensors; the folder is incomplete (copy it again from the run's output)")


def source_entry(info: AdapterInfo) -> dict[str, Any]:
    """How a card names an input adapter: path, fingerprint, file hash, how it was trained."""
    files = [p for p in info.path.iterdir() if p.name.startswith("adapter_") and p.is_file()]
    return {**describe_source(info.path), "sha256": hash_files(files), "recipe": info.card.recipe.name if info.card.recipe else None,
            "quantization": info.quantization, "steps": info.card.steps}
