"""Model replies -> validated conversations. Anything doubtful is rejected with a reason."""

from __future__ import annotations

import hashlib
import re

from kit.core.templates import IMAGE_TOKEN
from kit.ingest.records import Record


# Instructions for the detail type: the generator writes the description, kit asks for it.
DETAIL_PROMPTS = (
    "Describe this image in detail.",
    "What is shown in this image? Please give a thorough description.",
    "Give a detailed account of everything you can see in the picture.",
    "Walk me through what this image shows.",
    "Could you describe the image as completely as possible?",
    "Explain in detail what appears in this image.",
)

# Words that reveal the text the generator was given instead of the image.
LEAKS = (
    r"\bcaptions?\b", r"\bcoordinates?\b", r"\bbounding boxe?s?\b", r"\bbbox", r"\bthe (given |provided )?descriptions?\b",
    r"\baccording to the (description|text|report|findings|information)\b", r"\bbased on the (description|text|report|information|findings)\b",
    r"\bthe (provided|given) (information|text|details)\b", r"\bmetadata\b", r"\bobjects? list\b",
)
NUMBER_LIST = re.compile(r"\[\s*-?\d*\.?\d+\s*(,\s*-?\d*\.?\d+\s*){1,}\]")
REFUSALS = (
    r"\bI('m| am) sorry\b", r"\bI (cannot|can't|can not|am unable to|am not able to) (see|view|access|look at)\b",
    r"\bas an ai\b", r"\bI do not have (access to|the ability to see)\b", r"\bunable to (see|view) the image\b",
    r"\bI (cannot|can't) (provide|help with|answer)\b",
)
_Q = re.compile(r"^\s*(?:\*\*)?(question|q|user|human)(?:\*\*)?\s*[:：]\s*(?:\*\*)?", re.I)
_A = re.compile(r"^\s*(?:\*\*)?(answer|a|assistant|gpt)(?:\*\*)?\s*[:：]\s*(?:\*\*)?", re.I)

LIMITS = {  # words per answer (min, max) and rounds (min, max)
    "conversation": ((1, 200), (1, 12)),
    "detail": ((20, 400), (1, 1)),
    "complex": ((15, 400), (1, 1)),
}


class Rejected(ValueError):
    """A reply that cannot be used: `category` is what the summary counts, `reason` the detail."""

    def __init__(self, category: str, detail: str | None = None):
        reason = f"{category} ({detail})" if detail else category
        super().__init__(reason)
        self.category = category
        self.reason = reason


def _check_text(text: str) -> None:
    for pat in REFUSALS:
        if re.search(pat, text, re.I):
            raise Rejected("refusal")
    for pat in LEAKS:
        m = re.search(pat, text, re.I)
        if m:
            raise Rejected("leaks its source", f"'{m.group(0)}'")
    if NUMBER_LIST.search(text):
        raise Rejected("leaks its source", "a raw number list")


def _qa_pairs(text: str) -> list[tuple[str, str]]:
    """Alternating Question:/Answer: blocks; an answer may span several lines."""
    turns: list[list[str]] = []
    for line in text.strip().splitlines():
        if _Q.match(line):
            turns.append(["human", _Q.sub("", line, count=1).strip()])
        elif _A.match(line):
            turns.append(["gpt", _A.sub("", line, count=1).strip()])
        elif line.strip():
            if not turns:
                raise Rejected("bad structure", "text before the first Question:")
            turns[-1][1] = (turns[-1][1] + "\n" + line.strip()).strip()
    if not turns:
        raise Rejected("bad structure", "no Question:/Answer: lines")
    roles = [r for r, _ in turns]
    if roles[0] != "human" or any(a == b for a, b in zip(roles, roles[1:])) or roles[-1] != "gpt":
        raise Rejected("bad structure", "turns do not alternate Question/Answer")
    if any(not t.strip() for _, t in turns):
        raise Rejected("empty turn")
    return [(r, t.strip().strip("*").strip()) for r, t in turns]


def repeat_start(text: str) -> int | None:
    """Where a reply starts asking again a question it already asked (the offset of that question
    line), or None. Only finished lines count. A small model that loops repeats whole rounds until
    max_tokens; an in-process generator stops there (kit.generate.backends.HFBackend)."""
    seen: set[str] = set()
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and _Q.match(line):
            question = " ".join(_Q.sub("", line, count=1).lower().split())
            if question in seen:
                return offset
            seen.add(question)
        offset += len(line)
    return None


def complete_rounds(text: str) -> str:
    """The reply up to (not including) its last question line: whole rounds only, or ""."""
    lines = text.splitlines()
    last_q = max((i for i, line in enumerate(lines) if _Q.match(line)), default=-1)
    return "\n".join(lines[:last_q]).strip() if last_q > 0 else ""


def _strip_fences(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^```\w*\n|\n```$", "", text)
    return text.strip()


def parse_reply(rtype: str, text: str, pick: int = 0) -> list[tuple[str, str]]:
    """[("human", q), ("gpt", a), ...]. `pick` chooses the detail instruction. Raises Rejected."""
    text = _strip_fences(text or "")
    if not text:
        raise Rejected("empty reply")
    _check_text(text)
    if rtype == "detail":
        if _Q.match(text.splitlines()[0]):
            raise Rejected("bad structure", "a question where a description was asked for")
        turns = [("human", DETAIL_PROMPTS[pick % len(DETAIL_PROMPTS)]), ("gpt", " ".join(text.split()))]
    else:
        turns = _qa_pairs(text)
    questions = [" ".join(t.lower().split()) for r, t in turns if r == "human"]
    if len(set(questions)) < len(questions):
        raise Rejected("repeated question")
    (wmin, wmax), (rmin, rmax) = LIMITS[rtype]
    rounds = len(turns) // 2
    if not rmin <= rounds <= rmax:
        raise Rejected("length", f"{rounds} rounds, expected {rmin}-{rmax}")
    for role, t in turns:
        n = len(t.split())
        if role == "gpt" and not wmin <= n <= wmax:
            raise Rejected("length", f"an answer of {n} words, expected {wmin}-{wmax}")
    return turns


def fingerprint(turns: list[tuple[str, str]]) -> str:
    norm = " | ".join(re.sub(r"[^\w ]+", "", " ".join(t.lower().split())) for _, t in turns)
    return hashlib.sha256(norm.encode()).hexdigest()[:16]


def to_sample(record: Record, rtype: str, turns: list[tuple[str, str]]) -> dict:
    convs = [{"from": r, "value": t} for r, t in turns]
    convs[0] = {"from": "human", "value": f"{IMAGE_TOKEN}\n{convs[0]['value']}"}
    return {"id": f"{record.id}-{rtype}", "image": record.image, "conversations": convs, "type": rtype}
