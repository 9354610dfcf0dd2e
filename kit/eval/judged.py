"""Judged evaluation runs: the items with their context and category, the model's free-form
answers, the judge's scores summarised per category (LLaVA-Bench's relative score), and the tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.data.vqa import Item, load_items
from kit.eval.judge import JudgeItem, judge_answers, load_prompt
from kit.eval.vqa import answer_batch
from kit.infer.load import Loaded
from kit.generate.backends import Backend


def load_judge_items(data: Path, image_folder: Path | None = None, limit: int | None = None) -> list[JudgeItem]:
    """kit eval's items plus the optional `context` and `category`. KitError (file:line) for bad lines."""
    out = []
    for it in load_items(Path(data), image_folder, limit):
        rec = it.extra
        context = rec.get("context")
        if isinstance(context, list) and all(isinstance(c, str) for c in context):
            context = "\n".join(c.strip() for c in context if c.strip())
        if context is not None and not isinstance(context, str):
            raise KitError(f"{it.where}: field 'context' must be a string or a list of strings, got {type(context).__name__}")
        category = rec.get("category", it.answer_type)
        if not isinstance(category, str) or not category.strip():
            raise KitError(f"{it.where}: field 'category' must be a non-empty string")
        out.append(JudgeItem(it, (context or "").strip() or None, category.strip()))
    return out


def answer_free(loaded: Loaded, items: list[Item], max_new_tokens: int) -> list[str]:
    """Greedy free-form answers: the question as asked, no "Answer yes or no." suffix."""
    return answer_batch(loaded, items, max_new_tokens, style="as-written")


# ------------------------------------------------------------------------------------- runs


def _block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "judged"]
    ref = sum(r["reference_score"] for r in ok)
    cand = sum(r["candidate_score"] for r in ok)
    return {
        "reference": ref / len(ok) if ok else None,
        "candidate": cand / len(ok) if ok else None,
        "relative": 100 * cand / ref if ref else None,
        "n": len(rows),
        "judged": len(ok),
        "unparsed": sum(r["status"] == "unparsed" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
    }


def summarise_judged(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category (in first-seen order) and overall: mean reference and model scores, relative score
    (model sum / reference sum x 100, over judged items only), and judged / unparsed / failed counts."""
    categories = list(dict.fromkeys(r["category"] for r in rows))
    return {
        "categories": {c: _block([r for r in rows if r["category"] == c]) for c in categories},
        "overall": _block(rows),
    }


def free_answers(loaded: Loaded, items: list[JudgeItem], *, batch_size: int = 8,
                 max_new_tokens: int = 128) -> list[str]:
    """The loaded model's (kit.infer.load.load_for_inference) greedy free-form answer to each item."""
    if batch_size < 1 or max_new_tokens < 1:
        raise KitError("batch size and answer length must be at least 1")
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        answers += answer_free(loaded, [j.item for j in items[start : start + batch_size]], max_new_tokens)
    return answers


def judge_run(
    backend: Backend,
    items: list[JudgeItem],
    answers: list[str],
    *,
    model: str,
    data: Path,
    notes: list[str],
    judge_max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    concurrency: int = 8,
) -> dict[str, Any]:
    """Have `backend` judge each answer against its reference and summarise. Returns
    summarise_judged's keys plus judge, prompt_version, model, data, n_with_context, notes and
    predictions (one row per item, judge replies included). KitError for a judge problem no retry fixes."""
    if judge_max_tokens < 1 or concurrency < 1:
        raise KitError("judge reply length and concurrency must be at least 1")
    prompt = load_prompt()
    notes = list(notes)
    rows = judge_answers(backend, items, answers, prompt=prompt, max_tokens=judge_max_tokens, temperature=temperature,
                         seed=seed, concurrency=concurrency)
    with_context = sum(j.context is not None for j in items)
    if with_context == 0:
        notes.append("no item has a context: the judge saw only the question and the two answers")
    elif with_context < len(items):
        notes.append(f"{len(items) - with_context} of {len(items)} items have no context: for those the judge saw only the question and the two answers")
    result = summarise_judged(rows)
    result.update({
        "judge": backend.describe(), "prompt_version": prompt["version"], "temperature": temperature, "seed": seed,
        "model": model, "data": str(data), "n_with_context": with_context, "notes": notes, "predictions": rows,
    })
    return result


# ----------------------------------------------------------------------------------- output


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_judged(result: dict[str, Any]) -> str:
    """A category | reference | model | relative | judged | unparsed | failed table, and the notes."""
    head = f"judged by {result['judge']} (prompt v{result['prompt_version']}): relative = model / reference x 100"
    rows = [head, f"{'category':16} | {'reference':>9} | {'model':>6} | {'relative':>8} | {'judged':>7} | {'unparsed':>8} | {'failed':>6}"]
    for name, b in [*result["categories"].items(), ("overall", result["overall"])]:
        rows.append(
            f"{name[:16]:16} | {_num(b['reference'], '.2f'):>9} | {_num(b['candidate'], '.2f'):>6} | {_num(b['relative'], '.1f'):>8} | "
            f"{b['judged']:>3}/{b['n']:<3} | {b['unparsed']:>8} | {b['failed']:>6}"
        )
    return "\n".join(rows + [f"note: {n}" for n in result["notes"] if "context" in n])


def compare_judged(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Relative scores side by side: category | base | adapted | change (points)."""
    rows = [f"judged by {after['judge']} (prompt v{after['prompt_version']}): relative score, model / reference x 100",
            f"{'category':16} | {'base':>7} | {'adapted':>7} | {'change':>7}"]
    names = list(dict.fromkeys([*before["categories"], *after["categories"]]))
    for name in [*names, "overall"]:
        b = (before["overall"] if name == "overall" else before["categories"].get(name) or {}).get("relative")
        a = (after["overall"] if name == "overall" else after["categories"].get(name) or {}).get("relative")
        change = "-" if a is None or b is None else f"{a - b:+.1f}"
        rows.append(f"{name[:16]:16} | {_num(b, '.1f'):>7} | {_num(a, '.1f'):>7} | {change:>7}")
    counts = [f"{label} {r['overall']['judged']}/{r['overall']['n']} judged, {r['overall']['unparsed']} unparsed, {r['overall']['failed']} failed"
              for label, r in (("base", before), ("adapted", after))]
    return "\n".join(rows + ["judged: " + "; ".join(counts)] + [f"note: {n}" for n in after["notes"] if "context" in n])
