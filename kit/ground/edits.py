"""Minimal edits that make a grounded answer false by its record's own facts: the rejected side of
a preference pair (HA-DPO / HALVA style: the same answer with one fact changed).

Each edit changes one mention the claim check can judge, so the edited answer differs from the
grounded one by a few words and is false for a reason the vocabulary knows:
- `swap`: a concept the source holds replaced by one of its group it does not hold, preferring
  concepts that co-occur with the record's own in this data set (a plausible hallucination);
- `modality`: the same within an exclusive group such as the imaging modality (CT -> MRI);
- `count`: a stated number the source's boxes or text confirm, changed;
- `side`: a picture position the boxes confirm, flipped (left <-> right, top <-> bottom);
- `negate`: a concept the source holds, denied ("a nodule" -> "no nodule");
- `add`: a sentence naming a co-occurring concept the source does not hold.
Whoever uses an edit checks it (kit.prefer.pairs): the edited answer must make a claim the check
flags, and the original none.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from kit.ground.facts import Facts
from kit.ground.match import NUMBERS, SIDES, Mention, find_mentions, plural
from kit.ground.vocab import Vocabulary

EDIT_KINDS = ("swap", "modality", "count", "side", "negate", "add")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "upper": "lower", "lower": "upper"}
NUMBER_WORDS = {v: k for k, v in reversed(list(NUMBERS.items())) if k not in ("single", "both", "pair", "couple", "dozen")}
_ARTICLE_BEFORE = re.compile(r"\b(a|an|the|one)(\s+)$", re.I)
_WORD = re.compile(r"[A-Za-z]+|\d+")
_OF_BEFORE = re.compile(r"\bof(\s+the)?\s+$", re.I)
_SIDE_WORD = re.compile(r"\b(left|right|top|bottom|upper|lower)\b", re.I)


@dataclass(frozen=True)
class Edit:
    kind: str  # one of EDIT_KINDS
    before: str  # what the answer said ("" for add)
    after: str  # what the edited answer says instead
    text: str  # the edited answer

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "from": self.before, "to": self.after}


class Alternatives:
    """Concepts to put into an answer that its record does not hold, ranked by how often they
    appear beside the record's own concepts in this data set, then by how common they are."""

    def __init__(self, vocab: Vocabulary, facts: list[Facts]):
        self.vocab = vocab
        self.objects = sorted(c for c, k in vocab.concepts.items() if vocab.groups[k.group].kind == "object")
        self.popular: Counter[str] = Counter(c for f in facts for c in f.present)
        self.together: dict[str, Counter[str]] = {}
        for f in facts:
            for a in f.present:
                self.together.setdefault(a, Counter()).update(b for b in f.present if b != a)

    def _absent(self, c: str, facts: Facts) -> bool:
        # A concept everything of which the record holds could be true (an echocardiogram of an ultrasound of the heart).
        return c not in facts.present and not self.vocab.closure[c] <= facts.present

    def _ranked(self, candidates: list[str], facts: Facts) -> list[str]:
        score = {c: sum(self.together.get(p, Counter())[c] for p in facts.present) for c in candidates}
        return sorted(candidates, key=lambda c: (-score[c], -self.popular[c], c))

    def for_swap(self, concept: str, facts: Facts) -> list[str]:
        group = self.vocab.group_of(concept).name
        closure = self.vocab.closure
        same = [c for c in self.objects if self.vocab.concepts[c].group == group and c != concept and self._absent(c, facts)
                and concept not in closure[c] and c not in closure[concept]]
        return self._ranked(same, facts)

    def for_add(self, facts: Facts) -> list[str]:
        """Outside exclusive groups: a second modality added is a swap, which `modality` makes."""
        return self._ranked([c for c in self.objects if self._absent(c, facts) and not self.vocab.group_of(c).exclusive], facts)


def _written(vocab: Vocabulary, concept: str, many: bool) -> str:
    name = vocab.concepts[concept].name
    return plural(name) if many and not name.isupper() else name


def _is_plural(m: Mention, vocab: Vocabulary) -> bool:
    return m.text.lower() not in {t.lower() for t in vocab.concepts[m.concept].terms}


def _article_for(word: str, article: str) -> str:
    # Acronyms are read letter by letter: "an MRI", "an X-ray", "a CT".
    vowel = word[:1] in "AEFHILMNORSX" if word[:2].isupper() else word[:1].lower() in "aeiou"
    new = "an" if vowel else "a"
    return new.capitalize() if article[:1].isupper() else new


def _replace(text: str, start: int, end: int, new: str) -> str:
    old = text[start:end]
    if old[:1].isupper() and not new[:1].isupper():
        new = new[:1].upper() + new[1:]
    head = text[:start]
    article = _ARTICLE_BEFORE.search(head)
    if article and article.group(1).lower() in ("a", "an"):
        head = head[:article.start(1)] + _article_for(new, article.group(1)) + article.group(2)
    return head + new + text[end:]


def _swap(answer: str, ms: list[Mention], facts: Facts, vocab: Vocabulary, alts: Alternatives, modality: bool) -> Edit | None:
    for m in ms:
        group = vocab.group_of(m.concept)
        if m.negated or m.concept not in facts.present or group.kind != "object" or (group.exclusive and group.name == "modality") != modality:
            continue
        for c in alts.for_swap(m.concept, facts)[:1]:
            new = _written(vocab, c, _is_plural(m, vocab))
            return Edit("modality" if modality else "swap", m.text, new, text=_replace(answer, m.start, m.end, new=new))
    return None


def _count(answer: str, ms: list[Mention], facts: Facts, vocab: Vocabulary) -> Edit | None:
    for m in ms:
        if m.negated or m.count is None or facts.counts.get(m.concept) != m.count:
            continue
        # The number is one of the three words before the mention ("two small dark dots").
        said = [w for w in list(_WORD.finditer(answer[:m.start]))[-3:]
                if (int(w.group(0)) if w.group(0).isdigit() else NUMBERS.get(w.group(0).lower())) == m.count]
        if not said:
            continue
        number = said[-1]
        word = number.group(0)
        new_value = m.count + 1
        new = str(new_value) if word.isdigit() else NUMBER_WORDS.get(new_value, str(new_value))
        if word[:1].isupper():
            new = new.capitalize()
        text = answer[:number.start()] + new + answer[number.end():]
        if m.count == 1 and not _is_plural(m, vocab):  # "one dog" -> "two dogs"
            shift = len(new) - len(word)
            text = text[:m.start + shift] + plural(m.text) + text[m.end + shift:]
        return Edit("count", word, new, text=text)
    return None


def _side(answer: str, ms: list[Mention], facts: Facts) -> Edit | None:
    for m in ms:
        if m.negated or not m.positions or not facts.centres.get(m.concept):
            continue
        words = [w for w in _SIDE_WORD.finditer(answer) if SIDES[w.group(1).lower()] in m.positions]
        if not words:
            continue
        w = min(words, key=lambda w: min(abs(w.start() - m.start), abs(w.start() - m.end)))
        old = w.group(1)
        new = OPPOSITE[old.lower()]
        new = new.capitalize() if old[:1].isupper() else new
        return Edit("side", old, new, text=answer[:w.start()] + new + answer[w.end():])
    return None


def _negate(answer: str, ms: list[Mention], facts: Facts, vocab: Vocabulary) -> Edit | None:
    for m in ms:
        group = vocab.group_of(m.concept)
        if m.negated or m.concept not in facts.present or group.kind != "object" or group.exclusive or m.count not in (None, 1):
            continue
        head = answer[:m.start]
        if _OF_BEFORE.search(head):  # "an image of the chest": what the image is of, not a thing in it
            continue
        article = _ARTICLE_BEFORE.search(head)
        if article:
            no = "No" if article.group(1)[:1].isupper() else "no"
            return Edit("negate", article.group(1) + article.group(2) + m.text, f"{no} {m.text}",
                        text=head[:article.start(1)] + no + article.group(2) + answer[m.start:])
        return Edit("negate", m.text, f"no {m.text}", text=head + "no " + answer[m.start:])
    return None


def _add(answer: str, facts: Facts, vocab: Vocabulary, alts: Alternatives) -> Edit | None:
    for c in alts.for_add(facts)[:1]:
        name = _written(vocab, c, False)
        sentence = f"The image also shows {_article_for(name, 'a')} {name}."
        sep = "" if not answer or answer.endswith((" ", "\n")) else " "
        return Edit("add", "", name, text=answer + sep + sentence)
    return None


def minimal_edits(answer: str, facts: Facts, vocab: Vocabulary, alts: Alternatives) -> list[Edit]:
    """At most one edit of each kind (EDIT_KINDS order) for a grounded answer; unchecked."""
    ms = find_mentions(answer, vocab)
    found = [
        _swap(answer, ms, facts, vocab=vocab, alts=alts, modality=False), _swap(answer, ms, facts, vocab=vocab, alts=alts, modality=True),
        _count(answer, ms, facts, vocab=vocab), _side(answer, ms, facts), _negate(answer, ms, facts, vocab=vocab),
        _add(answer, facts, vocab, alts=alts),
    ]
    return [e for e in found if e is not None and e.text != answer]
