"""LLaVA JSON / JSONL samples: reading, structural checks, and `<image>` placement as LLaVA does it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.core.files import read_json, read_jsonl
from kit.core.templates import IMAGE_TOKEN
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Sample:
    id: str
    image: str | None  # relative to the image folder
    turns: list[tuple[str, str]]  # ("user" | "assistant", text); <image> already placed
    where: str  # "file:line" or "file[index]", for messages
    problem: str | None = None  # set when the sample is unusable (reported, then skipped or fatal)
    extra: dict[str, Any] = field(default_factory=dict)


def _read_records(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise KitError(f"data file {path} does not exist; pass --data with a LLaVA .json or .jsonl file")
    if path.suffix == ".jsonl":
        return [(f"{path}:{lineno}", rec) for lineno, rec in read_jsonl(path, "LLaVA data file", allow_empty=True)]
    data = read_json(path, "data file", expect=None)
    if not isinstance(data, list):
        raise KitError(f"{path}: expected a JSON list of samples (LLaVA format); use .jsonl for one sample per line")
    return [(f"{path}[{i}]", r) for i, r in enumerate(data)]


def _parse(where: str, rec: Any, index: int) -> Sample:
    if not isinstance(rec, dict):
        raise KitError(f"{where}: a sample must be a JSON object with 'conversations'")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise KitError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    sid = str(rec.get("id", index))
    image = rec.get("image")
    if image is not None and not isinstance(image, str):
        kind = "a list (multi-image samples are not supported)" if isinstance(image, list) else type(image).__name__
        raise KitError(f"{where}: sample '{sid}': field 'image' must be a relative path string, got {kind}")
    turns: list[tuple[str, str]] = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise KitError(f"{where}: sample '{sid}': conversations[{j}] needs 'from' and 'value'")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise KitError(f"{where}: sample '{sid}': conversations[{j}].from '{turn['from']}' is not human/gpt")
        if not isinstance(turn["value"], str):
            raise KitError(f"{where}: sample '{sid}': conversations[{j}].value must be a string")
        turns.append((role, turn["value"]))
    sample = Sample(sid, image or None, turns, where, extra={k: v for k, v in rec.items() if k not in ("id", "image", "conversations")})
    _normalise(sample)
    return sample


def _normalise(s: Sample) -> None:
    """LLaVA's rules: drop a leading non-human turn; one `<image>`, at the start of the first human turn."""
    turns = s.turns
    while turns and turns[0][0] != "user":
        turns = turns[1:]
    if not any(r == "assistant" for r, _ in turns):
        s.problem = "no assistant turn to learn from"
    n_tokens = sum(t.count(IMAGE_TOKEN) for _, t in turns)
    if s.image is None and n_tokens:
        s.problem = "text contains <image> but the sample has no 'image' field"
    elif n_tokens > 1:
        s.problem = f"{n_tokens} <image> placeholders; one image per sample is supported"
    if s.image is not None and turns:
        cleaned = [(r, t.replace(IMAGE_TOKEN, "").strip() if r == "user" else t) for r, t in turns]
        first_user = cleaned[0][1]
        cleaned[0] = ("user", f"{IMAGE_TOKEN}\n{first_user}")
        turns = cleaned
    s.turns = turns


def load_samples(path: Path) -> list[Sample]:
    """Read a LLaVA .json list or .jsonl file. Structural errors raise KitError naming file and line."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise KitError(f"data file {path} holds no samples")
    samples = [_parse(where, rec, i) for i, (where, rec) in enumerate(records)]
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise KitError(f"{s.where}: duplicate sample id '{s.id}' (first at {seen[s.id]}); ids must be unique")
        seen[s.id] = s.where
    return samples
