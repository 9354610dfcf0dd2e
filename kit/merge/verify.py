"""Merge verification: a fixed batch in the adapter's training format, the logits of a model on it,
and how far an output's logits drift from the reference's."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kit.core import options
from kit.base.folder import Base
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import staged_folder
from kit.core.precision import to_model
from kit.core.templates import IMAGE_TOKEN, TemplateError, render
from kit.data.dataset import default_image_folder
from kit.data.formats import load_samples, placement_for
from kit.data.images import ImageProblem, prepare_image, resolve_image
from kit.data.prompt_spec import PromptSpec
from kit.infer.prompts import encode
from kit.ingest.shapes import caption, draw_scene

# Max |Δlogit| a merge may drift from its reference. Wide enough for the expected drift of a QLoRA
# adapter merged into full-precision weights (0.24 measured on a 7B) and for bf16 rounding; a
# wrong merge (lost projector, wrong scaling) moves logits by whole units.
DEFAULT_TOLERANCE = options.MERGE_TOLERANCE
N_SAMPLES = 4
_DRAWN_PROMPT = "Describe the image briefly."


# -------------------------------------------------------------------------------- verification


def _data_samples(card: Card, template: str, aspect: str, image_processor, n: int) -> list[tuple[Any, list[tuple[str, str]]]]:
    """Up to n (image, first exchange) pairs from the adapter's training data, when still there."""
    data_path = card.data.path if card.data else None
    if not data_path or not Path(data_path).is_file():
        return []
    folder = card.recipe.data.image_folder if card.recipe else None
    out = []
    try:
        option = card.recipe.data.image_placement if card.recipe else "auto"
        samples = load_samples(Path(data_path), placement_for(template, option))
        folder = Path(folder) if folder else default_image_folder(Path(data_path))
        for s in samples:
            if len(out) == n:
                break
            if s.problem is None and len(s.images) == 1 and len(s.turns) >= 2 and s.turns[1][0] == "assistant":
                out.append((prepare_image(resolve_image(folder, s.image), aspect, image_processor), s.turns[:2]))
    except (KitError, ImageProblem, OSError):
        return []
    return out


def verification_inputs(processor, card: Card, base: Base | Path, n: int = N_SAMPLES) -> tuple[dict[str, torch.Tensor], str]:
    """A fixed batch of n image + conversation samples in the training format, and where they came
    from: the adapter's training data when its files are still there, else drawn shapes (seeded)."""
    base = Base.of(base)
    spec = PromptSpec.of_card(card, processor, base.family, base_aspect=base.image_aspect)
    template = spec.template
    samples = _data_samples(card, template, spec.image_aspect, image_processor=processor.image_processor, n=n)
    source = f"{len(samples)} samples of {card.data.path}" if samples else ""
    if len(samples) < n:
        rng = random.Random(0)
        size = (getattr(processor.image_processor, "crop_size", None) or {}).get("height") or 224
        drawn = 0
        while len(samples) < n:
            image, attrs = draw_scene(rng, size)
            samples.append((image, [("user", f"{IMAGE_TOKEN}\n{_DRAWN_PROMPT}"), ("assistant", caption(attrs, rng))]))
            drawn += 1
        source = ", ".join(s for s in (source, f"{drawn} drawn shape images") if s)
    texts = []
    for _, turns in samples:
        try:
            texts.append(render(template, turns, processor.tokenizer, image_token=IMAGE_TOKEN, system=spec.system_prompt, chat_template=spec.chat_template,
                                placeholder=spec.placeholder).text)
        except TemplateError as e:
            raise KitError(f"cannot render verification samples with template '{template}': {e}") from None
    return encode(processor, texts, [img for img, _ in samples], template=template), f"{source} ({template} template)"


@torch.no_grad()
def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 CPU logits at every attended position: [positions, vocab]."""
    feed = to_model(inputs, model)
    logits = model(**feed).logits  # [B, T, V]
    return logits[feed["attention_mask"].bool()].float().cpu()


def logit_drift(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    diff = (reference - got).abs()
    return {
        "max_abs_logit_diff": float(diff.max()) if torch.isfinite(diff).all() else float("inf"),
        "mean_abs_logit_diff": float(diff.mean()) if torch.isfinite(diff).all() else float("inf"),
        "argmax_agreement": float((reference.argmax(-1) == got.argmax(-1)).float().mean()),
        "positions": int(reference.shape[0]),
    }


def check_drift(numbers: dict[str, float], tolerance: float, reference: str, hint: str = "") -> None:
    """KitError (nothing written) when the output's logits drift past `tolerance` from `reference`."""
    if not numbers["max_abs_logit_diff"] <= tolerance:
        raise KitError(
            f"merge verification failed: max |Δlogit| {numbers['max_abs_logit_diff']:.4g} > tolerance {tolerance:g} "
            f"vs {reference} (argmax agreement {numbers['argmax_agreement']:.3f}); nothing was written{hint}"
        )


def describe_numbers(numbers: dict[str, float]) -> str:
    return (f"max |Δlogit| {numbers['max_abs_logit_diff']:.3g} (mean {numbers['mean_abs_logit_diff']:.2g}), "
            f"argmax agreement {numbers['argmax_agreement']:.3f} over {numbers['positions']} positions")


# ------------------------------------------------------------------------------ verified write


@dataclass(frozen=True)
class Reference:
    """What a merge's output must match: the reference's logits on the verification batch, what
    the reference is (for messages and the card), where the batch came from, and how far the merged
    thing itself moves the base's logits (`effect`, recorded under `effect_key`)."""

    logits: torch.Tensor
    name: str
    samples: str
    effect: float
    effect_key: str
    effect_words: str


def write_verified(out: Path, save: Callable[[Path], torch.Tensor], processor, reference: Reference, tolerance: float,
                   card: Callable[[dict[str, Any]], Card], echo=print, hint: str = "") -> Card:
    """The one way a merge's output becomes visible: `save(folder)` writes the weights into a staged
    folder beside `out` and returns the logits of what it wrote, loaded back; the processor goes
    beside them; past `tolerance` from `reference` a KitError leaves nothing at `out`; else the card
    made by `card(verification record)` is written and the folder renamed into place. Returns that card."""
    with staged_folder(out, replace=True) as tmp:
        got = save(tmp)
        processor.save_pretrained(tmp)
        numbers = logit_drift(reference.logits, got)
        echo(f"verify: {describe_numbers(numbers)} vs {reference.name}; {reference.effect_words} {reference.effect:.3g}")
        check_drift(numbers, tolerance, reference.name, hint=hint)
        written = card({"reference": reference.name, "samples": reference.samples, "tolerance": tolerance,
                        reference.effect_key: reference.effect, **numbers})
        written.write(tmp)
    return written
