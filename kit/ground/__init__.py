"""Grounding: what each record's source supports (facts), the domain vocabularies that say which
concepts can be claimed, and the claim check that judges generated text against both.

Sits between ingest (records) and generate (which filters replies with it); evaluation and
preference-pair building read it too.
"""

from kit.ground.claims import CONTRADICTED, KINDS, SUPPORTED, UNSUPPORTED, Claim, check_answers, check_text
from kit.ground.facts import Facts, facts_of
from kit.ground.match import Mention, find_mentions
from kit.ground.vocab import PACKAGED, Vocabulary, load_vocab

__all__ = [
    "CONTRADICTED", "KINDS", "PACKAGED", "SUPPORTED", "UNSUPPORTED", "Claim", "Facts", "Mention", "Vocabulary",
    "check_answers", "check_text", "facts_of", "find_mentions", "load_vocab",
]
