"""LLaVA-Med-style VQA evaluation of a model or adapter folder: closed accuracy and open-answer
recall on the items of kit.data.vqa, scored by `llava-med` (LLaVA-Med's published scorer, the
default) or kit's `strict` metric (kit.eval.metrics), each with its own prompts, and each number
with its question count and a 95% bootstrap interval. Answers are greedy, from the model's prompt
format as trained (see kit.infer.load).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kit.core.errors import KitError
from kit.core.files import write_jsonl_atomic
from kit.core.precision import to_model
from kit.data.images import ImageProblem, prepare_image
from kit.data.vqa import Item, ask, load_items
from kit.eval.hallucination import (chair, description_claims, format_hallucination, hallucination_rows, pope_by_set,
                                    says_yes)
from kit.eval.metrics import PROMPT_STYLE, change_interval, check_metric, interval, score
from kit.infer.generation import pad_id, stop_ids
from kit.data.prompt_spec import PromptSpec
from kit.infer.load import Loaded, load_for_inference
from kit.infer.prompts import build_prompt, encode


# ---------------------------------------------------------------------------------------- model


def _prompt(processor, text: str, spec: PromptSpec, image: bool = True) -> str:
    """The prompt in the format the model was trained with (kit.data.prompt_spec)."""
    parts = [{"type": "image"}] if image else []
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return build_prompt(processor, messages, spec)


def answer_batch(loaded: Loaded, items: list[Item], max_new_tokens: int, *, style: str = "as-written") -> list[str]:
    """Greedy answers for a batch (left padding); `style`: how the questions are asked (kit.data.vqa.ask)."""
    return [text for text, _ in answer_batch_ids(loaded, items, max_new_tokens, style=style)]


def answer_batch_ids(loaded: Loaded, items: list[Item], max_new_tokens: int, *,
                     style: str = "as-written") -> list[tuple[str, list[int]]]:
    """Greedy answers for a batch: each answer's text and its token ids (padding dropped)."""
    model, processor, spec = loaded.model, loaded.processor, loaded.spec
    tok = processor.tokenizer
    images = []
    for it in items:
        try:
            if it.image is not None:
                images.append(prepare_image(it.image, spec.image_aspect, processor.image_processor))
        except ImageProblem as e:
            raise KitError(f"{it.where}: {e}") from None
    prompts = [_prompt(processor, ask(it.question, it.answer, it.answer_type, style=style), spec, image=it.image is not None)
               for it in items]
    inputs = to_model(encode(processor, prompts, images, template=spec.template), model)
    stop = stop_ids(model, tok)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=stop or None, pad_token_id=pad_id(tok, stop),
        )
    new = out[:, inputs["input_ids"].shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    ids = []
    for row in new.tolist():  # up to its stop token (what follows is padding for the batch)
        end = next((j for j, t in enumerate(row) if t in stop), len(row) - 1)
        ids.append(row[:end + 1])
    return [(t.strip(), r) for t, r in zip(texts, ids)]


class HfAnswerer:
    """A model or adapter folder answering through transformers, in batches."""

    def __init__(self, loaded: Loaded, batch_size: int = 8):
        self.loaded = loaded
        self.batch_size = batch_size
        self.kind = loaded.kind
        self.notes = model_notes(loaded)
        self.tokenizer = loaded.processor.tokenizer

    def answers(self, items: list[Item], budget: int, style: str) -> list[tuple[str, list[int]]]:
        """In batches of questions with images and batches of text questions, in the items' order."""
        out: dict[int, tuple[str, list[int]]] = {}
        for with_image in (True, False):
            group = [i for i, it in enumerate(items) if (it.image is not None) == with_image]
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                answers = answer_batch_ids(self.loaded, [items[i] for i in chunk], budget, style=style)
                out.update(zip(chunk, answers))
        return [out[i] for i in range(len(items))]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]


# --------------------------------------------------------------------------------------- runs


KEYS = ("closed_accuracy", "open_recall", "overall")
DESCRIBE_TOKENS = 128  # a description needs room; short VQA answers keep their own budget


def _scores(predictions: list[dict[str, Any]], key: str) -> list[float]:
    """VQA scores only: hallucination probes and descriptions have their own (kit.eval.hallucination)."""
    vqa = [p for p in predictions if not p.get("probe") and p["answer_type"] in ("closed", "open")]
    if key == "overall":
        return [p["score"] for p in vqa]
    kind = "closed" if key == "closed_accuracy" else "open"
    return [p["score"] for p in vqa if p["answer_type"] == kind]


def summarise(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """Means per question type and overall, their question counts and 95% bootstrap intervals."""
    out: dict[str, Any] = {}
    for key in KEYS:
        xs = _scores(predictions, key)
        out[key] = sum(xs) / len(xs) if xs else None
        out[f"{key}_ci"] = interval(xs)
    out["n_closed"] = len(_scores(predictions, "closed_accuracy"))
    out["n_open"] = len(_scores(predictions, "open_recall"))
    return out


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """Per metric: the change in points' fraction and its paired 95% interval; None when the two
    runs did not answer the same questions."""
    if [p["id"] for p in before["predictions"]] != [p["id"] for p in after["predictions"]]:
        return None
    out = {}
    for key in KEYS:
        b, a = _scores(before["predictions"], key), _scores(after["predictions"], key)
        out[key] = {"change": (sum(a) - sum(b)) / len(a) if a else None, "ci": change_interval(b, a)}
    return out


def evaluate(
    model_path: Path,
    data: Path,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    echo: Callable[[str], None] = print,
    image_folder: Path | None = None,
    loaded: Loaded | None = None,
    metric: str = "llava-med",
    answerer=None,
    text_only: bool = False,
) -> dict[str, Any]:
    """Answer every question greedily and score them with `metric` (llava-med | strict).

    Returns closed_accuracy, open_recall, overall (mean per-question score; None where a type has no
    questions) with their 95% bootstrap intervals (`<key>_ci`), n_closed, n_open, metric, prompts,
    model, data, notes, predictions (one dict per question: id, answer_type, question, answer,
    prediction, score), answer_tokens (each answer's token ids and their text pieces) and
    seconds_per_item. The file is fully checked before the model
    is loaded; KitError (file:line) for bad lines or missing images. `loaded`: the model as
    kit.infer.load.load_for_inference already returned it, for callers that ask it more than once.
    `answerer`: what answers instead of a transformers model (kit.eval.gguf's llama.cpp answerer):
    `.kind`, `.notes`, `.answers(items, budget, style) -> [(text, token ids)]` and `.pieces(ids)`.
    `text_only`: evaluate the questions without an image only (a text-only export's).
    """
    if batch_size < 1:
        raise KitError(f"batch size must be at least 1 (got {batch_size})")
    if max_new_tokens < 1:
        raise KitError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    check_metric(metric)
    items = load_items(Path(data), image_folder, limit)
    if text_only:
        items = [it for it in items if it.image is None]
        if not items:
            raise KitError(f"{data} has no text questions (lines without 'image'), and a text-only export answers only those")
    if answerer is None:
        answerer = HfAnswerer(loaded or load_for_inference(Path(model_path)), batch_size)
    echo(f"evaluating {model_path} ({answerer.kind}) on {describe_items(items)} from {data}")
    notes = list(answerer.notes)
    for note in notes:
        echo(f"note: {note}")
    started = time.perf_counter()
    predictions, tokens = answer_all(answerer, items, max_new_tokens=max_new_tokens, metric=metric)
    result = summarise(predictions)
    if any(p.get("probe") for p in predictions):
        result["pope"] = pope_by_set(predictions)
    if any(it.answer_type == "describe" for it in items):
        result["chair"] = chair(predictions)
    result.update({
        "metric": metric, "prompts": PROMPT_STYLE[metric], "model": str(model_path), "kind": answerer.kind, "data": str(data),
        "notes": notes, "predictions": predictions, "answer_tokens": tokens,
        "seconds_per_item": (time.perf_counter() - started) / max(1, len(items)),
    })
    return result


def describe_items(items: list[Item]) -> str:
    """'12 questions (8 closed, 4 open)', or with probes and descriptions '20 items (..., 6 probes, 2 descriptions)'."""
    n_c = sum(it.answer_type == "closed" and not it.extra.get("probe") for it in items)
    n_o = sum(it.answer_type == "open" for it in items)
    n_p = sum(bool(it.extra.get("probe")) for it in items)
    n_d = len(items) - n_c - n_o - n_p
    extra = "".join(f", {n} {what}" for n, what in ((n_p, "probes"), (n_d, "descriptions")) if n)
    return f"{len(items)} {'questions' if not extra else 'items'} ({n_c} closed, {n_o} open{extra})"


def answer_all(answerer, items: list[Item], *, max_new_tokens: int, metric: str) -> tuple[list[dict[str, Any]], list[dict[str, list]]]:
    """(a scored prediction per item, each answer's token ids and pieces), in the items' order.
    Descriptions are generated apart: they need a longer budget."""
    by_index: dict[int, dict[str, Any]] = {}
    tokens: dict[int, dict[str, list]] = {}
    described = [i for i, it in enumerate(items) if it.answer_type == "describe"]
    asked = [i for i, it in enumerate(items) if it.answer_type != "describe"]
    for group, budget in ((asked, max_new_tokens), (described, max(max_new_tokens, DESCRIBE_TOKENS))):
        if group:
            answers = answerer.answers([items[i] for i in group], budget, PROMPT_STYLE[metric])
            for i, (pred, ids) in zip(group, answers):
                by_index[i] = _prediction(items[i], pred, metric)
                tokens[i] = {"ids": ids, "pieces": answerer.pieces(ids)}
    return [by_index[i] for i in range(len(items))], [tokens[i] for i in range(len(items))]


def _prediction(it: Item, pred: str, metric: str) -> dict[str, Any]:
    out = {"id": it.id, "answer_type": it.answer_type, "question": it.question, "answer": it.answer, "prediction": pred}
    if it.answer_type == "describe":
        claims = description_claims(pred, it.extra["facts"], it.extra["vocab"])
        return {**out, "score": None, "claims": [c.to_json() for c in claims]}
    out["score"] = score(pred, it.answer, it.answer_type, metric=metric)
    if it.extra.get("probe"):
        out.update(probe=it.extra["probe"], said_yes=says_yes(pred))
    return out


def model_notes(loaded: Loaded) -> list[str]:
    """What a report on this loaded model must say (load notes, a caption-only template)."""
    notes = list(loaded.notes)
    if loaded.spec.template == "plain":
        notes.append("plain template: this model was trained to caption only and is not shown the questions; expect low scores")
    return notes


# ------------------------------------------------------------------------------------- output


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(ci: tuple[float, float] | None, signed: bool = False) -> str:
    if ci is None:
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"[{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


METRICS = (("closed accuracy", "closed_accuracy"), ("open recall", "open_recall"), ("overall", "overall"))


def _counts(result: dict[str, Any]) -> dict[str, int]:
    return {"closed_accuracy": result["n_closed"], "open_recall": result["n_open"], "overall": result["n_closed"] + result["n_open"]}


def _scored_by(result: dict[str, Any]) -> str:
    return f"metric: {result['metric']} (questions {result['prompts']}); intervals: 95% bootstrap"


def format_result(result: dict[str, Any]) -> str:
    """A metric | value | 95% interval | n table (percent) for one evaluation."""
    rows = [f"{'metric':16} | {'value':>7} | {'95% interval':>14} | n"]
    counts = _counts(result)
    for label, key in METRICS if counts["overall"] or not _has_hallucination(result) else ():
        rows.append(f"{label:16} | {_pct(result.get(key)):>7} | {_ci(result.get(f'{key}_ci')):>14} | {counts[key]}")
    rows.append(_scored_by(result))
    extra = format_hallucination(result)
    return "\n".join(rows + ([extra] if extra else []))


def before_after_table(before: dict[str, Any], after: dict[str, Any], labels: tuple[str, str] = ("base", "adapted")) -> str:
    """A metric | base | adapted | change | 95% interval of the change | n table (percent, change in
    points, paired bootstrap over the same questions), then a line saying what the change means.
    `labels` name the two columns."""
    rows = [f"{'metric':19} | {labels[0]:>7} | {labels[1]:>7} | {'change':>7} | {'95% interval':>16} | n"]
    diff = changes(before, after)
    counts = _counts(after)
    vqa = bool(counts["overall"]) or not _has_hallucination(after)
    for label, key in METRICS if vqa else ():
        b, a = before.get(key), after.get(key)
        change = "-" if a is None or b is None else f"{100 * (a - b):+.1f}"
        ci = _ci(diff[key]["ci"], signed=True) if diff else "-"
        rows.append(f"{label:19} | {_pct(b):>7} | {_pct(a):>7} | {change:>7} | {ci:>16} | {counts[key]}")
    for label, b, a, change in hallucination_rows(before, after):
        rows.append(f"{label:19} | {_pct(b):>7} | {_pct(a):>7} | {100 * change['change']:>+7.1f} | "
                    f"{_ci(change['ci'], signed=True):>16} | {_hallucination_n(after, label)}")
    rows.append(_scored_by(after))
    if diff is None:
        rows.append("the two runs answered different questions: no paired interval")
    elif vqa:
        rows.append(noise_verdict(diff, counts["overall"]))
    return "\n".join(rows)


def _has_hallucination(result: dict[str, Any]) -> bool:
    return bool(result.get("pope") or (result.get("chair") or {}).get("n"))


def _hallucination_n(result: dict[str, Any], label: str) -> int:
    if label.startswith("POPE"):
        return result["pope"][label.split()[-1]]["n"]
    return result["chair"]["n"]


def noise_verdict(diff: dict[str, Any], n: int) -> str:
    """Whether the overall change is larger than what resampling these questions gives by chance."""
    overall = diff["overall"]
    if overall["ci"] is None or overall["change"] is None:
        return "no questions: no change to judge"
    lo, hi = overall["ci"]
    if lo <= 0 <= hi:
        return (f"too few questions to tell this change from noise: the overall change's 95% interval "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}] includes 0 ({n} questions); evaluate on more held-out questions")
    return f"the overall change is larger than the noise of {n} questions (95% interval excludes 0)"


def write_predictions(result: dict[str, Any], path: Path) -> Path:
    """One JSON object per prediction, written atomically (temp file + rename)."""
    write_jsonl_atomic(Path(path), result["predictions"])
    return Path(path)
