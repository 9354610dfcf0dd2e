"""LLaVA-Bench-style judged evaluation: a text-only LLM grades free-form answers against references.

For each question the model answers freely (no "Answer yes or no." suffix). A judge that never sees
the image gets what is known about it (the item's optional `context`: captions, findings), the
question, the reference answer (Assistant 1) and the model's answer (Assistant 2), and gives each a
score from 1 to 10 on the first line of its reply. The relative score is
sum(model scores) / sum(reference scores) x 100, overall and per category (the item's `category`,
else its `answer_type`), as LLaVA-Bench reports it.

Items are kit eval's JSONL (see kit.eval.vqa) with two optional fields::

    {"id": "q1", "image": "a.png", "question": "What does the scan show?", "answer": "A fracture of the left radius.",
     "answer_type": "open", "category": "findings", "context": "X-ray of the left wrist. Transverse fracture of the distal radius."}

`context` may also be a list of strings (one caption per line). Without it the judge sees only the
question and the two answers; the report says how many items that was.

The judge's prompt holds the private questions, answers and context, so a judge that is not on this
machine (the OpenAI API, a URL whose host is not loopback) is refused unless `allow_remote` is set,
before any connection is made. The judge replies at temperature 0 with a fixed seed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kit.core.errors import KitError

if TYPE_CHECKING:
    from kit.eval.vqa import Item
    from kit.generate.backends import Backend

PROMPT_FILE = Path(__file__).resolve().with_name("judge_prompt.yaml")
# A pinned snapshot: a judge's scores are only comparable with scores from the same judge.
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-08-06"
JUDGE_KINDS = "openai, an OpenAI-compatible URL (http://127.0.0.1:8000/v1) or hf:PATH (hf: = packaged SmolLM2)"
MAX_REQUEST_TRIES = 3  # per judge request, for retryable errors (429, 5xx, timeouts)


@dataclass
class JudgeItem:
    item: Item
    context: str | None
    category: str


@dataclass
class Scores:
    """What a judge reply says: both scores, or `problem` (why it could not be read)."""

    reference: float | None = None
    candidate: float | None = None
    problem: str | None = None
    clipped: bool = False


# ------------------------------------------------------------------------------------- judge


def resolve_judge(spec: str, judge_model: str | None = None, allow_remote: bool = False) -> Backend:
    """The judge backend for `--judge` (openai | http(s)://host:port/v1 | hf:PATH).

    Raises KitError for an unknown spec, a flag that does not fit it, a non-loopback judge without
    `allow_remote` (private text would leave the machine), or the OpenAI API without a key. Never
    opens a connection or loads a model.
    """
    from kit.generate.backends import HFBackend, OpenAIBackend, make_backend

    spec = (spec or "").strip()
    if spec.startswith("hf:"):
        if judge_model:
            raise KitError("--judge-model applies to openai and URL judges; give a local model as --judge hf:PATH")
        path = spec[3:].strip()
        if path in ("", "default"):
            return HFBackend(None)
        if not Path(path).is_dir() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise KitError(f"--judge {spec}: {path} is not a folder; give a local causal LM folder (or a cached hub id)")
        return HFBackend(path)
    if spec == "openai":
        backend: OpenAIBackend = make_backend("openai", judge_model or DEFAULT_JUDGE_MODEL, None)  # type: ignore[assignment]
    elif spec.startswith(("http://", "https://")):
        if not urlsplit(spec).hostname:
            raise KitError(f"--judge {spec} has no host; use a URL like http://127.0.0.1:8000/v1")
        if not judge_model:
            raise KitError(f"--judge {spec} needs --judge-model: the model name that server serves")
        backend = make_backend("openai", judge_model, spec)  # type: ignore[assignment]
    else:
        raise KitError(f"unknown --judge '{spec}'; use {JUDGE_KINDS}")
    if backend.is_remote and not allow_remote:
        raise KitError(
            f"the judge prompt holds your evaluation questions, reference answers, model answers and context, and --judge "
            f"{spec} would send them to {backend.host}; use a loopback URL or hf:PATH, or pass --allow-remote"
        )
    if spec == "openai" and not backend.api_key:
        raise KitError("set OPENAI_API_KEY to judge with the OpenAI API (or give --judge a local URL or hf:PATH)")
    return backend


def load_prompt(path: Path = PROMPT_FILE) -> dict[str, Any]:
    """The judge prompt (system, user, with_context, without_context, retry, version). KitError if incomplete."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    missing = [k for k in ("version", "system", "user", "with_context", "without_context", "retry") if not (data or {}).get(k)]
    if missing:
        raise KitError(f"{path}: judge prompt lacks {', '.join(missing)}")
    return data


def build_messages(prompt: dict[str, Any], question: str, reference: str, candidate: str, context: str | None) -> list[dict]:
    image = prompt["with_context"].format(context=context) if context else prompt["without_context"]
    user = prompt["user"].format(image=image.strip(), question=question, reference=reference, candidate=candidate or "(no answer)")
    return [{"role": "system", "content": prompt["system"].strip()}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------- parsing

_NUMBER = r"(?<![\w.])(-?\d+(?:\.\d+)?)"
_LABELLED = re.compile(r"assistant\s*#?\s*([12])\b[^\d\n]{0,24}?" + _NUMBER, re.IGNORECASE)
_OUT_OF_TEN = re.compile(r"\s*(?:/|out\s+of)\s*10\b", re.IGNORECASE)
_LEAD = re.compile(r"^(?:scores?|ratings?|grades?)\s*[:=-]?\s*", re.IGNORECASE)
# The whole first line is the pair: a line of prose that merely contains two numbers ("scores from
# 1 to 10 ...", an echo of the instructions) must not count as scores.
_PAIR = re.compile(r"\s*" + _NUMBER + r"\s*(?:,|;|\s|\band\b)\s*" + _NUMBER + r"\s*\.?\s*")


def parse_scores(reply: str) -> Scores:
    """Read the two scores from a judge reply.

    Accepted: a first non-empty line that is just the pair ("8 6", "8, 6", "Scores: 8/10 6/10"), or
    "Assistant 1: 8 Assistant 2: 6" within the first two non-empty lines. Scores from 0 to 10 are
    kept, 0 raised to 1 (`clipped`); anything else is a problem, never a silent score.
    """
    lines = [ln.replace("*", "").strip() for ln in str(reply or "").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return Scores(problem="empty reply")
    labelled: dict[str, str] = {}
    for which, value in _LABELLED.findall("\n".join(lines[:2])):
        labelled.setdefault(which, value)
    if set(labelled) == {"1", "2"}:
        values = [labelled["1"], labelled["2"]]
    else:
        pair = _PAIR.fullmatch(_LEAD.sub("", _OUT_OF_TEN.sub("", lines[0])))
        if pair is None:
            return Scores(problem=f"first line is not two scores: {lines[0][:80]!r}")
        values = list(pair.groups())
    scores = [float(v) for v in values]
    bad = [v for v in scores if not 0 <= v <= 10]
    if bad:
        return Scores(problem=f"score {bad[0]:g} is outside 1-10")
    clipped = any(v < 1 for v in scores)
    ref, cand = (max(1.0, v) for v in scores)
    return Scores(ref, cand, clipped=clipped)


# ---------------------------------------------------------------------------------- asking


async def _ask_many(backend: Backend, convs: list[list[dict]], *, max_tokens: int, temperature: float, seed: int,
                    concurrency: int) -> list[str | Exception]:
    """One reply text per conversation, or the BackendError that ended its request (KitError propagates)."""
    from kit.generate.backends import BackendError

    if not convs:
        return []
    if backend.batch_size > 1:  # in-process: real batches, nothing to retry
        out: list[str | Exception] = []
        for start in range(0, len(convs), backend.batch_size):
            chunk = convs[start : start + backend.batch_size]
            try:
                done = await backend.complete_batch(chunk, max_tokens=max_tokens, temperature=temperature, seed=seed)
                out += [c.text for c in done]
            except BackendError as e:
                out += [e] * len(chunk)
        return out
    gate = asyncio.Semaphore(concurrency)

    async def one(messages: list[dict]) -> str | Exception:
        tries = 0
        async with gate:
            while True:
                try:
                    return (await backend.complete(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)).text
                except BackendError as e:
                    tries += 1
                    if not e.retryable or tries >= MAX_REQUEST_TRIES:
                        return e
                    await asyncio.sleep(min(30.0, e.retry_after if e.retry_after is not None else 2.0**tries))

    return list(await asyncio.gather(*(one(m) for m in convs)))


def judge_answers(
    backend: Backend,
    items: list[JudgeItem],
    answers: list[str],
    *,
    prompt: dict[str, Any] | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    concurrency: int = 8,
) -> list[dict[str, Any]]:
    """Judge each answer against its item's reference. One row per item: status judged | unparsed |
    failed, both scores (None unless judged), the judge's replies and, if not judged, why.

    An unreadable reply is asked once more (the reply plus a reminder of the format); a request
    that fails after retries is `failed`. Raises KitError for problems no retry fixes (bad key).
    """
    prompt = prompt or load_prompt()
    convs = [build_messages(prompt, j.item.question, j.item.answer, a, j.context) for j, a in zip(items, answers)]

    async def run() -> list[dict[str, Any]]:
        try:
            kw = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "concurrency": concurrency}
            first = await _ask_many(backend, convs, **kw)
            parsed = [parse_scores(r) if isinstance(r, str) else None for r in first]
            again = [i for i, p in enumerate(parsed) if p is not None and p.problem]
            retry_convs = [convs[i] + [{"role": "assistant", "content": str(first[i])},
                                       {"role": "user", "content": prompt["retry"].strip()}] for i in again]
            second = dict(zip(again, await _ask_many(backend, retry_convs, **kw)))
        finally:
            await backend.aclose()
        rows = []
        for i, (j, answer) in enumerate(zip(items, answers)):
            retry = second.get(i)
            replies = [r for r in (first[i], retry) if isinstance(r, str)]
            result = parse_scores(retry) if isinstance(retry, str) else parsed[i]
            if result is None:  # no reply at all
                status, problem = "failed", f"judge request failed: {_reason(first[i])}"
            elif result.problem:
                problem = result.problem if isinstance(retry, str) else f"{result.problem}; the retry request failed: {_reason(retry)}"
                status = "unparsed"
            else:
                status, problem = "judged", None
            ok = status == "judged"
            rows.append({
                "id": j.item.id, "category": j.category, "question": j.item.question, "answer": j.item.answer,
                "prediction": answer, "context_given": j.context is not None, "status": status,
                "reference_score": result.reference if ok else None, "candidate_score": result.candidate if ok else None,
                "clipped": bool(ok and result.clipped), "problem": problem, "judge_replies": replies,
            })
        return rows

    return asyncio.run(run())


def _reason(error: object) -> str:
    return getattr(error, "reason", None) or str(error) or type(error).__name__


# ------------------------------------------------------------------------------ candidates


def load_judge_items(data: Path, image_folder: Path | None = None, limit: int | None = None) -> list[JudgeItem]:
    """kit eval's items plus the optional `context` and `category`. KitError (file:line) for bad lines."""
    from kit.eval.vqa import load_items
    from kit.core.files import read_jsonl

    items = load_items(Path(data), image_folder, limit)
    out = []
    # load_items keeps every line in file order (or fails), so line i of the file is item i.
    for it, (lineno, rec) in zip(items, read_jsonl(Path(data), "evaluation file", allow_empty=True)):
        context = rec.get("context")
        if isinstance(context, list) and all(isinstance(c, str) for c in context):
            context = "\n".join(c.strip() for c in context if c.strip())
        if context is not None and not isinstance(context, str):
            raise KitError(f"{data}:{lineno}: field 'context' must be a string or a list of strings, got {type(context).__name__}")
        category = rec.get("category", it.answer_type)
        if not isinstance(category, str) or not category.strip():
            raise KitError(f"{data}:{lineno}: field 'category' must be a non-empty string")
        out.append(JudgeItem(it, (context or "").strip() or None, category.strip()))
    return out


def answer_free(model, processor, info: dict[str, Any], items: list[Item], max_new_tokens: int) -> list[str]:
    """Greedy free-form answers: the question as asked, no "Answer yes or no." suffix."""
    from kit.eval.vqa import answer_batch

    return answer_batch(model, processor, info, items, max_new_tokens, free=True)


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


def free_answers(loaded: tuple[Any, Any, dict[str, Any]], items: list[JudgeItem], *, batch_size: int = 8,
                 max_new_tokens: int = 128) -> list[str]:
    """The loaded model's (kit.infer.load.load_for_inference) greedy free-form answer to each item."""
    if batch_size < 1 or max_new_tokens < 1:
        raise KitError("batch size and answer length must be at least 1")
    model, processor, info = loaded
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        answers += answer_free(model, processor, info, [j.item for j in items[start : start + batch_size]], max_new_tokens)
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


def judged_eval(
    model_path: Path,
    data: Path,
    backend: Backend,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    image_folder: Path | None = None,
    echo: Callable[[str], None] = print,
    **judging: Any,
) -> dict[str, Any]:
    """Load `model_path`, answer every question freely, free the model (an in-process judge may need
    the memory), then judge_run (whose keyword arguments `judging` passes on).

    Raises KitError for a bad file, a folder kit cannot load, or a judge problem no retry fixes.
    """
    from kit.eval.vqa import model_notes
    from kit.infer.load import load_for_inference

    items = load_judge_items(Path(data), image_folder, limit)
    loaded = load_for_inference(Path(model_path))
    echo(f"judged eval: {model_path} answers {len(items)} questions freely (up to {max_new_tokens} tokens); judge {backend.describe()}")
    answers = free_answers(loaded, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
    notes = model_notes(loaded[2])
    del loaded
    return judge_run(backend, items, answers, model=str(model_path), data=Path(data), notes=notes, **judging)


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
