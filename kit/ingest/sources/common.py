"""Helpers shared by the source readers: boxes, texts, relative paths."""

from __future__ import annotations

import math
import posixpath
from typing import Any, Iterable

from kit.core.errors import KitError

# A box may poke this far past the image edge (rounding in annotation tools) and is clamped.
_EDGE_TOLERANCE_PX = 1.0


# --------------------------------------------------------------------------- shared helpers


class BoxError(ValueError):
    """A box problem without location; callers add file/line/id before raising KitError."""


def pixel_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel corners -> normalised corners with three decimals, after the edge check.

    Raises BoxError when the box is inverted or lies outside the image by more than 1 px.
    """
    x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)  # numpy scalars would leak into JSON
    if any(not math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise BoxError("has a non-finite coordinate")
    if x2 < x1 or y2 < y1:
        raise BoxError(f"is inverted ([{x1:g}, {y1:g}, {x2:g}, {y2:g}] has x2 < x1 or y2 < y1)")
    tol = _EDGE_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise BoxError(
            f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}] (pixels, x1 y1 x2 y2) lies outside the {width} x {height} image"
        )
    x1, x2 = (min(max(v, 0.0), width) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), height) for v in (y1, y2))
    return (round(x1 / width, 3), round(y1 / height, 3), round(x2 / width, 3), round(y2 / height, 3))


def numbers(value: Any, n: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value]


def clean_texts(values: Iterable[str]) -> list[str]:
    """Stripped, blank-free, first occurrence kept: five near-identical captions add nothing."""
    out: list[str] = []
    for v in values:
        v = v.strip()
        if v and v not in out:
            out.append(v)
    return out


def safe_relpath(rel: Any) -> str | None:
    """A POSIX path that stays inside its folder, or None.

    The check is lexical on purpose: a symlinked images folder inside the data folder is fine,
    an absolute path or `..` is not (the data would stop being portable and could point anywhere).
    """
    if not isinstance(rel, str) or not rel.strip():
        return None
    rel = rel.strip().replace("\\", "/")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return None
    norm = posixpath.normpath(rel)
    if norm == "." or norm == ".." or norm.startswith("../"):
        return None
    return norm


def one_line(e: BaseException) -> str:
    # library messages (pydicom's codec hints) span lines; KitError is printed as one
    return " ".join(str(e).split())


def default_id(rel: str) -> str:
    return posixpath.splitext(rel)[0].replace("/", "_")


def text_list(value: Any, field: str, where: str) -> list[str]:
    """A string or a list of strings, cleaned (see clean_texts). KitError naming `where` otherwise."""
    if isinstance(value, str):
        return clean_texts([value])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return clean_texts(value)
    raise KitError(f"{where}: '{field}' must be a string or a list of strings")
