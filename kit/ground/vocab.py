"""Vocabularies: the concepts a claim check knows, as data (`kit/ground/vocabularies/*.yaml`).

A vocabulary is groups of concepts; each concept has the terms that name it (singular; plurals
are matched by `kit.ground.match`), the concepts it implies ("echocardiography" implies
"ultrasound" and "heart") and its group's rules: `exclusive` (one concept of the group per image,
so another one is a contradiction) and `kind` (`object`, or `attribute`: checked only where the
source mentions the group at all). A user's file may say `extends: medical` and add groups or
concepts; the packaged vocabularies are found by name.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kit.core.errors import KitError

PACKAGED = ("general", "medical", "industrial", "documents")


class _ConceptSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    terms: list[str] = Field(min_length=1)
    implies: list[str] = Field(default_factory=list)


class _GroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: str = Field("object", pattern="^(object|attribute)$")
    exclusive: bool = False
    question: str | None = None  # how a yes/no probe asks about one concept: "{concept}" is replaced
    concepts: dict[str, list[str] | _ConceptSpec] = Field(min_length=1)


class _VocabSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    extends: str | None = None
    groups: list[_GroupSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class Concept:
    name: str
    group: str
    terms: tuple[str, ...]
    implies: tuple[str, ...]


DEFAULT_QUESTION = "Is there a {concept} in the image?"


@dataclass(frozen=True)
class Group:
    name: str
    kind: str  # object | attribute
    exclusive: bool
    concepts: tuple[str, ...]
    question: str = DEFAULT_QUESTION


@dataclass(frozen=True, eq=False)  # identity: loaded once per reference (load_vocab is cached)
class Vocabulary:
    """Concepts by name, their groups, and each concept's closure under `implies`."""

    name: str
    concepts: dict[str, Concept]
    groups: dict[str, Group]
    source: str  # the packaged name or the file it was read from

    @functools.cached_property
    def closure(self) -> dict[str, frozenset[str]]:
        out: dict[str, frozenset[str]] = {}
        for name in self.concepts:
            seen, todo = {name}, [name]
            while todo:
                for nxt in self.concepts[todo.pop()].implies:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            out[name] = frozenset(seen)
        return out

    def group_of(self, concept: str) -> Group:
        return self.groups[self.concepts[concept].group]

    def fingerprint(self) -> str:
        """Changes whenever a term, implication or group rule changes (results derived from it are stale)."""
        rows = sorted((c.name, c.group, c.terms, c.implies) for c in self.concepts.values())
        rows += sorted((g.name, g.kind, g.exclusive) for g in self.groups.values())
        return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def _read(ref: str, seen: tuple[str, ...]) -> _VocabSpec:
    if ref in PACKAGED:
        text, where = resources.files("kit.ground.vocabularies").joinpath(f"{ref}.yaml").read_text(encoding="utf-8"), ref
    else:
        path = Path(ref)
        if not path.is_file():
            raise KitError(f"vocabulary '{ref}' is neither a packaged one ({', '.join(PACKAGED)}) nor a file")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise KitError(f"vocabulary {path}: cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise KitError(f"vocabulary {where}{line}: not valid YAML") from None
    try:
        spec = _VocabSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise KitError(f"vocabulary {where}: field '{field}': {err['msg']}; see kit/ground/vocabularies/general.yaml for the format") from None
    if spec.extends and spec.extends in seen:
        raise KitError(f"vocabulary {where}: 'extends: {spec.extends}' goes round in a circle")
    return spec


@functools.cache
def load_vocab(ref: str) -> Vocabulary:
    """A packaged vocabulary by name, or a YAML file (which may extend another). Raises KitError
    naming the file and field for a bad file, an unknown implied concept or a term claimed twice."""
    chain: list[_VocabSpec] = []
    seen: tuple[str, ...] = ()
    current: str | None = ref
    while current is not None:
        spec = _read(current, seen)
        seen += (current,)
        chain.append(spec)
        current = spec.extends
    concepts: dict[str, Concept] = {}
    groups: dict[str, Group] = {}
    for spec in reversed(chain):  # the base first; a file that extends it adds or replaces
        for g in spec.groups:
            names = tuple(g.concepts)
            old = groups.get(g.name)
            if g.question is not None and "{concept}" not in g.question:
                raise KitError(f"vocabulary {ref}: group '{g.name}': question must contain {{concept}}")
            question = g.question or (old.question if old else DEFAULT_QUESTION)
            groups[g.name] = Group(g.name, g.kind, g.exclusive, concepts=tuple(dict.fromkeys((old.concepts if old else ()) + names)), question=question)
            for name, c in g.concepts.items():
                c = c if isinstance(c, _ConceptSpec) else _ConceptSpec(terms=c)
                terms = tuple(dict.fromkeys(" ".join(t.lower().split()) for t in c.terms if t.strip()))
                concepts[name] = Concept(name, g.name, terms, implies=tuple(c.implies))
    where = chain[0].name if ref in PACKAGED else ref
    for c in concepts.values():
        for target in c.implies:
            if target not in concepts:
                raise KitError(f"vocabulary {where}: concept '{c.name}' implies '{target}', which no group defines")
    owner: dict[str, str] = {}
    for c in concepts.values():
        for t in c.terms:
            if owner.setdefault(t, c.name) != c.name:
                raise KitError(f"vocabulary {where}: the term '{t}' names both '{owner[t]}' and '{c.name}'; keep it in one")
    return Vocabulary(chain[0].name, concepts, groups, source=where)
