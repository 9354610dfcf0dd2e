"""What a `kit generate` run is asked to do, checked once when it is made and read by the command,
the engine and its workers alike."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kit.core import options
from kit.core.errors import KitError
from kit.generate.backends import Backend
from kit.generate.prompts import load_domain
from kit.ground.policy import Grounding, resolve_grounding
from kit.ingest.records import TYPES, Record


def validate_types(types: Iterable[str] | str) -> list[str]:
    """"a,b" or a list -> known response types in order, without repeats. Raises KitError naming an unknown type."""
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    out = []
    for t in types:
        if t not in TYPES:
            raise KitError(f"unknown response type '{t}'; choose from: {', '.join(TYPES)}")
        if t not in out:
            out.append(t)
    if not out:
        raise KitError(f"no response types given; choose from: {', '.join(TYPES)}")
    return out


@dataclass(frozen=True)
class GenerationSettings:
    """The run's options. Making one checks them all (KitError naming the option); `types` may be
    given as "a,b"; `grounding` defaults to rejecting unsupported claims with `domain`'s vocabulary."""

    types: tuple[str, ...] | str = TYPES
    domain: str = options.GENERATE_DOMAIN
    concurrency: int = options.GENERATE_CONCURRENCY
    max_retries: int = 6
    timeout: float = 60
    limit: int | None = None
    seed: int = 0
    temperature: float = options.GENERATE_TEMPERATURE
    max_tokens: int = options.GENERATE_MAX_TOKENS
    allow_remote: bool = False
    dry_run: bool = False
    price: tuple[float, float] | None = None  # USD per million prompt / completion tokens, for the estimate
    progress: bool = True
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    grounding: Grounding | str | None = field(default=None)  # a mode name is resolved with `vocab` (kit.ground.policy)
    vocab: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "types", tuple(validate_types(self.types)))
        load_domain(self.domain)  # an unknown or incomplete prompt set fails before anything is read
        if self.concurrency < 1:
            raise KitError(f"--concurrency must be at least 1 (got {self.concurrency})")
        if self.limit is not None and self.limit < 1:
            raise KitError(f"--limit must be at least 1 (got {self.limit})")
        if self.max_tokens < 1:
            raise KitError(f"--max-tokens must be at least 1 (got {self.max_tokens})")
        if not 0 <= self.temperature <= 2:
            raise KitError(f"--temperature must be between 0 and 2 (got {self.temperature})")
        if self.max_retries < 0:
            raise KitError(f"max_retries must be 0 or more (got {self.max_retries})")
        if not isinstance(self.grounding, Grounding):
            object.__setattr__(self, "grounding", resolve_grounding(self.grounding or "reject", self.vocab, self.domain))


def check_privacy(backend: Backend, allow_remote: bool, private: str | None) -> None:
    """The one privacy gate: KitError when records that are private (`private` says which, e.g.
    "2 of 3 records"; None when none are) would go to a backend off this machine without `allow_remote`."""
    if private is None or not backend.is_remote or allow_remote:
        return
    host = getattr(backend, "host", None) or backend.describe()
    raise KitError(
        f"{private} are private and the backend sends text to {host}: their captions, findings, box labels and coordinates "
        f"and metadata text (never pixels) would leave this machine; use a local backend (--backend hf, or --base-url "
        f"http://127.0.0.1:...) or pass --allow-remote"
    )


def private_records(records: list[Record]) -> str | None:
    """Which records are private, for check_privacy."""
    n = sum(1 for r in records if r.private)
    return f"{n} of {len(records)} records" if n else None
