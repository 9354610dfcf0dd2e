"""A base model folder, resolved once per command: its config, family, fingerprint and card, all
from one read of config.json, then handed to every step that needs them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.base.family import Family, config_file, family_of_config
from kit.core.cards import CARD_NAME, Card, fingerprint_of
from kit.core.errors import KitError
from kit.core.precision import compute_dtype
from kit.core.files import decode_bytes, parse_json_text, read_json


@dataclass(frozen=True)
class Base:
    """A checkpoint kit can adapt. `config` is config.json as written; `fingerprint` is
    kit.core.cards.describe_source's, from the same bytes."""

    path: Path
    config: dict[str, Any]
    family: Family
    fingerprint: str
    card: Card | None

    @classmethod
    def open(cls, path: Path | str) -> Base:
        """KitError for a folder without config.json or of a kind kit cannot adapt."""
        path = Path(path)
        file = config_file(path)
        raw = file.read_bytes()
        config = parse_json_text(decode_bytes(raw, file, "model config"), file, "model config", fix="restore the file")
        return cls(path, config, family_of_config(config, path), fingerprint_of(path, raw), Card.read(path))

    @classmethod
    def of(cls, base: Base | Path | str) -> Base:
        """`base` itself, or the folder it names opened (for library callers holding a path)."""
        return base if isinstance(base, Base) else cls.open(base)

    @property
    def image_aspect(self) -> str:
        """pad or crop: the base's setting from its card (pad, LLaVA-1.5's, when the card says nothing)."""
        return (self.card.settings.get("image_aspect") if self.card else None) or "pad"

    def source(self) -> dict[str, Any]:
        """What a card records of the base it depends on (kit.core.cards.describe_source's form)."""
        return {"path": str(self.path.resolve()), "fingerprint": self.fingerprint}

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterInfo:
    """A PEFT adapter folder kit trained (or one with adapter_config.json naming its base), its base
    opened and checked against the fingerprint the adapter was trained on."""

    path: Path
    base: Base
    card: Card  # an empty adapter card when the folder has none (has_card False)
    has_card: bool
    config: dict[str, Any]  # adapter_config.json

    @classmethod
    def open(cls, path: Path | str) -> AdapterInfo:
        """KitError for a folder without adapter_config.json, a base it does not name, a base that
        is gone or whose fingerprint differs."""
        path = Path(path)
        if not (path / ADAPTER_CONFIG).is_file():
            raise KitError(f"{path}: not an adapter folder (no {ADAPTER_CONFIG}); give a LoRA adapter kit trained")
        config = read_json(path / ADAPTER_CONFIG, "adapter config", fix="restore the file")
        card = Card.read(path)
        base_str = card.base.path if card and card.base else None
        where = f"{path / CARD_NAME} ('base.path')"
        if not base_str:
            base_str = config.get("base_model_name_or_path")
            where = f"{path / ADAPTER_CONFIG} ('base_model_name_or_path')"
        if not base_str:
            raise KitError(f"adapter {path} does not say which base it was trained on; add \"base\": {{\"path\": ...}} to {path / CARD_NAME}")
        if not Path(base_str).is_dir():
            raise KitError(
                f"adapter {path} was trained on base {base_str}, which does not exist (moved or deleted); "
                f"restore the base folder there, or edit {where} to point at its new location"
            )
        base = Base.open(base_str)
        want = card.base.fingerprint if card and card.base else None
        if want and base.fingerprint != want:
            raise KitError(
                f"adapter {path} was trained on a different base than the folder now at {base.path} "
                f"(fingerprint {base.fingerprint}, expected {want}: its config.json or weight files changed); "
                f"restore the original base there, or edit {where} to point at it"
            )
        return cls(path, base, card or Card(kind="adapter"), card is not None, config)

    @property
    def quantization(self) -> str:
        return self.card.quantization

    @property
    def dtype(self):
        """The torch dtype it was trained in (its recipe's train.precision)."""
        return compute_dtype(self.card.precision)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the base it was trained on (checked equal to the base's now)."""
        return self.base.fingerprint
