"""Finding a vocabulary's concepts in text: terms (multi-word, any case, plural), what negates them,
the counts and image positions said with them.

Text is read as lower-case word tokens split into clauses (at . ; : , ? ! and at "but", "however",
"although", "while", "whereas", "except"). A mention is the longest term starting at a token. It is
negated when a negation cue ("no", "not", "without", "absent", "free of", "negative for", ...)
comes before it in its clause, or an absence phrase ("is not seen", "is absent", ...) follows it
there. A count is a number word or digit just before the mention ("two dogs", "3 small nodules").
A position is a phrase about the picture ("on the left", "in the top right corner", "at the
bottom of the image") in the mention's clause, not one that names a body side ("in the left
lung": the noun after it makes it anatomy).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from kit.ground.vocab import Vocabulary

_WORD = re.compile(r"[a-z0-9]+(?:[-'/][a-z0-9]+)*|[.;:,?!()]")
CLAUSE_PUNCT = frozenset(".;:,?!()")
CLAUSE_WORDS = frozenset({"but", "however", "although", "though", "while", "whereas", "except", "yet", "whilst"})
# Cues that negate what follows them in the clause; multi-word cues are matched as sequences.
NEGATION_CUES = (
    ("no",), ("not",), ("without",), ("absent",), ("absence", "of"), ("free", "of"), ("negative", "for"), ("neither",),
    ("nor",), ("never",), ("none",), ("lack", "of"), ("lacks",), ("lacking",), ("isn't",), ("aren't",), ("doesn't",),
    ("don't",), ("cannot", "see"), ("can't", "see"), ("rules", "out"), ("ruled", "out"), ("nothing",), ("nowhere",),
)
NEGATION_REACH = 4
# Words that end a negation's reach before a later mention.
SCOPE_ENDS = frozenset({"is", "are", "was", "were", "in", "at", "on", "shows", "show", "appears", "appear",
                        "with", "from", "by", "into", "onto", "inside", "within", "beside", "behind"})
# Phrases after a mention that deny it: "the fracture is not seen", "effusion is absent".
ABSENCE_AFTER = (
    ("not", "seen"), ("not", "visible"), ("not", "present"), ("not", "identified"), ("not", "evident"), ("not", "shown"),
    ("not", "depicted"), ("is", "absent"), ("are", "absent"), ("absent",), ("not", "detected"), ("not", "apparent"),
)
NUMBERS = {
    "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "both": 2, "pair": 2, "couple": 2, "dozen": 12,
}
# Irregular plurals of the last word of a term (regular ones follow the rules in `_plurals`).
IRREGULAR = {
    "person": ("people", "persons"), "man": ("men",), "woman": ("women",), "child": ("children",), "foot": ("feet",),
    "tooth": ("teeth",), "mouse": ("mice",), "goose": ("geese",), "knife": ("knives",), "leaf": ("leaves",),
    "calf": ("calves",), "shelf": ("shelves",), "wolf": ("wolves",), "ox": ("oxen",), "sheep": ("sheep",),
    "fish": ("fish",), "vertebra": ("vertebrae",), "metastasis": ("metastases",), "calculus": ("calculi",),
    "atrium": ("atria",), "bronchus": ("bronchi",), "nucleus": ("nuclei",), "fetus": ("fetuses",), "foetus": ("foetuses",),
    "diagnosis": ("diagnoses",), "index": ("indices", "indexes"), "axis": ("axes",), "criterion": ("criteria",),
    "phenomenon": ("phenomena",), "analysis": ("analyses",), "thrombus": ("thrombi",), "gyrus": ("gyri",),
    "stenosis": ("stenoses",), "lady": ("ladies",), "bus": ("buses", "busses"),
}
SIDES = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
         "centre": "centre", "center": "centre", "middle": "centre", "central": "centre"}
_PLACE = frozenset({"side", "part", "half", "corner", "portion", "edge", "area", "region", "quadrant", "third", "border",
                    "margin", "section", "foreground", "background"})
_FRAME = frozenset({"image", "picture", "photo", "photograph", "frame", "scene", "view", "field", "screen", "scan", "panel"})
_PREPOSITIONS = frozenset({"on", "at", "in", "to", "towards", "toward", "near", "along", "across"})


@dataclass(frozen=True)
class Mention:
    """One concept named in a text: where (token and character span), how, and what is said with it."""

    concept: str
    text: str  # the words as written
    start: int  # character offsets in the text
    end: int
    negated: bool = False
    count: int | None = None
    positions: tuple[str, ...] = ()  # picture regions said of it: left, right, top, bottom, centre


def _plurals(word: str) -> set[str]:
    out = set(IRREGULAR.get(word, ()))
    if len(word) < 2 or not word[-1].isalpha():
        return out
    if word.endswith(("s", "x", "z", "ch", "sh")):
        out.add(word + "es")
    elif word.endswith("y") and word[-2] not in "aeiou":
        out.add(word[:-1] + "ies")
    elif word.endswith("fe"):
        out.add(word[:-2] + "ves")
    out.add(word + "s")
    return out


def plural(term: str) -> str:
    """How a term is written for more than one ('dog' -> 'dogs', 'lymph node' -> 'lymph nodes')."""
    head, _, last = term.rpartition(" ")
    if last in IRREGULAR:
        word = IRREGULAR[last][0]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        word = last[:-1] + "ies"
    elif last.endswith("fe"):
        word = last[:-2] + "ves"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


@dataclass(frozen=True)
class _Index:
    """Term token-sequences (with plural forms) -> concept, and the longest term's length."""

    terms: dict[tuple[str, ...], str]
    longest: int


@functools.cache
def _index(vocab: Vocabulary) -> _Index:
    terms: dict[tuple[str, ...], str] = {}
    for c in vocab.concepts.values():
        for t in c.terms:
            toks = tuple(tok for tok in _WORD.findall(t) if tok not in CLAUSE_PUNCT)
            if not toks:
                continue
            terms.setdefault(toks, c.name)
            for plural in _plurals(toks[-1]):
                terms.setdefault(toks[:-1] + (plural,), c.name)
    return _Index(terms, max((len(k) for k in terms), default=1))


def _tokens(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text.lower())]


def _clauses(tokens: list[tuple[str, int, int]]) -> list[int]:
    """The clause number of each token (punctuation and contrast words start a new clause)."""
    out, n = [], 0
    for tok, _, _ in tokens:
        if tok in CLAUSE_PUNCT or tok in CLAUSE_WORDS:
            n += 1
        out.append(n)
    return out


def _starts_at(words: list[str], i: int, seq: tuple[str, ...]) -> bool:
    return tuple(words[i:i + len(seq)]) == seq


def _position_phrases(words: list[str], clause: list[int], concept_at: set[int]) -> list[tuple[int, str]]:
    """(token index, region) of each phrase about a picture region; not ones that name a body side."""
    found = []
    for i, w in enumerate(words):
        if w not in SIDES or i == 0:
            continue
        j = i - 1
        if words[j] == "the":
            j -= 1
        if j < 0 or words[j] not in _PREPOSITIONS:
            continue
        k = i + 1
        regions = [SIDES[w]]
        if k < len(words) and words[k] in SIDES and clause[k] == clause[i]:  # "top right", "lower left"
            regions.append(SIDES[words[k]])
            k += 1
        nxt = words[k] if k < len(words) and clause[k] == clause[i] else None
        if nxt is not None and nxt not in _PLACE and nxt != "of" and k in concept_at:
            continue  # "in the left lung": a side of the body
        if nxt is not None and nxt not in _PLACE and nxt not in ("of", "and", "there", "is", "are", "with", "near", "next"):
            if nxt.isalpha() and nxt not in _FRAME:
                continue  # "on the right track", "in the middle ages": not about the picture
        for r in regions:
            found.append((i, r))
    return found


def find_mentions(text: str, vocab: Vocabulary) -> list[Mention]:
    """Every concept of `vocab` named in `text`, in order, longest term first, non-overlapping."""
    index = _index(vocab)
    tokens = _tokens(text)
    words = [t for t, _, _ in tokens]
    clause = _clauses(tokens)
    spans: list[tuple[int, int, str]] = []  # (first token, last token + 1, concept)
    i = 0
    while i < len(words):
        for n in range(min(index.longest, len(words) - i), 0, -1):
            concept = index.terms.get(tuple(words[i:i + n]))
            if concept is not None and clause[i] == clause[i + n - 1]:
                spans.append((i, i + n, concept))
                i += n
                break
        else:
            i += 1
    concept_at = {a for a, _, _ in spans}
    # Attribute mentions ("two brown horses") are adjectives to a count, and take none themselves.
    attribute_at = {a for a, _, c in spans if vocab.group_of(c).kind == "attribute"}
    positions = _position_phrases(words, clause, concept_at)
    out = []
    for a, b, concept in spans:
        out.append(Mention(
            concept=concept, text=text[tokens[a][1]:tokens[b - 1][2]], start=tokens[a][1], end=tokens[b - 1][2],
            negated=_negated(words, clause, a, b=b),
            count=None if a in attribute_at else _count(words, clause, a, concept_at=concept_at - attribute_at),
            positions=_positions_for(a, b, clause, positions=positions, spans=spans),
        ))
    return out


def _negated(words: list[str], clause: list[int], a: int, b: int) -> bool:
    """A cue at most NEGATION_REACH words before the mention, in its clause, with no verb or
    preposition between ("no haemorrhages are visible in this photograph": the photograph is not
    denied); or an absence phrase just after it."""
    start = a
    while start > 0 and clause[start - 1] == clause[a] and a - start < NEGATION_REACH + 2:
        start -= 1
    for i in range(start, a):
        if any(_starts_at(words, i, cue) and i + len(cue) <= a and a - (i + len(cue)) <= NEGATION_REACH
               and not SCOPE_ENDS.intersection(words[i + len(cue):a]) for cue in NEGATION_CUES):
            return True
    end = b
    while end < len(words) and clause[end] == clause[a] and end - b < 5:
        if any(_starts_at(words, end, phrase) for phrase in ABSENCE_AFTER):
            return True
        end += 1
    return False


def _count(words: list[str], clause: list[int], a: int, concept_at: set[int]) -> int | None:
    """A number said right before the mention (up to two adjectives between): 'two dogs', '3 small
    nodules'. 'one of the ...' (the article stops the search) and numbers in another clause or before
    another mention do not count."""
    for back in (1, 2, 3):
        j = a - back
        if j < 0 or clause[j] != clause[a] or (j in concept_at):
            return None
        w = words[j]
        value = NUMBERS.get(w) if not w.isdigit() else int(w)
        if value is not None and 0 < value <= 1000:
            if w in ("pair", "couple", "dozen") and not (j + 1 < len(words) and words[j + 1] == "of"):
                return None
            return value
        if w in ("of", "the", "a", "an", "and", "or", "with", "in", "on", "at", "are", "is", "there"):
            return None
    return None


def _positions_for(a: int, b: int, clause: list[int], positions: list[tuple[int, str]],
                   spans: list[tuple[int, int, str]]) -> tuple[str, ...]:
    """The regions said in the mention's clause, given to the nearest mention of that clause."""
    out = []
    for i, region in positions:
        if clause[i] != clause[a]:
            continue
        nearest = min((s for s in spans if clause[s[0]] == clause[i]), key=lambda s: min(abs(s[0] - i), abs(s[1] - 1 - i)))
        if nearest[0] == a:
            out.append(region)
    return tuple(dict.fromkeys(out))
