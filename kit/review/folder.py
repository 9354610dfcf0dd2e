"""A generated folder as the reviewer sees it: every conversation (kept, flagged, or rejected by
the claim check) beside the facts of its source record, its claims judged against them, and the
reviewer's newest decision.

Reads what `kit generate` wrote: data.json, rejects.jsonl (rejected-for-claims conversations are
kept whole there), sources.jsonl (each record's captions, findings, boxes and metadata) and the
data card (image folder, vocabulary). Writes nothing but review.jsonl, through ReviewLog.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import read_jsonl
from kit.data.images import ImageProblem, resolve_image
from kit.data.reviewed import (DATA_FILE, SOURCES_FILE, Decision, ReviewLog, check_turns, fingerprint, generated_samples, is_generated_folder,
                               parse_decision, rescuable, sample_id)
from kit.ground.claims import Claim, check_answers
from kit.ground.facts import Facts, facts_of
from kit.ground.policy import resolve_vocab
from kit.ground.vocab import PACKAGED, Vocabulary, load_vocab
from kit.ingest.records import Record

# Where an item came from: kept in data.json (with or without bad claims), or rejected by the check.
KEPT, FLAGGED, REJECTED = "kept", "flagged", "rejected"


@dataclass
class Item:
    index: int
    id: str
    sample: dict  # the LLaVA sample as generated
    origin: str  # kept | flagged | rejected (by the claim check)
    record: Record | None  # the source it was generated from (None: the folder has no sources.jsonl)
    image: Path | None  # resolved inside the image folder; None when missing or outside it
    image_problem: str = ""
    claims: list[Claim] = field(default_factory=list)

    @property
    def bad_kinds(self) -> list[str]:
        return sorted({c.kind for c in self.claims if c.bad})


def answers_of(turns: list[dict]) -> list[str]:
    return [str(t.get("value", "")) for t in turns if t.get("from") == "gpt"]


def record_of(line: dict, root: Path, where: str) -> Record:
    try:
        return Record.from_json(line, root)
    except (KeyError, TypeError, ValueError) as e:
        raise KitError(f"{where}: not a source record ({type(e).__name__}: {e}); regenerate the folder with kit generate") from None


def read_sources(folder: Path, image_folder: Path) -> tuple[dict[str, Record], dict[str, str]]:
    """A generated folder's records by id, and the record id of each conversation id (empty when
    the folder has no sources.jsonl). KitError naming the line of a bad record."""
    path = Path(folder) / SOURCES_FILE
    records: dict[str, Record] = {}
    by_sample: dict[str, str] = {}
    if not path.is_file():
        return records, by_sample
    for n, line in read_jsonl(path, "sources file", allow_empty=True):
        r = record_of(line, image_folder, f"{path}:{n}")
        records[r.id] = r
        for sid in line.get("samples") or []:
            by_sample[str(sid)] = r.id
    return records, by_sample


def image_folder_of(folder: Path, card: Card | None) -> Path:
    """Where a generated folder's image paths point: its card's image folder, else the folder."""
    return Path(card.image_folder) if card and card.image_folder else Path(folder)


def vocabulary_for(card: Card | None, vocab: str | None) -> Vocabulary | None:
    """--vocab, else the one generation checked with (its card), else the domain's packaged one;
    None when there is none (claims are then not checked, and the page says so)."""
    if vocab:
        return load_vocab(vocab)
    extra = (card.model_extra or {}) if card else {}
    grounding = extra.get("grounding") or {}
    if grounding.get("vocabulary"):
        return load_vocab(grounding["vocabulary"])
    domain = extra.get("domain")
    if domain in PACKAGED:
        return load_vocab(resolve_vocab(None, domain))
    return None


class ReviewFolder:
    """Everything the page shows about one folder, loaded once; decisions go through `decide`."""

    def __init__(self, folder: Path, vocab: str | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise KitError(f"{folder} is not a folder; give a kit generate output folder (it holds data.json)")
        if not is_generated_folder(folder):
            raise KitError(f"{folder} has no {DATA_FILE}; give a kit generate output folder (or the generated/ folder "
                           "inside a kit adapt data folder)")
        self.folder = folder
        self.card = Card.read(folder)
        self.image_folder = image_folder_of(folder, self.card)
        self.vocab = vocabulary_for(self.card, vocab)
        self.log = ReviewLog(folder)
        self.records, self.by_sample = read_sources(folder, self.image_folder)
        self.items: list[Item] = []
        self._facts: dict[str, Facts] = {}
        flagged_ids = self._flagged_ids()
        for s in generated_samples(folder):
            self._add(s, FLAGGED if sample_id(s, len(self.items)) in flagged_ids else KEPT)
        for s in rescuable(folder):
            self._add(s, REJECTED)
        self.by_id = {it.id: it for it in self.items}
        self.decisions: dict[str, Decision] = {
            k: d for k, (d, _) in self.log.read().items()
            if k in self.by_id and (not d.of or d.of == fingerprint(self.by_id[k].sample["conversations"]))}


    def _flagged_ids(self) -> set[str]:
        path = self.folder / "flagged.jsonl"
        if not path.is_file():
            return set()
        return {str(line.get("id")) for _, line in read_jsonl(path, "flagged file", allow_empty=True)}

    def _add(self, sample: dict, origin: str) -> None:
        index = len(self.items)
        sid = sample_id(sample, index)
        record = self.records.get(self.by_sample.get(sid, ""))
        image, problem = None, ""
        rel = sample.get("image")
        if isinstance(rel, str) and rel:
            try:
                image = resolve_image(self.image_folder, rel)
                if not image.is_file():
                    image, problem = None, f"image {rel} is not in {self.image_folder}"
            except ImageProblem as e:
                problem = str(e)
        item = Item(index, sid, sample, origin=origin, record=record, image=image, image_problem=problem)
        item.claims = self.claims(item, sample["conversations"])
        if origin == KEPT and any(c.bad for c in item.claims):
            item.origin = FLAGGED  # generated with the check off, or with another vocabulary
        self.items.append(item)

    def facts(self, item: Item) -> Facts | None:
        if item.record is None or self.vocab is None:
            return None
        if item.record.id not in self._facts:
            self._facts[item.record.id] = facts_of(item.record, self.vocab)
        return self._facts[item.record.id]

    def claims(self, item: Item, turns: list[dict]) -> list[Claim]:
        facts = self.facts(item)
        if facts is None:
            return []
        return check_answers(answers_of(turns), facts, self.vocab)

    @property
    def checks_claims(self) -> bool:
        return self.vocab is not None and bool(self.records)

    def item(self, index: int) -> Item:
        if not 0 <= index < len(self.items):
            raise KitError(f"no conversation number {index}; this folder has {len(self.items)}")
        return self.items[index]

    def edited_turns(self, item: Item, turns: Any) -> list[dict]:
        return check_turns(turns, item.sample["conversations"], f"conversation '{item.id}'")

    def decide(self, body: Any, stamp: str) -> Decision:
        """Check a decision from the page against its conversation, append it (on disk when this
        returns) and make it the current one. KitError for a decision that does not fit."""
        d = parse_decision(body, "decision")
        item = self.by_id.get(d.id)
        if item is None:
            raise KitError(f"decision: no conversation with id '{d.id}' in {self.folder}")
        turns = self.edited_turns(item, d.conversations) if d.decision == "edit" else None
        d = Decision(d.id, d.decision, turns, reason=d.reason, time=stamp, of=fingerprint(item.sample["conversations"]))
        self.log.append(d)
        self.decisions[d.id] = d
        return d

    # What the page reads: plain JSON, built here so the app only routes.

    def summary(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "checks_claims": self.checks_claims,
            "vocabulary": self.vocab.source if self.vocab else None,
            "why_unchecked": None if self.checks_claims else (
                "no vocabulary (the folder's card names none; give kit review --vocab)" if self.vocab is None
                else "no sources.jsonl in this folder (generated by an older kit): the source facts are unknown"),
            "items": [self.brief(it) for it in self.items],
        }

    def brief(self, it: Item) -> dict[str, Any]:
        d = self.decisions.get(it.id)
        return {"index": it.index, "id": it.id, "type": it.sample.get("type"), "origin": it.origin,
                "bad": sum(c.bad for c in it.claims), "kinds": it.bad_kinds, "decision": d.decision if d else None}

    def detail(self, it: Item) -> dict[str, Any]:
        d = self.decisions.get(it.id)
        r = it.record
        facts = self.facts(it)
        return {
            **self.brief(it),
            "conversations": it.sample["conversations"],
            "claims": [c.to_json() for c in it.claims],
            "image": bool(it.image), "image_name": it.sample.get("image"), "image_problem": it.image_problem,
            "source": None if r is None else {
                "id": r.id, "captions": r.captions, "findings": r.findings, "metadata": r.metadata,
                "boxes": [{"label": b.label, "bbox": list(b.bbox)} for b in r.boxes],
            },
            "facts": facts.to_json() if facts else None,
            "decided": None if d is None else {
                **d.to_json(), "claims": [c.to_json() for c in self.claims(it, d.conversations)] if d.conversations else None},
        }
