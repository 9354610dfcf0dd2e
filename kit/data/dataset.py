"""Samples -> token ids, exact labels and pixels, with every unusable sample reported by id and reason."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kit.base.family import Family
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import read_json
from kit.core.templates import IMAGE_TOKEN, PREFIX, TemplateError, prefix_parts, render
from kit.core.tokens import CHUNKED_TEMPLATES, special_texts, supervised_mask, tokenize
from kit.data.formats import Sample, load_samples, parse_samples, placement_for
from kit.data.reviewed import DATA_FILE, ReviewCounts, reviewed_samples
from kit.data.images import ImageProblem, check_image, image_size, open_rgb, resolve_image
from kit.data.prompt_spec import PromptSpec
from kit.data.processing import Processing

IGNORE = -100


@dataclass
class Encoded:
    id: str
    input_ids: np.ndarray  # [T] int32
    labels: np.ndarray  # [T] int32, IGNORE where not supervised
    images: list[Path]
    text: str = ""  # the rendered text before the processor expands its images (chat templates)
    suffix: str | None = None  # the prefix layout: the answer, which the processor takes apart from the text
    truncated: bool = False
    from_prompts: bool = False  # built from the chat template's generation-prompt renders

    @property
    def image(self) -> Path | None:
        return self.images[0] if self.images else None


@dataclass
class Report:
    total: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (id, where, reason)
    truncated_text: int = 0
    lengths: list[int] = field(default_factory=list)
    image_tokens: int = 0  # the most tokens one image takes
    image_total: int = 0  # image tokens over all usable samples
    from_prompts: int = 0  # samples built from generation-prompt renders (kit.core.templates)
    review: ReviewCounts | None = None  # a reviewed folder as data: what its review decided

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


class SampleProblem(ValueError):
    """Why a sample cannot train (its text is the reason a report lists)."""


def check_trainable(sample: Sample, tokenizer, template: str) -> None:
    """SampleProblem for a sample no tokenization can train: a special token's text in a turn, no
    image where the template needs one."""
    specials = special_texts(tokenizer)
    for j, (role, text) in enumerate(sample.turns):
        special = next((t for t in specials if t in text), None)
        if special is not None:
            raise SampleProblem(
                f"turn {j + 1} ({role}) holds the text '{special}', which the tokenizer reads as a special token "
                "(an answer would end there); remove it from the data"
            )
    if template == "plain" and sample.image is None:
        raise SampleProblem("template plain trains caption pairs and this sample has no image; give it one or use another template")
    if template == PREFIX and not sample.images:
        raise SampleProblem("this model's prompt format (an image, then a question) needs an image in every sample")


def truncate(ids: np.ndarray, labels: np.ndarray, *, max_length: int, image_end: int, n_img: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and labels cut to max_length; SampleProblem when that would cut an image's tokens (they
    end at `image_end`) or leave nothing supervised."""
    if image_end > max_length:
        raise SampleProblem(
            f"image tokens would be truncated: {len(ids)} tokens ({n_img} image) > max_length {max_length}; "
            "raise data.max_length or shorten the sample"
        )
    ids, labels = ids[:max_length], labels[:max_length]
    if (labels != IGNORE).sum() == 0:
        raise SampleProblem(f"nothing left to supervise after truncation to max_length {max_length}")
    return ids, labels


def encode_sample(sample: Sample, tokenizer, template: str, image_tokens: int | list, max_length: int, system: str | None = None,
                  chat_template: str | None = None, placeholder: str = IMAGE_TOKEN):
    """The sample tokenised with exact labels; SampleProblem (saying what is wrong) when it cannot
    train. Never produces an all-masked sample.

    image_tokens: per image, in order, what it becomes (kit.data.processing.Processing.expansions):
    a token count for plain / vicuna_v1, the expanded text for chat; one int for every image means
    that many `placeholder`s. chat_template: the processor's template for `chat` (default: the
    tokenizer's). placeholder: what the chat template writes for an image (the processor's token)."""
    check_trainable(sample, tokenizer, template)
    chunked = template in CHUNKED_TEMPLATES
    n_images = len(sample.images)
    if isinstance(image_tokens, int):
        image_tokens = [image_tokens if chunked else placeholder * image_tokens] * n_images
    try:
        rendered = render(template, sample.turns, tokenizer, image_token=IMAGE_TOKEN, system=system, chat_template=chat_template, placeholder=placeholder)
        expanded = rendered if chunked else rendered.expand_each(placeholder, image_tokens)
    except TemplateError as e:
        raise SampleProblem(str(e)) from None
    tokens = tokenize(tokenizer, expanded.text, template, n_image_tokens=image_tokens if chunked else 0)
    ids = tokens.ids
    labels = np.where(supervised_mask(tokens, expanded.spans), ids, IGNORE)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN if chunked else placeholder)
    n_img = int((ids == image_id).sum())
    # The placeholder is a special token: each written copy is one id.
    want = sum(image_tokens) if chunked else sum(e.count(placeholder) for e in image_tokens)
    if n_img != want:
        raise SampleProblem(f"template produced {n_img} image tokens, expected {want}")
    if (labels != IGNORE).sum() == 0:
        raise SampleProblem("nothing to supervise (no assistant answer survives the template)")
    if not supervised_text_matches(tokenizer, ids, labels, answers=expanded.answers):
        raise SampleProblem("supervised tokens do not spell the answers (tokenizer/template mismatch)")
    truncated = len(ids) > max_length
    if truncated:
        # Every image's tokens, markers included, must survive: an image cut short fails in the model.
        if chunked:
            image_end = int(np.nonzero(ids == image_id)[0][-1]) + 1 if n_img else 0
        else:
            last = expanded.text.rfind(image_tokens[-1]) + len(image_tokens[-1]) if image_tokens else 0
            image_end = int((tokens.starts < last).sum()) if last else 0
        ids, labels = truncate(ids, labels, max_length=max_length, image_end=image_end, n_img=n_img)
    text, suffix = prefix_parts(rendered) if template == PREFIX else (rendered.text, None)
    return Encoded(sample.id, ids.astype(np.int32), labels.astype(np.int32), images=[], text=text, suffix=suffix, truncated=truncated,
                   from_prompts=rendered.from_prompts)


class LlavaDataset(torch.utils.data.Dataset):
    """Pre-tokenised samples; images are decoded and processed on access, by the checkpoint's processor."""

    def __init__(self, items: list[Encoded], processing: Processing):
        self.items = items
        self.processing = processing

    def __len__(self) -> int:
        return len(self.items)

    def modality_lengths(self) -> list[int]:
        """Positive length for image samples, negative for text-only (LLaVA's grouping convention)."""
        return [len(it.input_ids) if it.image is not None else -len(it.input_ids) for it in self.items]

    def __getitem__(self, i: int) -> dict:
        return sample_features(self.processing, self.items[i], "sample")


def _check_images(samples: list[Sample], folder: Path, workers: int = 8) -> dict[str, list[tuple[Path, tuple[int, int]]]]:
    """Per sample id: each image's path and size; a sample with a bad image gets its problem."""
    def one(s: Sample):
        try:
            found = []
            for rel in s.images:
                p = resolve_image(folder, rel)
                check_image(p)
                found.append((p, image_size(p)))
            return s.id, found, None
        except ImageProblem as e:
            return s.id, None, str(e)

    paths = {}
    todo = [s for s in samples if s.images and s.problem is None]
    by_id = {s.id: s for s in todo}
    with ThreadPoolExecutor(workers) as pool:
        for sid, path, problem in pool.map(one, todo):
            if problem:
                by_id[sid].problem = problem
            else:
                paths[sid] = path
    return paths


def looks_like_pairs(path: Path) -> bool:
    """A JSON list whose first item has `chosen` and `rejected`: preference pairs, not conversations."""
    if Path(path).suffix != ".json" or not Path(path).is_file():
        return False
    try:
        data = read_json(Path(path), "data file", expect=None)
    except KitError:
        return False
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and {"chosen", "rejected"} <= set(data[0])


def default_image_folder(data_path: Path) -> Path:
    """The data file's folder (or the data folder itself), unless a `kit.json` data card there
    (kit generate / ingest / review) names another."""
    data_path = Path(data_path)
    if data_path.is_dir():
        data_path = data_path / DATA_FILE
    card = Card.read(data_path.parent)
    if card is not None and card.kind == "data" and card.image_folder:
        folder = Path(card.image_folder)
        if not folder.is_dir():
            raise KitError(f"{data_path.parent / 'kit.json'}: its image_folder {folder} does not exist; "
                           "fix the card, remove it, or set data.image_folder")
        return folder
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
    family: Family | None = None,
    undecided: str = "exclude",
) -> tuple[LlavaDataset, Report]:
    """Load, check and tokenise a LLaVA data file, or a reviewed `kit generate` folder (what its
    review says trains, kit.data.reviewed; `undecided`: its rule for conversations nobody decided
    on), for `processor`'s checkpoint (of `family`: whether it takes several images per sample).

    Raises KitError on structural errors, and on any unusable sample when `on_bad_sample` is
    "error" (listing them); with "skip" they are left out and counted in the report.
    """
    data_path = Path(data_path)
    spec = PromptSpec.choose(processor, family, template, system_prompt=system, image_aspect=image_aspect)
    placement = placement_for(spec.template, image_placement)
    reviewed = reviewed_samples(data_path, undecided) if data_path.is_dir() else None
    if reviewed is not None and not reviewed.items:
        raise KitError(f"{data_path}: its review leaves nothing to train on ({reviewed.counts.line()}); accept conversations "
                       "with kit review, or set data.undecided=include")
    if reviewed is None and looks_like_pairs(data_path):
        raise KitError(f"{data_path} is a preference pairs file (chosen / rejected); train it with a preference recipe "
                       "(--set train.objective=dpo), or give a LLaVA conversations file")
    samples = parse_samples(reviewed.items, placement) if reviewed else load_samples(data_path, placement)
    folder = Path(image_folder) if image_folder else default_image_folder(data_path)
    encoded, processing, report = encode_samples(samples, folder, processor, spec=spec, max_length=max_length, family=family)
    report.review = reviewed.counts if reviewed else None
    items = [e for e in encoded if e is not None]
    check_usable(report, on_bad_sample, bool(items), path=data_path, what="samples", fix="data")
    return LlavaDataset(items, processing), report


def check_usable(report, on_bad_sample: str, any_usable: bool, path, what: str, fix: str) -> None:
    """KitError for problems the recipe does not skip (the first named, the rest counted), or for
    nothing usable at all; `what` names the rows (samples, pairs), `fix` what to fix."""
    if report.problems and on_bad_sample == "error":
        first = report.problem_lines(1)[0]
        more = f" (+{len(report.problems) - 1} more; `kit data check` lists them)" if len(report.problems) > 1 else ""
        raise KitError(f"{first}{more}; fix the {fix} or set data.on_bad_sample=skip")
    if not any_usable:
        raise KitError(f"{path}: no usable {what} ({len(report.problems)} problems, first: {report.problem_lines(1)[0]})")


def sample_features(processing, it, label: str) -> dict:
    """One encoded sample's model inputs and labels (images opened now); `label` names it in errors."""
    try:
        images = [open_rgb(p) for p in it.images]
    except ImageProblem as e:
        raise KitError(f"{label} '{it.id}': {e}; fix or remove the image (kit data check lists all problems)") from None
    out = processing.sample_inputs(it.text, it.input_ids.astype(np.int64), images, suffix=it.suffix)
    out["labels"] = torch.from_numpy(it.labels.astype(np.int64))
    return out


def encode_samples(samples: list[Sample], folder: Path, processor, spec: PromptSpec, max_length: int,
                   family: Family | None = None) -> tuple[list[Encoded | None], Processing, Report]:
    """Each sample tokenised with exact labels (None where it is unusable: its problem is set and
    reported), the Processing that turns them into model inputs, and the report; samples are
    rendered as `spec` says (kit.data.prompt_spec)."""
    if any(s.image for s in samples) and not folder.is_dir():
        raise KitError(f"image folder {folder} does not exist; set data.image_folder (or --set data.image_folder=DIR)")
    if family is not None and family.images == "one":
        for s in samples:
            if s.problem is None and len(s.images) > 1:
                s.problem = f"{len(s.images)} images; {family.label} takes one image per sample"
    paths = _check_images(samples, folder)
    processing = Processing(processor, spec.template, spec.image_aspect)
    report = Report(total=len(samples))
    out: list[Encoded | None] = []
    checked: set[tuple] = set()
    for s in samples:
        enc = None
        if s.problem is None:
            found = paths.get(s.id, [])
            sizes = [size for _, size in found]
            try:
                expansions = processing.expansions(sizes)
            except KitError as e:
                raise KitError(f"{s.where}: sample '{s.id}': {e}") from None
            try:
                enc = encode_sample(s, processor.tokenizer, spec.template, image_tokens=expansions, max_length=max_length,
                                    system=spec.system_prompt, chat_template=spec.chat_template, placeholder=spec.placeholder)
            except SampleProblem as e:
                s.problem = str(e)
            else:
                enc.images = [p for p, _ in found]
                counts = [processing.image_tokens(z) for z in sizes]
                report.image_tokens = max([report.image_tokens, *counts])
                report.image_total += sum(counts)
                # The processor itself checks kit's expansion once for every combination of image sizes.
                key = tuple(processing.fitted_size(z) for z in sizes)
                if key not in checked:
                    checked.add(key)
                    _agrees(processing, enc, sizes, s=s)
                report.truncated_text += enc.truncated
                report.from_prompts += enc.from_prompts
                report.lengths.append(len(enc.input_ids))
        if s.problem is not None:
            report.problems.append((s.id, s.where, s.problem))
        out.append(enc)
    return out, processing, report


def _agrees(processing: Processing, enc: Encoded, sizes: list[tuple[int, int]], s: Sample) -> None:
    blanks = [Image.new("RGB", z, (127, 127, 127)) for z in sizes]
    try:
        processing.sample_inputs(enc.text, enc.input_ids.astype(np.int64), blanks, suffix=enc.suffix)
    except KitError as e:
        raise KitError(f"{s.where}: sample '{s.id}': {e}") from None
