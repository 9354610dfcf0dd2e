"""The medical sample's texts (medical.yaml): checked entry by entry, then filled in per image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kit.ingest.samples.medical import MEDICAL, Pixels
from kit.ingest.samples.pixels import PixelBox


@dataclass
class Aug:
    kind: str  # "flip" | "gamma" | "crop" | "pixels"
    value: Any = None  # gamma exponent, crop fraction, or a replacement image
    note: str = ""  # for the README


@dataclass
class SampleImage:
    id: str
    pixels: np.ndarray  # uint8, (H, W) or (H, W, 3)
    captions: list[str]
    findings: list[str]
    metadata: dict[str, str]
    qa: list[tuple[str, str]]  # question, answer; "yes"/"no" answers are the closed ones
    origin: str
    licence: str
    rendering: str
    augs: list[Aug]
    boxes: list[tuple[str, PixelBox]] = field(default_factory=list)
    # True only while the image keeps its original left-right orientation: dropped for flips.
    sided: list[str] = field(default_factory=list)
    sided_metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- texts

TEXTS_FILE = Path(__file__).with_name("medical.yaml")
_TEXT_KEYS = {"captions", "findings", "metadata", "qa", "origin", "licence", "rendering", "augs"}
_OPTIONAL_TEXT_KEYS = {"sided", "sided_metadata"}
_AUG_VALUE = {"flip": None, "gamma": float, "crop": float, "pixels": str}  # kind -> type of its `value`


def _texts_error(rid: str, problem: str) -> RuntimeError:
    # The file ships inside kit, so a bad entry is a kit bug rather than a user error.
    return RuntimeError(f"{TEXTS_FILE.name}, entry '{rid}': {problem}; please report this")


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _check_entry(rid: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise _texts_error(rid, f"expected a mapping, got {type(entry).__name__}")
    missing, unknown = sorted(_TEXT_KEYS - entry.keys()), sorted(entry.keys() - _TEXT_KEYS - _OPTIONAL_TEXT_KEYS)
    if missing or unknown:
        raise _texts_error(rid, f"missing keys {missing}, unknown keys {unknown}")
    for key in ("captions", "findings", "sided"):
        if key in entry and not _is_strings(entry[key]):
            raise _texts_error(rid, f"'{key}' must be a list of strings")
    for key in ("metadata", "sided_metadata"):
        if key in entry and not _is_string_map(entry[key]):
            raise _texts_error(rid, f"'{key}' must map strings to strings")
    for key in ("origin", "licence", "rendering"):
        if not isinstance(entry[key], str):
            raise _texts_error(rid, f"'{key}' must be a string")
    # An unquoted yes/no is a YAML boolean, which would silently turn a closed question into an open one.
    if not isinstance(entry["qa"], list) or not all(_is_strings(p) and len(p) == 2 for p in entry["qa"]):
        raise _texts_error(rid, "'qa' must be a list of [question, answer] string pairs (quote \"yes\" and \"no\")")
    if not isinstance(entry["augs"], list):
        raise _texts_error(rid, "'augs' must be a list")
    for aug in entry["augs"]:
        kind = aug.get("kind") if isinstance(aug, dict) else None
        if kind not in _AUG_VALUE or not isinstance(aug.get("note"), str) or set(aug) - {"kind", "value", "note"}:
            raise _texts_error(rid, f"augmentation {aug!r} needs a kind out of {sorted(_AUG_VALUE)}, a note and nothing else but a value")
        value_type = _AUG_VALUE[kind]
        if (value_type is None) != ("value" not in aug) or (value_type is float and not isinstance(aug["value"], int | float)) or (value_type is str and not isinstance(aug["value"], str)):
            raise _texts_error(rid, f"augmentation {aug!r}: a {kind} takes {'no value' if value_type is None else f'a {value_type.__name__} value'}")


def load_texts(path: Path = TEXTS_FILE) -> dict[str, dict[str, Any]]:
    """medical.yaml's entries by id, checked: exactly one per builder, in `MEDICAL`'s order."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    ids = [rid for rid, _, _ in MEDICAL]
    found = list(data) if isinstance(data, dict) else []
    if found != ids:
        missing, unknown = [i for i in ids if i not in found], [i for i in found if i not in ids]
        raise RuntimeError(
            f"{path.name} must have one entry per sample image, in the order {ids}; missing {missing}, unknown {unknown}; please report this"
        )
    for rid, entry in data.items():
        _check_entry(rid, entry)
    return data


def sample_image(rid: str, texts: dict[str, Any], built: Pixels, fields: dict[str, Any]) -> SampleImage:
    """The image with its texts, every `{name}` in them filled from `fields`."""

    def fill(text: str) -> str:
        try:
            return text.format_map(fields)
        except (KeyError, IndexError, ValueError) as e:
            raise _texts_error(rid, f"cannot fill {text!r} ({type(e).__name__}: {e}); known fields: {sorted(fields)}") from None

    augs = []
    for aug in texts["augs"]:
        value = aug.get("value")
        if aug["kind"] == "pixels":
            if value not in built.images:
                raise _texts_error(rid, f"no image '{value}' for a pixels variant; the builder gives {sorted(built.images)}")
            value = built.images[value]
        augs.append(Aug(aug["kind"], value, fill(aug["note"])))
    return SampleImage(
        id=rid,
        pixels=built.pixels,
        captions=[fill(s) for s in texts["captions"]],
        findings=[fill(s) for s in texts["findings"]],
        metadata={k: fill(v) for k, v in texts["metadata"].items()},
        qa=[(fill(q), fill(a)) for q, a in texts["qa"]],
        origin=fill(texts["origin"]),
        licence=fill(texts["licence"]),
        rendering=fill(texts["rendering"]),
        augs=augs,
        boxes=built.boxes,
        sided=[fill(s) for s in texts.get("sided", [])],
        sided_metadata={k: fill(v) for k, v in texts.get("sided_metadata", {}).items()},
    )
