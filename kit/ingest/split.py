"""The held-out split of a manifest folder: whole images (augmented copies with their source) kept
out of training for the before/after evaluation, chosen by hash so the split is stable as data is
added; and where a recipe's sample set lives."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

PRIVATE_ROOT = Path("private_data")


def sample_folder(sample: str) -> Path:
    """Where `kit adapt` writes (and later finds) the sample set named `sample`."""
    return PRIVATE_ROOT / f"{sample}-sample"


def image_group(record_id: str) -> str:
    """Augmented copies (`<id>-aug1`, ...) belong to their source image."""
    return re.sub(r"-aug\d+$", "", record_id)


def held_out_groups(groups: set[str], fraction: float) -> set[str]:
    """round(fraction x groups) of them (at least one), chosen by hash: stable as data is added."""
    if not fraction or len(groups) < 2:
        return set()
    k = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    return set(sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())[:k])
