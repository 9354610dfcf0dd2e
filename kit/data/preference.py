"""Preference pairs for training: a prompt (LLaVA turns, the last a question), a `chosen` and a
`rejected` answer, tokenised by the same path as supervised data (the family's processor and
template, every processor tensor), with the mask on exactly the final answer of each side.

The pairs file is what `kit data pairs` writes: a JSON list of {id, image, prompt, chosen,
rejected, ...}; `prompt` may also be one question as text. A batch holds the chosen rows first,
then the rejected ones (what TRL's DPO trainer reads), with `completion_mask` in place of labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kit.base.family import Family
from kit.core.errors import KitError
from kit.core.files import read_json
from kit.core.templates import IMAGE_TOKEN
from kit.data.prompt_spec import PromptSpec
from kit.data.dataset import IGNORE, Encoded, check_usable, default_image_folder, encode_samples, sample_features
from kit.data.formats import parse_samples, placement_for
from kit.data.processing import Processing, collate

SIDES = ("chosen", "rejected")


def _turns(prompt: Any, where: str) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise KitError(f"{where}: field 'prompt' is empty; give the question")
        return [{"from": "human", "value": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise KitError(f"{where}: field 'prompt' must be the question (text) or a list of {{from, value}} turns")
    for j, t in enumerate(prompt):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in ("human", "gpt", "user", "assistant"):
            raise KitError(f"{where}: prompt[{j}] must be a {{from: human|gpt, value: text}} turn")
    if prompt[-1]["from"] not in ("human", "user"):
        raise KitError(f"{where}: the prompt's last turn must be the question (from: human); the answers follow it")
    return [dict(t) for t in prompt]


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """Every pair as two LLaVA samples' worth of fields, checked. KitError naming file[index] and
    the field for anything malformed."""
    path = Path(path)
    data = read_json(path, "pairs file", expect=list)
    if not data:
        raise KitError(f"{path} holds no pairs")
    out, seen = [], {}
    for i, p in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(p, dict):
            raise KitError(f"{where}: a pair must be a JSON object with prompt, chosen and rejected")
        pid = str(p.get("id", i))
        for side in SIDES:
            if not isinstance(p.get(side), str) or not p[side].strip():
                raise KitError(f"{where}: field '{side}' must be the answer's text (non-empty)")
        if p["chosen"] == p["rejected"]:
            raise KitError(f"{where}: 'chosen' and 'rejected' are the same text; a pair must differ")
        if IMAGE_TOKEN in p["chosen"] or IMAGE_TOKEN in p["rejected"]:
            raise KitError(f"{where}: an answer holds {IMAGE_TOKEN}; the placeholder belongs in the prompt")
        image = p.get("image")
        if image is not None and not (isinstance(image, str) and image) and not (isinstance(image, list) and image):
            raise KitError(f"{where}: field 'image' must be a relative path (or a list of them)")
        if pid in seen:
            raise KitError(f"{where}: duplicate pair id '{pid}' (first at {seen[pid]}); ids must be unique")
        seen[pid] = where
        out.append({"id": pid, "where": where, "image": image, "prompt": _turns(p.get("prompt"), where),
                    "chosen": p["chosen"], "rejected": p["rejected"], "edit": p.get("edit")})
    return out


def answer_start(labels: np.ndarray) -> int:
    """Where the last supervised span (the final answer) starts; -1 when nothing is supervised."""
    sup = np.nonzero(labels != IGNORE)[0]
    if not len(sup):
        return -1
    gaps = np.nonzero(np.diff(sup) > 1)[0]
    return int(sup[gaps[-1] + 1]) if len(gaps) else int(sup[0])


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """1 on each row's final answer (its last supervised span), 0 elsewhere."""
    out = torch.zeros_like(labels)
    for i, row in enumerate(labels.numpy()):
        start = answer_start(row)
        if start >= 0:
            end = start
            while end < len(row) and row[end] != IGNORE:
                end += 1
            out[i, start:end] = 1
    return out


@dataclass
class PairReport:
    total: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (id, where, reason)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"chosen": [], "rejected": []})  # prompt + answer
    image_tokens: int = 0
    edits: dict[str, int] = field(default_factory=dict)  # pairs per edit kind, where the file says

    def summary(self) -> str:
        ok = self.total - len(self.problems)
        return f"{ok}/{self.total} pairs usable" + (f", {len(self.problems)} skipped" if self.problems else "")

    def problem_lines(self, limit: int = 20) -> list[str]:
        lines = [f"{where}: pair '{pid}': {reason}" for pid, where, reason in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return lines


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs of pre-tokenised samples; images decoded and processed on access."""

    def __init__(self, pairs: list[tuple[Encoded, Encoded]], processing: Processing):
        self.pairs = pairs
        self.processing = processing

    def __len__(self) -> int:
        return len(self.pairs)

    def features(self, it: Encoded) -> dict:
        return sample_features(self.processing, it, "pair")

    def __getitem__(self, i: int) -> tuple[dict, dict]:
        chosen, rejected = self.pairs[i]
        return self.features(chosen), self.features(rejected)


@dataclass
class PairCollator:
    """Rows carry an `index` into `dataset`; the batch is its chosen rows then its rejected rows."""

    dataset: PreferenceDataset
    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        pairs = [self.dataset[int(r["index"])] for r in rows]
        out = collate([c for c, _ in pairs] + [r for _, r in pairs], self.pad_token_id)
        out["completion_mask"] = completion_mask(out.pop("labels"))
        return out


def build_preference_dataset(path: Path, processor, template: str, max_length: int, image_aspect: str,
                             image_folder: Path | None = None, on_bad_sample: str = "error", system: str | None = None,
                             image_placement: str = "auto", family: Family | None = None) -> tuple[PreferenceDataset, PairReport]:
    """Load, check and tokenise a pairs file for `processor`'s checkpoint. A pair is unusable when
    either side is (a bad image, nothing to supervise), when an answer is cut by max_length, or
    when the two sides' prompts tokenise differently. KitError on structural errors and, with
    `on_bad_sample` "error", on any unusable pair."""
    path = Path(path)
    spec = PromptSpec.choose(processor, family, template, system_prompt=system, image_aspect=image_aspect)
    placement = placement_for(spec.template, image_placement)
    pairs = read_pairs(path)
    raw = []
    for p in pairs:
        for side in SIDES:
            raw.append((p["where"], {"id": f"{p['id']}/{side}", "image": p["image"],
                                     "conversations": [*p["prompt"], {"from": "gpt", "value": p[side]}]}))
    samples = parse_samples(raw, placement)
    folder = Path(image_folder) if image_folder else default_image_folder(path)
    encoded, processing, inner = encode_samples(samples, folder, processor, spec=spec, max_length=max_length, family=family)
    report = PairReport(total=len(pairs), image_tokens=inner.image_tokens)
    for p in pairs:
        if isinstance(p["edit"], dict) and isinstance(p["edit"].get("kind"), str):
            report.edits[p["edit"]["kind"]] = report.edits.get(p["edit"]["kind"], 0) + 1
    usable: list[tuple[Encoded, Encoded]] = []
    for k, p in enumerate(pairs):
        (c, sc), (r, sr) = (encoded[2 * k], samples[2 * k]), (encoded[2 * k + 1], samples[2 * k + 1])
        problem = None
        if c is None or r is None:
            bad = sc if c is None else sr
            problem = f"{bad.id.rsplit('/', 1)[1]} answer: {bad.problem}"
        elif c.truncated or r.truncated:
            problem = (f"prompt + {'chosen' if c.truncated else 'rejected'} answer are longer than max_length "
                       f"{max_length}; raise data.max_length or shorten the prompt")
        else:
            ci, ri = answer_start(c.labels), answer_start(r.labels)
            if ci != ri or not np.array_equal(c.input_ids[:ci], r.input_ids[:ri]):
                problem = "the prompt tokenises differently before the two answers (a tokenizer merge across the boundary)"
        if problem is not None:
            report.problems.append((p["id"], p["where"], problem))
            continue
        report.lengths["chosen"].append(len(c.input_ids))
        report.lengths["rejected"].append(len(r.input_ids))
        usable.append((c, r))
    check_usable(report, on_bad_sample, bool(usable), path=path, what="pairs", fix="pairs")
    return PreferenceDataset(usable, processing), report
