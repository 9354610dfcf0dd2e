"""`kit.json` cards: every folder kit writes says what made it, from what, with which versions."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

from kit.core.files import write_json_atomic

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
    h = hashlib.sha256()
    if (folder / "config.json").is_file():
        h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"path": str(folder.resolve()), "fingerprint": h.hexdigest()[:16]}


def new_card(kind: str, made_by: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "made_by": made_by,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("kit") else None,
        "versions": library_versions(),
        **fields,
    }




def write_card(folder: Path, card: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / CARD_NAME, card)


def read_card(folder: Path) -> dict[str, Any] | None:
    f = Path(folder) / CARD_NAME
    if not f.is_file():
        return None
    return json.loads(f.read_text())
