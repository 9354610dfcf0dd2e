"""VQA evaluation items (LLaVA-Med style), one question per JSONL line::

    {"id": "q1", "image": "images/a.png", "question": "Is there a fracture?", "answer": "yes", "answer_type": "closed"}
    {"id": "q2", "image": "images/a.png", "question": "Which organ is shown?", "answer": "left lung", "answer_type": "open"}

`closed` questions have a fixed set of answers: yes/no, or options such as "left" / "right" or
"CT" / "MRI" (SLAKE has them); `open` ones are free text. Hallucination probes (`kit data probes`)
are closed yes/no items with a `probe` field ({"concept", "set"}); `describe` items ask for a
description and carry the image's `facts` and the `vocab` that scores it (CHAIR), with an empty answer.

`image` is relative to the file's folder (or the image folder a kit data card there names); a line
without one asks a text question (`describe` items need their image). Other
fields (`context`, `category` for judged evaluation) are kept in `Item.extra`. Read by `kit eval`,
`kit adapt` (held-out split, VQA training pairs) and `kit data check`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.core.files import read_jsonl
from kit.data.dataset import default_image_folder
from kit.data.images import ImageProblem, check_image, resolve_image

FIELDS = ("id", "image", "question", "answer", "answer_type")
ANSWER_TYPES = ("closed", "open", "describe")
# What kit appends to a question when it asks for a short answer (the `strict` metric's prompts), in
# evaluation and VQA training alike. LLaVA-Med asks its questions as written.
SUFFIX = {"closed": "Answer yes or no.", "open": "Answer briefly."}
PROMPT_STYLES = ("as-written", "short-answer")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass
class Item:
    id: str
    image: Path | None  # None: a text question (no image)
    question: str
    answer: str
    answer_type: str
    where: str  # file:line, for messages
    extra: dict[str, Any] = field(default_factory=dict)


def words(text: str) -> list[str]:
    """Lowercased words with punctuation stripped ("It's red." -> ["it", "s", "red"])."""
    return _WORD.findall(str(text).lower())


def yes_no(text: str) -> str | None:
    """The first 'yes' or 'no' word of `text`, or None."""
    return next((w for w in words(text) if w in ("yes", "no")), None)


def is_yes_no(answer: str) -> bool:
    """A closed answer that is yes or no (as opposed to options such as "left" or "CT")."""
    return words(answer)[:1] in (["yes"], ["no"])


def ask(question: str, answer: str, answer_type: str, style: str) -> str:
    """The question as the model is asked it: as written, or with kit's short-answer suffix."""
    if style == "as-written":
        return question
    kind = "closed" if answer_type == "closed" and is_yes_no(answer) else "open"
    return f"{question} {SUFFIX[kind]}"


def load_items(data: Path, image_folder: Path | None = None, limit: int | None = None) -> list[Item]:
    """Parse and check an evaluation file. KitError (naming file:line) for any problem."""
    data = Path(data)
    if limit is not None and limit < 1:
        raise KitError(f"--limit must be at least 1 (got {limit})")
    if not data.is_file():
        raise KitError(f"evaluation file {data} does not exist; give a JSONL file of {{{', '.join(FIELDS)}}} lines")
    folder = Path(image_folder) if image_folder else default_image_folder(data)
    raw: list[tuple[str, dict]] = []
    for lineno, rec in read_jsonl(data, "evaluation file", allow_empty=True):
        where = f"{data}:{lineno}"
        describe = str(rec.get("answer_type", "")).strip().lower() == "describe"
        # A line without "image" asks a text question (what a text-only export can be evaluated on).
        missing = [f for f in FIELDS if rec.get(f) in (None, "") and not (describe and f == "answer")
                   and not (f == "image" and not describe)]
        if missing:
            raise KitError(f"{where}: missing field {', '.join(repr(m) for m in missing)}; every line needs {', '.join(FIELDS)}")
        atype = str(rec["answer_type"]).strip().lower()
        if atype not in ANSWER_TYPES:
            raise KitError(f"{where}: unknown answer_type '{rec['answer_type']}'; use 'closed' (yes/no or fixed options), 'open' "
                           "or 'describe'")
        for f in ("image", "question"):
            if rec.get(f) is not None and not isinstance(rec[f], str):
                raise KitError(f"{where}: field '{f}' must be a string, got {type(rec[f]).__name__}")
        if isinstance(rec["answer"], (dict, list)):
            raise KitError(f"{where}: field 'answer' must be a string, got {type(rec['answer']).__name__}")
        answer = str(rec.get("answer") or "").strip()
        if describe:
            if not isinstance(rec.get("facts"), dict) or not isinstance(rec.get("vocab"), str):
                raise KitError(f"{where}: a describe item needs 'facts' (an object) and 'vocab' (a vocabulary name or file); "
                               "kit data probes writes them")
        elif not words(answer):
            raise KitError(f"{where}: answer '{answer}' has no words to score; give the answer as text")
        probe = rec.get("probe")
        if probe is not None and (not isinstance(probe, dict) or not {"concept", "set"} <= set(probe) or answer not in ("yes", "no")):
            raise KitError(f"{where}: field 'probe' must be {{\"concept\", \"set\"}} on a yes/no item")
        raw.append((where, {**rec, "answer": answer, "answer_type": atype}))
    if not raw:
        raise KitError(f"evaluation file {data} has no questions")
    if limit is not None:
        raw = raw[:limit]
    items = []
    for where, rec in raw:
        path = None
        if rec.get("image"):
            try:
                path = resolve_image(folder, rec["image"])
                check_image(path)
            except ImageProblem as e:
                raise KitError(f"{where}: {e}; fix the path (relative to {folder}) or remove the line") from None
        extra = {k: v for k, v in rec.items() if k not in FIELDS}
        items.append(Item(str(rec["id"]), path, rec["question"].strip(), answer=rec["answer"], answer_type=rec["answer_type"], where=where, extra=extra))
    return items
