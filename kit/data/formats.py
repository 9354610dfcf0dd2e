"""LLaVA JSON / JSONL samples: reading, structural checks, and `<image>` placement (LLaVA's rule or kit's)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.core.files import read_json, read_jsonl
from kit.core.templates import IMAGE_TOKEN

IMAGE_PLACEMENTS = ("reference", "first_turn")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Sample:
    id: str
    images: list[str]  # relative to the image folder, in the order of their placeholders
    turns: list[tuple[str, str]]  # ("user" | "assistant", text); <image> already placed
    where: str  # "file:line" or "file[index]", for messages
    problem: str | None = None  # set when the sample is unusable (reported, then skipped or fatal)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> str | None:
        """The first image (None for a text-only sample)."""
        return self.images[0] if self.images else None


def _read_records(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise KitError(f"data file {path} does not exist; pass --data with a LLaVA .json or .jsonl file")
    if path.suffix == ".jsonl":
        return [(f"{path}:{lineno}", rec) for lineno, rec in read_jsonl(path, "LLaVA data file", allow_empty=True)]
    data = read_json(path, "data file", expect=None)
    if not isinstance(data, list):
        raise KitError(f"{path}: expected a JSON list of samples (LLaVA format); use .jsonl for one sample per line")
    return [(f"{path}[{i}]", r) for i, r in enumerate(data)]


def _parse(where: str, rec: Any, index: int, placement: str) -> Sample:
    if not isinstance(rec, dict):
        raise KitError(f"{where}: a sample must be a JSON object with 'conversations'")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise KitError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    sid = str(rec.get("id", index))
    image = rec.get("image")
    images = [image] if isinstance(image, str) else image
    if image is None or image == "":
        images = []
    elif not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise KitError(
            f"{where}: sample '{sid}': field 'image' must be a relative path, or a non-empty list of them "
            f"(one per <image> placeholder), got {json.dumps(image)[:80]}"
        )
    turns: list[tuple[str, str]] = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise KitError(f"{where}: sample '{sid}': conversations[{j}] needs 'from' and 'value'")
        role = _ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise KitError(f"{where}: sample '{sid}': conversations[{j}].from '{turn['from']}' is not human/gpt")
        if not isinstance(turn["value"], str):
            raise KitError(f"{where}: sample '{sid}': conversations[{j}].value must be a string")
        turns.append((role, turn["value"]))
    sample = Sample(sid, images, turns, where=where, extra={k: v for k, v in rec.items() if k not in ("id", "image", "conversations")})
    _normalise(sample, placement)
    return sample


def _normalise(s: Sample, placement: str) -> None:
    """Drop a leading non-human turn (as LLaVA does), check the placeholders, then place the image."""
    turns = s.turns
    while turns and turns[0][0] != "user":
        turns = turns[1:]
    s.turns = turns
    if not any(r == "assistant" for r, _ in turns):
        s.problem = "no assistant turn to learn from"
    n_tokens = sum(t.count(IMAGE_TOKEN) for _, t in turns)
    in_answer = next((j for j, (r, t) in enumerate(turns) if r == "assistant" and IMAGE_TOKEN in t), None)
    n_images = len(s.images)
    if not n_images and n_tokens:
        s.problem = "text contains <image> but the sample has no 'image' field"
    elif in_answer is not None:
        s.problem = f"turn {in_answer + 1} is an answer that holds <image>; the placeholder belongs in a human turn"
    elif n_images == 1 and n_tokens > 1:
        s.problem = f"{n_tokens} <image> placeholders for 1 image; give one placeholder per image ('image' can be a list)"
    elif n_images > 1 and n_tokens not in (0, n_images):
        s.problem = f"{n_tokens} <image> placeholders for {n_images} images; give one placeholder per image, in order (or none)"
    if n_images and turns and s.problem is None:
        s.turns = place_image(turns, placement) if n_images == 1 else place_images(turns, n_images)


def place_image(turns: list[tuple[str, str]], placement: str) -> list[tuple[str, str]]:
    """Where the one image goes, and what whitespace around it is cut.

    reference (LLaVA's `preprocess_multimodal`, for plain / vicuna_v1): the turn that holds
    `<image>` keeps it, moved to its start and followed by a newline, and only that turn is
    stripped (a turn that is only `<image>` keeps no newline); other turns stay as written.
    first_turn (kit's rule for chat templates): every human turn is stripped and the image opens
    the first one. Either way a sample with an image but no placeholder gets one at the start of
    its first human turn (LLaVA would silently drop that image).
    """
    if placement not in IMAGE_PLACEMENTS:
        raise KitError(f"unknown image placement '{placement}'; choose one of {', '.join(IMAGE_PLACEMENTS)}")
    if placement == "first_turn":
        cleaned = [(r, t.replace(IMAGE_TOKEN, "").strip() if r == "user" else t) for r, t in turns]
        cleaned[0] = ("user", f"{IMAGE_TOKEN}\n{cleaned[0][1]}")
        return cleaned
    at = next((j for j, (_, t) in enumerate(turns) if IMAGE_TOKEN in t), 0)
    out = list(turns)
    role, text = out[at]
    out[at] = (role, (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip())
    return out


def place_images(turns: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """Several images: placeholders stay where the data put them (the order pairs them with the
    images); a sample without any gets all of them at the start of its first human turn."""
    if any(IMAGE_TOKEN in t for _, t in turns):
        return list(turns)
    out = list(turns)
    out[0] = ("user", f"{IMAGE_TOKEN}\n" * n + out[0][1].strip())
    return out


def placement_for(template: str, option: str = "auto") -> str:
    """The recipe's `data.image_placement`; auto = LLaVA's rule for its own templates, kit's for chat."""
    if option != "auto":
        return option
    return "reference" if template in ("plain", "vicuna_v1") else "first_turn"


def load_samples(path: Path, placement: str = "reference") -> list[Sample]:
    """Read a LLaVA .json list or .jsonl file. Structural errors raise KitError naming file and line.
    `placement`: how `<image>` is placed (see place_image)."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise KitError(f"data file {path} holds no samples")
    return parse_samples(records, placement)


def parse_samples(records: list[tuple[str, Any]], placement: str) -> list[Sample]:
    """(where, raw sample) pairs -> checked Samples. KitError naming `where` for a structural error
    or a duplicate id."""
    samples = [_parse(where, rec, i, placement=placement) for i, (where, rec) in enumerate(records)]
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise KitError(f"{s.where}: duplicate sample id '{s.id}' (first at {seen[s.id]}); ids must be unique")
        seen[s.id] = s.where
    return samples
