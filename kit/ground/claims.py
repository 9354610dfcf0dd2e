"""The claim check: each concept a generated answer names, judged against the record's facts.

A claim is one mention of a vocabulary concept in an answer:
- `object` (the concept is there): supported when the facts hold it (or something that implies
  it); contradicted when the facts hold another concept of the same exclusive group that neither
  implies it nor is implied by it (an MRI claim on an ultrasound image), or say it is absent;
  unsupported otherwise. In an `attribute` group (colours, planes) a claim is judged only when
  the source names that group at all.
- `absence` ("no fracture"): supported when the facts say it is absent; contradicted when they
  hold it; unsupported otherwise: a stated absence is a finding too.
- `count` ("two dogs"): checked where the facts know a count (boxes, or a number the source
  states); contradicted when it differs.
- `position` ("on the left"): checked where the concept has boxes; contradicted when no box of
  it has its centre in that region.
Concepts the vocabulary does not know are not checked: the check is as good as its vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kit.ground.facts import Facts, in_region
from kit.ground.match import Mention, find_mentions
from kit.ground.vocab import Vocabulary

SUPPORTED, UNSUPPORTED, CONTRADICTED = "supported", "unsupported", "contradicted"
KINDS = ("object", "absence", "count", "position")


@dataclass(frozen=True)
class Claim:
    text: str  # the words of the answer that make it
    concept: str
    kind: str  # object | absence | count | position
    status: str  # supported | unsupported | contradicted
    answer: int = 0  # which answer of the conversation (0-based) it is in
    why: str = ""
    start: int = -1  # character offsets of `text` in that answer
    end: int = -1

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def bad(self) -> bool:
        return self.status != SUPPORTED


def _object(m: Mention, facts: Facts, vocab: Vocabulary) -> tuple[str, str]:
    c = m.concept
    if c in facts.present:
        return SUPPORTED, ""
    if c in facts.absent:
        return CONTRADICTED, f"the source says there is no {c}"
    group = vocab.group_of(c)
    if group.exclusive:
        for p in sorted(facts.present):
            if p != c and vocab.concepts[p].group == group.name and p not in vocab.closure[c] and c not in vocab.closure[p]:
                return CONTRADICTED, f"the source says {p} ({group.name})"
    return UNSUPPORTED, f"the source does not mention {c}"


def _absence(m: Mention, facts: Facts) -> tuple[str, str]:
    c = m.concept
    if c in facts.present:
        return CONTRADICTED, f"the source names {c}"
    if c in facts.absent:
        return SUPPORTED, ""
    return UNSUPPORTED, f"the source does not say there is no {c}"


def check_text(text: str, facts: Facts, vocab: Vocabulary, answer: int = 0) -> list[Claim]:
    """Every claim of one answer, in order."""
    claims: list[Claim] = []
    for m in find_mentions(text, vocab):
        group = vocab.group_of(m.concept)
        if group.kind == "attribute" and group.name not in facts.groups:
            continue
        if m.negated:
            status, why = _absence(m, facts)
            claims.append(Claim(m.text, m.concept, "absence", status=status, answer=answer, why=why, start=m.start, end=m.end))
            continue
        status, why = _object(m, facts, vocab)
        claims.append(Claim(m.text, m.concept, "object", status=status, answer=answer, why=why, start=m.start, end=m.end))
        if status != SUPPORTED:
            continue
        known = facts.counts.get(m.concept)
        if m.count is not None and known is not None:
            ok = m.count == known
            claims.append(Claim(m.text, m.concept, "count", status=SUPPORTED if ok else CONTRADICTED, answer=answer,
                                why="" if ok else f"the source has {known}, the answer says {m.count}", start=m.start, end=m.end))
        centres = facts.centres.get(m.concept)
        for region in m.positions:
            if not centres:
                continue
            ok = any(in_region(region, c) for c in centres)
            claims.append(Claim(m.text, m.concept, "position", status=SUPPORTED if ok else CONTRADICTED, answer=answer,
                                why="" if ok else f"no {m.concept} box has its centre in the {region} of the image", start=m.start, end=m.end))
    return claims


def check_answers(answers: list[str], facts: Facts, vocab: Vocabulary) -> list[Claim]:
    """Claims of every answer of a conversation (`answer` numbers them in order)."""
    return [c for i, a in enumerate(answers) for c in check_text(a, facts, vocab, answer=i)]
