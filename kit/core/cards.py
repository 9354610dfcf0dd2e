"""`kit.json` cards: every folder kit writes says what made it, from what, with which versions.

A `Card` is typed where kit reads it back (the recipe a model was trained with, the base it was
trained on, its training data) and keeps every other field as written, so a card is the same JSON
object before and after a read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kit.core.errors import KitError
from kit.core.files import read_json, write_json_atomic
from kit.core.recipes import Recipe, format_validation_error

CARD_NAME = "kit.json"
_VERSIONED = ("kit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "timm")


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def hash_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the files' names and bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def describe_source(folder: Path) -> dict[str, Any]:
    """Path plus a cheap fingerprint (config bytes and weight file sizes) of a model folder."""
    folder = Path(folder)
    config = folder / "config.json"
    return {"path": str(folder.resolve()), "fingerprint": fingerprint_of(folder, config.read_bytes() if config.is_file() else b"")}


def fingerprint_of(folder: Path, config_bytes: bytes) -> str:
    """describe_source's fingerprint from config.json's bytes already read (b"" when there is none)."""
    h = hashlib.sha256()
    h.update(config_bytes)
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class SourceRef(_Open):
    """A model folder a card depends on (`describe_source`); merge cards add hashes and recipes."""

    path: str
    fingerprint: str | None = None


class DataRef(_Open):
    path: str
    sha256: str | None = None


SECRET_OPTIONS = ("--api-key",)


def _redact_value(value: str) -> str:
    key, eq, rest = value.partition("=")
    if eq and key.replace(".", "").replace("_", "").isalnum():  # --set key=value
        return f"{key}={_redact_value(rest)}"
    if "://" in value:
        return "<url>"  # URLs can carry credentials and host names
    if "/" in value or "\\" in value or os.path.exists(value):
        return "<path>"  # folder and file names are often patient or project names
    return value


def redacted_command(argv: list[str]) -> str:
    """The command a card records: commands, options and plain values as typed; paths, URLs and
    secrets replaced by <path>, <url>, <redacted>."""
    out = ["kit"]
    hide_next = False
    for tok in argv[1:]:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
        elif tok.startswith("--"):
            name, eq, value = tok.partition("=")
            if name in SECRET_OPTIONS:
                out.append(name + ("=<redacted>" if eq else ""))
                hide_next = not eq
            else:
                out.append(name + ("=" + _redact_value(value) if eq else ""))
        else:
            out.append(_redact_value(tok))
    return " ".join(out)


@dataclass(frozen=True)
class PromptFormat:
    """How a model was prompted in training; None where the card does not say."""

    template: str | None
    system_prompt: str | None
    image_aspect: str | None


class Card(_Open):
    """What `kit.json` holds. Fields kit reads back are typed; the rest are kept as written."""

    kind: str
    made_by: str | None = None
    created: str | None = None
    command: str | None = None
    versions: dict[str, str] = {}
    recipe: Recipe | None = None
    base: SourceRef | None = None
    data: DataRef | None = None
    settings: dict[str, Any] = {}  # base cards: projector, vision_layer, image_aspect, ...
    image_folder: str | None = None  # data cards: what the data's image paths are relative to
    steps: int | None = None
    metrics: dict[str, Any] = {}
    evaluation: dict[str, Any] | None = None
    notes: list[str] = []

    @classmethod
    def new(cls, kind: str, made_by: str, **fields: Any) -> Card:
        return cls(
            kind=kind,
            made_by=made_by,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            command=redacted_command(sys.argv) if sys.argv and sys.argv[0].endswith("kit") else None,
            versions=library_versions(),
            **fields,
        )

    @classmethod
    def read(cls, folder: Path) -> Card | None:
        """The card in `folder`, or None when it has none. KitError naming the file (and line or
        field) for a card that is not valid JSON or not a kit card."""
        f = Path(folder) / CARD_NAME
        if not f.is_file():
            return None
        data = read_json(f, "card", fix="restore the file (or delete it: kit then knows less about the folder)")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise KitError(format_validation_error(str(f), e, what="card")) from None

    def write(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / CARD_NAME, self.model_dump(mode="json", exclude_unset=True))

    @property
    def quantization(self) -> str:
        return self.recipe.quantization if self.recipe else "none"

    @property
    def precision(self) -> str:
        return self.recipe.train.precision if self.recipe else "auto"

    def prompt_format(self, fallback_aspect: str | None = None) -> PromptFormat:
        """The recipe's template / system prompt / image aspect; the aspect falls back to the
        card's own base settings, then to `fallback_aspect`."""
        data = self.recipe.data if self.recipe else None
        aspect = (data.image_aspect if data else None) or self.settings.get("image_aspect") or fallback_aspect
        return PromptFormat(data.template if data else None, data.system_prompt if data else None, aspect)
