"""Samples -> token ids, exact labels and pixels, with every unusable sample reported by id and reason."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kit.base.family import image_token_count
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.templates import IMAGE_TOKEN, TemplateError, render
from kit.core.tokens import CHUNKED_TEMPLATES, special_texts, supervised_mask, tokenize
from kit.data.formats import Sample, load_samples, placement_for
from kit.data.images import ImageProblem, check_image, prepare_image, resolve_image

IGNORE = -100


@dataclass
class Encoded:
    id: str
    input_ids: np.ndarray  # [T] int32
    labels: np.ndarray  # [T] int32, IGNORE where not supervised
    image: Path | None
    truncated: bool = False


@dataclass
class Report:
    total: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (id, where, reason)
    truncated_text: int = 0
    lengths: list[int] = field(default_factory=list)
    image_tokens: int = 0

    def summary(self) -> str:
        ok = self.total - len(self.problems)
        s = f"{ok}/{self.total} samples usable"
        if self.problems:
            s += f", {len(self.problems)} skipped"
        if self.truncated_text:
            s += f", {self.truncated_text} text-truncated"
        return s

    def problem_lines(self, limit: int = 20) -> list[str]:
        lines = [f"{where}: sample '{sid}': {reason}" for sid, where, reason in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return lines


def supervised_text_matches(tokenizer, ids: np.ndarray, labels: np.ndarray, answers: list[str]) -> bool:
    """The decoded supervised tokens must spell the answers (whitespace aside)."""
    got = tokenizer.decode([int(t) for t, l in zip(ids, labels) if l != IGNORE], skip_special_tokens=False)
    want = "".join(answers)
    return "".join(got.split()) == "".join(want.split())


def encode_sample(sample: Sample, tokenizer, template: str, n_image_tokens: int, max_length: int, system: str | None = None,
                  chat_template: str | None = None):
    """Returns (Encoded, None) or (None, reason). Never produces an all-masked sample.
    `chat_template`: the processor's template for `chat` (default: the tokenizer's)."""
    specials = special_texts(tokenizer)
    for j, (role, text) in enumerate(sample.turns):
        special = next((t for t in specials if t in text), None)
        if special is not None:
            return None, (
                f"turn {j + 1} ({role}) holds the text '{special}', which the tokenizer reads as a special token "
                "(an answer would end there); remove it from the data"
            )
    if template == "plain" and sample.image is None:
        return None, "template plain trains caption pairs and this sample has no image; give it one or use another template"
    try:
        rendered = render(template, sample.turns, tokenizer, IMAGE_TOKEN, system, chat_template)
    except TemplateError as e:
        return None, str(e)
    if template not in CHUNKED_TEMPLATES:
        rendered = rendered.expand(IMAGE_TOKEN, n_image_tokens)
    tokens = tokenize(tokenizer, rendered.text, template, n_image_tokens)
    ids = tokens.ids
    labels = np.where(supervised_mask(tokens, rendered.spans), ids, IGNORE)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_img = int((ids == image_id).sum())
    if sample.image is not None and n_img != n_image_tokens:
        return None, f"template produced {n_img} image tokens, expected {n_image_tokens}"
    if (labels != IGNORE).sum() == 0:
        return None, "nothing to supervise (no assistant answer survives the template)"
    if not supervised_text_matches(tokenizer, ids, labels, rendered.answers):
        return None, "supervised tokens do not spell the answers (tokenizer/template mismatch)"
    truncated = False
    if len(ids) > max_length:
        if int((ids[:max_length] == image_id).sum()) != n_img:
            return None, (
                f"image tokens would be truncated: {len(ids)} tokens ({n_img} image) > max_length {max_length}; "
                "raise data.max_length or shorten the sample"
            )
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
        if (labels != IGNORE).sum() == 0:
            return None, f"nothing left to supervise after truncation to max_length {max_length}"
    return Encoded(sample.id, ids.astype(np.int32), labels.astype(np.int32), None, truncated), None


class LlavaDataset(torch.utils.data.Dataset):
    """Pre-tokenised samples; images are decoded and processed on access."""

    def __init__(self, items: list[Encoded], image_processor, aspect: str):
        self.items = items
        self.image_processor = image_processor
        self.aspect = aspect

    def __len__(self) -> int:
        return len(self.items)

    def modality_lengths(self) -> list[int]:
        """Positive length for image samples, negative for text-only (LLaVA's grouping convention)."""
        return [len(it.input_ids) if it.image is not None else -len(it.input_ids) for it in self.items]

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        out = {"input_ids": torch.from_numpy(it.input_ids.astype(np.int64)), "labels": torch.from_numpy(it.labels.astype(np.int64))}
        if it.image is not None:
            try:
                img = prepare_image(it.image, self.aspect, self.image_processor)
            except ImageProblem as e:
                raise KitError(f"sample '{it.id}': {e}; fix or remove the image (kit data check lists all problems)") from None
            out["pixel_values"] = self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        return out


def _check_images(samples: list[Sample], folder: Path, workers: int = 8) -> dict[str, Path]:
    def one(s: Sample):
        try:
            p = resolve_image(folder, s.image)
            check_image(p)
            return s.id, p, None
        except ImageProblem as e:
            return s.id, None, str(e)

    paths = {}
    todo = [s for s in samples if s.image is not None and s.problem is None]
    by_id = {s.id: s for s in todo}
    with ThreadPoolExecutor(workers) as pool:
        for sid, path, problem in pool.map(one, todo):
            if problem:
                by_id[sid].problem = problem
            else:
                paths[sid] = path
    return paths


def default_image_folder(data_path: Path) -> Path:
    """The data file's folder, unless a `kit.json` data card there (kit generate / ingest) names another."""
    card = Card.read(data_path.parent)
    if card is not None and card.kind == "data" and card.image_folder:
        return Path(card.image_folder)
    return data_path.parent


def build_dataset(
    data_path: Path,
    processor,
    template: str,
    max_length: int,
    image_aspect: str,
    image_folder: Path | None = None,
    on_bad_sample: str = "error",
    system: str | None = None,
    image_placement: str = "auto",
) -> tuple[LlavaDataset, Report]:
    """Load, check and tokenise a LLaVA data file.

    Raises KitError on structural errors, and on any unusable sample when `on_bad_sample` is
    "error" (listing them); with "skip" they are left out and counted in the report.
    """
    data_path = Path(data_path)
    samples = load_samples(data_path, placement_for(template, image_placement))
    folder = Path(image_folder) if image_folder else default_image_folder(data_path)
    if any(s.image for s in samples) and not folder.is_dir():
        raise KitError(f"image folder {folder} does not exist; set data.image_folder (or --set data.image_folder=DIR)")
    paths = _check_images(samples, folder)
    n_image_tokens = image_token_count(processor)
    chat_template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    report = Report(total=len(samples), image_tokens=n_image_tokens)
    items: list[Encoded] = []
    for s in samples:
        if s.problem is None:
            enc, reason = encode_sample(s, processor.tokenizer, template, n_image_tokens, max_length, system, chat_template)
            if enc is None:
                s.problem = reason
            else:
                enc.image = paths.get(s.id) if s.image else None
                report.truncated_text += enc.truncated
                report.lengths.append(len(enc.input_ids))
                items.append(enc)
        if s.problem is not None:
            report.problems.append((s.id, s.where, s.problem))
    if report.problems and on_bad_sample == "error":
        first = report.problem_lines(1)[0]
        more = f" (+{len(report.problems) - 1} more; `kit data check` lists them)" if len(report.problems) > 1 else ""
        raise KitError(f"{first}{more}; fix the data or set data.on_bad_sample=skip")
    if not items:
        raise KitError(f"{data_path}: no usable samples ({len(report.problems)} problems, first: {report.problem_lines(1)[0]})")
    return LlavaDataset(items, processor.image_processor, image_aspect), report
