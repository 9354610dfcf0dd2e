"""What a record's own source supports: the facts a generated claim is checked against.

From the record alone (captions, findings, box labels, metadata; never the pixels): the concepts
the source names, closed under the vocabulary's implications; the concepts it says are absent
("no haemorrhages"); per concept the number of boxes and their centres (normalised 0..1), or a
count the text states ("two small dark dots"); and the groups of attribute concepts the source
speaks of at all.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from kit.ground.match import find_mentions
from kit.ground.vocab import Vocabulary
from kit.ingest.records import Record

# Picture regions by box centre: generous thirds, so "on the left" holds for a centre at x < 0.45.
REGIONS = {
    "left": lambda x, y: x < 0.45, "right": lambda x, y: x > 0.55, "top": lambda x, y: y < 0.45,
    "bottom": lambda x, y: y > 0.55, "centre": lambda x, y: 0.25 <= x <= 0.75 and 0.25 <= y <= 0.75,
}


@dataclass
class Facts:
    present: set[str] = field(default_factory=set)  # named by the source, with what they imply
    absent: set[str] = field(default_factory=set)  # the source says they are not there
    counts: dict[str, int] = field(default_factory=dict)  # box counts, else counts the text states
    centres: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # box centres per concept
    groups: set[str] = field(default_factory=set)  # groups the source names a concept of

    def to_json(self) -> dict:
        return {"present": sorted(self.present), "absent": sorted(self.absent), "counts": dict(sorted(self.counts.items())),
                "centres": {k: [list(c) for c in v] for k, v in sorted(self.centres.items())}}


def source_texts(record: Record) -> list[str]:
    """The record's texts a claim may rest on: captions, findings, box labels, metadata values."""
    texts = list(record.captions) + list(record.findings) + [b.label for b in record.boxes]
    texts += [f"{v}" for v in record.metadata.values() if isinstance(v, str)]
    return [t for t in texts if t and t.strip()]


def facts_of(record: Record, vocab: Vocabulary) -> Facts:
    facts = Facts()
    stated: dict[str, int] = {}
    for text in source_texts(record):
        for m in find_mentions(text, vocab):
            if m.negated:
                facts.absent.add(m.concept)
            else:
                facts.present.add(m.concept)
                if m.count is not None:
                    stated[m.concept] = max(stated.get(m.concept, 0), m.count)
    boxes: Counter[str] = Counter()
    centres: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for b in record.boxes:
        named = [m.concept for m in find_mentions(b.label, vocab) if not m.negated]
        x1, y1, x2, y2 = b.bbox
        for concept in dict.fromkeys(named):
            for c in vocab.closure[concept]:
                boxes[c] += 1
                centres[c].append(((x1 + x2) / 2, (y1 + y2) / 2))
    facts.present = {c for p in facts.present for c in vocab.closure[p]}
    facts.absent -= facts.present  # a source that says both is trusted on the positive
    facts.counts = {**stated, **boxes}
    facts.centres = dict(centres)
    facts.groups = {vocab.concepts[c].group for c in facts.present | facts.absent}
    return facts


def in_region(region: str, centre: tuple[float, float]) -> bool:
    return REGIONS[region](*centre)
