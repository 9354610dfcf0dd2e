"""LLaVA-Med-style VQA evaluation of a model or adapter folder: closed (yes/no) accuracy and
open-answer recall, on the items of kit.data.vqa.

Closed questions: the first "yes"/"no" word of the prediction is compared with the answer (no
yes/no word counts as wrong). Open questions: recall of the ground-truth answer's words (lowercased,
punctuation stripped) among the prediction's words, averaged — LLaVA-Med's open-set metric.
Answers are greedy, from the model's prompt format as trained (see kit.infer.load).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kit.core.errors import KitError
from kit.core.files import write_jsonl_atomic
from kit.core.precision import to_model
from kit.data.images import ImageProblem, prepare_image
from kit.data.vqa import SUFFIX, Item, load_items, words, yes_no
from kit.infer.generation import pad_id, stop_ids
from kit.infer.load import load_for_inference
from kit.infer.prompts import build_prompt, encode, template_of

# ------------------------------------------------------------------------------------- metrics


def closed_correct(prediction: str, answer: str) -> bool:
    want = yes_no(answer)
    return want is not None and yes_no(prediction) == want


def open_recall(prediction: str, answer: str) -> float:
    """Fraction of the answer's words that appear in the prediction."""
    want = words(answer)
    if not want:
        return 0.0
    have = set(words(prediction))
    return sum(w in have for w in want) / len(want)


def score(prediction: str, answer: str, answer_type: str) -> float:
    return float(closed_correct(prediction, answer)) if answer_type == "closed" else open_recall(prediction, answer)


# ---------------------------------------------------------------------------------------- model


def _prompt(processor, question: str, answer_type: str | None, info: dict[str, Any]) -> str:
    """The prompt in the format the model was trained with (kit recipe template) else its chat
    template; answer_type None asks the question as it is (free-form answers)."""
    text = question if answer_type is None else f"{question} {SUFFIX[answer_type]}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return build_prompt(processor, messages, info)


def answer_batch(model, processor, info: dict[str, Any], items: list[Item], max_new_tokens: int, *, free: bool = False) -> list[str]:
    """Greedy answers for a batch (left padding). free: no short-answer suffix ("Answer yes or no.")."""
    tok = processor.tokenizer
    images = []
    for it in items:
        try:
            images.append(prepare_image(it.image, info.get("image_aspect") or "pad", processor.image_processor))
        except ImageProblem as e:
            raise KitError(f"{it.where}: {e}") from None
    prompts = [_prompt(processor, it.question, None if free else it.answer_type, info) for it in items]
    inputs = to_model(encode(processor, prompts, images, template_of(processor, info)), model)
    stop = stop_ids(model, tok)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=stop or None, pad_token_id=pad_id(tok, stop),
        )
    texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


# --------------------------------------------------------------------------------------- runs


def summarise(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    closed = [p["score"] for p in predictions if p["answer_type"] == "closed"]
    opened = [p["score"] for p in predictions if p["answer_type"] == "open"]
    every = closed + opened
    return {
        "closed_accuracy": sum(closed) / len(closed) if closed else None,
        "open_recall": sum(opened) / len(opened) if opened else None,
        "overall": sum(every) / len(every) if every else None,
        "n_closed": len(closed),
        "n_open": len(opened),
    }


def evaluate(
    model_path: Path,
    data: Path,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    echo: Callable[[str], None] = print,
    image_folder: Path | None = None,
    loaded: tuple[Any, Any, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Answer every question greedily and score them.

    Returns closed_accuracy, open_recall, overall (mean per-question score; None where a type has no
    questions), n_closed, n_open, model, data, notes and predictions (one dict per question: id,
    answer_type, question, answer, prediction, score). The file is fully checked before the model
    is loaded; KitError (file:line) for bad lines or missing images. `loaded`: the model as
    kit.infer.load.load_for_inference already returned it, for callers that ask it more than once.
    """
    if batch_size < 1:
        raise KitError(f"batch size must be at least 1 (got {batch_size})")
    if max_new_tokens < 1:
        raise KitError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    items = load_items(Path(data), image_folder, limit)
    model, processor, info = loaded or load_for_inference(Path(model_path))
    n_c = sum(it.answer_type == "closed" for it in items)
    echo(f"evaluating {model_path} ({info['kind']}) on {len(items)} questions ({n_c} closed, {len(items) - n_c} open) from {data}")
    notes = model_notes(info)
    for note in notes:
        echo(f"note: {note}")
    predictions = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for it, pred in zip(chunk, answer_batch(model, processor, info, chunk, max_new_tokens)):
            predictions.append({
                "id": it.id, "answer_type": it.answer_type, "question": it.question, "answer": it.answer,
                "prediction": pred, "score": score(pred, it.answer, it.answer_type),
            })
    result = summarise(predictions)
    result.update({"model": str(model_path), "kind": info["kind"], "data": str(data), "notes": notes, "predictions": predictions})
    return result


def model_notes(info: dict[str, Any]) -> list[str]:
    """What a report on this loaded model must say (load notes, a caption-only template)."""
    notes = list(info["notes"])
    if info.get("template") == "plain":
        notes.append("plain template: this model was trained to caption only and is not shown the questions; expect low scores")
    return notes


# ------------------------------------------------------------------------------------- output


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


METRICS = (("closed accuracy", "closed_accuracy"), ("open recall", "open_recall"), ("overall", "overall"))


def format_result(result: dict[str, Any]) -> str:
    """A metric | value table (percent) for one evaluation."""
    rows = [f"{'metric':16} | {'value':>7} | n"]
    counts = {"closed_accuracy": result["n_closed"], "open_recall": result["n_open"], "overall": result["n_closed"] + result["n_open"]}
    for label, key in METRICS:
        rows.append(f"{label:16} | {_pct(result.get(key)):>7} | {counts[key]}")
    return "\n".join(rows)


def before_after_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A metric | base | adapted | change table (percent, change in points)."""
    rows = [f"{'metric':16} | {'base':>7} | {'adapted':>7} | {'change':>7}"]
    for label, key in METRICS:
        b, a = before.get(key), after.get(key)
        change = "-" if a is None or b is None else f"{100 * (a - b):+.1f}"
        rows.append(f"{label:16} | {_pct(b):>7} | {_pct(a):>7} | {change:>7}")
    counts = [(r["n_closed"], r["n_open"]) for r in (before, after)]
    line = f"questions: {counts[1][0]} closed, {counts[1][1]} open"
    if counts[0] != counts[1]:
        line = f"questions differ: base {counts[0][0]} closed / {counts[0][1]} open, adapted {counts[1][0]} closed / {counts[1][1]} open"
    return "\n".join(rows + [line])


def write_predictions(result: dict[str, Any], path: Path) -> Path:
    """One JSON object per prediction, written atomically (temp file + rename)."""
    write_jsonl_atomic(Path(path), result["predictions"])
    return Path(path)
