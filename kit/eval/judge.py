"""LLaVA-Bench-style judged evaluation: a text-only LLM grades free-form answers against references.

For each question the model answers freely (no "Answer yes or no." suffix). A judge that never sees
the image gets what is known about it (the item's optional `context`: captions, findings), the
question, the reference answer (Assistant 1) and the model's answer (Assistant 2), and gives each a
score from 1 to 10 on the first line of its reply. The relative score is
sum(model scores) / sum(reference scores) x 100, overall and per category (the item's `category`,
else its `answer_type`), as LLaVA-Bench reports it.

Items are kit eval's JSONL (see kit.data.vqa) with two optional fields::

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kit.core.errors import KitError
from kit.data.vqa import Item
from kit.generate.backends import Backend, BackendError, HFBackend, OpenAIBackend, make_backend

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
    convs = [build_messages(prompt, j.item.question, j.item.answer, candidate=a, context=j.context) for j, a in zip(items, answers)]

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
