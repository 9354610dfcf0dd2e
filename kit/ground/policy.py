"""What generation does with claims: `reject` conversations that make an unsupported or
contradicted claim, `flag` them (kept, listed), or check nothing (`off`)."""

from __future__ import annotations

from dataclasses import dataclass

from kit.core import options
from kit.core.errors import KitError
from kit.ground.claims import Claim, check_answers
from kit.ground.facts import facts_of
from kit.ground.vocab import PACKAGED, Vocabulary, load_vocab
from kit.ingest.records import Record

MODES = options.GROUNDING


@dataclass(frozen=True)
class Grounding:
    mode: str
    vocab: Vocabulary | None  # None only when mode is off

    def bad_claims(self, record: Record, answers: list[str]) -> list[Claim]:
        """The unsupported and contradicted claims of a conversation's answers about `record`."""
        if self.vocab is None:
            return []
        return [c for c in check_answers(answers, facts_of(record, self.vocab), self.vocab) if c.bad]

    def describe(self) -> dict:
        if self.vocab is None:
            return {"mode": self.mode}
        return {"mode": self.mode, "vocabulary": self.vocab.source, "fingerprint": self.vocab.fingerprint()}


def resolve_grounding(mode: str, vocab: str | None, domain: str) -> Grounding:
    """The grounding a run uses: `vocab` (a packaged name or a YAML file), else the packaged
    vocabulary named like the prompt domain. Raises KitError for an unknown mode, or a domain
    with no vocabulary of its name and none given."""
    if mode not in MODES:
        raise KitError(f"grounding '{mode}': choose one of {', '.join(MODES)}")
    if mode == "off":
        return Grounding(mode, None)
    return Grounding(mode, load_vocab(resolve_vocab(vocab, domain)))


def resolve_vocab(vocab: str | None, domain: str) -> str:
    """`vocab`, else the packaged vocabulary named like the prompt domain. KitError when neither."""
    ref = vocab or (domain if domain in PACKAGED else None)
    if ref is None:
        raise KitError(f"prompt domain '{domain}' has no vocabulary of the same name ({', '.join(PACKAGED)}): give one with "
                       "--vocab FILE (generate.vocab), or turn the claim check off with --grounding off")
    return str(ref)
