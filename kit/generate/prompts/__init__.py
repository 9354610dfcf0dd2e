"""Prompt sets: a system message and few-shot examples per response type, per domain.

A domain is one YAML file in this folder (or on KIT_PROMPTS_PATH); adding a domain is adding a
file. The symbolic context follows the paper: captions for every type, `label: [x1, y1, x2, y2]`
lines for the detail and reasoning types; medical contexts add acquisition facts and findings.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

from kit.core.errors import KitError
from kit.ingest.records import TYPES, Record

HERE = Path(__file__).resolve().parent
BOX_TYPES = ("detail", "complex")


def _dirs() -> list[Path]:
    return [Path(p) for p in os.environ.get("KIT_PROMPTS_PATH", "").split(os.pathsep) if p] + [HERE]


def available_domains() -> list[str]:
    return sorted({f.stem for d in _dirs() if d.is_dir() for f in d.glob("*.yaml")})


@functools.lru_cache(maxsize=None)
def load_domain(domain: str) -> dict[str, Any]:
    """Raises KitError for an unknown domain or a prompt file missing a type."""
    for d in _dirs():
        f = d / f"{domain}.yaml"
        if f.is_file():
            data = yaml.safe_load(f.read_text())
            for rtype in TYPES:
                if rtype not in data.get("system", {}) or not data.get("examples", {}).get(rtype):
                    raise KitError(f"{f}: prompt set lacks a system message or examples for type '{rtype}'")
            return data
    raise KitError(f"unknown prompt domain '{domain}'; available: {', '.join(available_domains())}")


def _acquisition(meta: dict[str, str]) -> str:
    keys = ("modality", "body_part", "view", "stain", "sequence")
    parts = [meta[k] for k in keys if meta.get(k)]
    rest = [f"{k.replace('_', ' ')} {v}" for k, v in meta.items() if k not in keys and v]
    return ", ".join(parts + rest)


def build_context(record: Record, rtype: str) -> str:
    """The symbolic description the generator sees instead of the image."""
    lines: list[str] = []
    if record.metadata:
        lines.append(f"Acquisition: {_acquisition(record.metadata)}")
    if record.captions:
        lines += ["Descriptions:" if len(record.captions) > 1 else "Caption:", *record.captions]
    if record.findings:
        lines += ["Findings:", *record.findings]
    if rtype in BOX_TYPES and record.boxes:
        header = "Regions:" if record.metadata else "Objects:"
        lines += [header, *(b.line() for b in record.boxes)]
    return "\n".join(lines)


def build_messages(record: Record, rtype: str, domain: str) -> list[dict]:
    """OpenAI chat messages: system, few-shot (user context -> assistant reply) pairs, the record."""
    if rtype not in TYPES:
        raise KitError(f"unknown response type '{rtype}'; choose from {', '.join(TYPES)}")
    spec = load_domain(domain)
    messages = [{"role": "system", "content": spec["system"][rtype].strip()}]
    for ex in spec["examples"][rtype]:
        messages.append({"role": "user", "content": ex["context"].strip()})
        messages.append({"role": "assistant", "content": ex["reply"].strip()})
    messages.append({"role": "user", "content": build_context(record, rtype)})
    return messages
