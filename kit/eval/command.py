"""`kit eval`: LLaVA-Med-style VQA scores of a model or adapter folder, or of a `kit export`
folder through llama.cpp (kit.eval.gguf), optionally against a baseline, optionally judged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.eval.gguf import GgufAnswerer, agreement, format_agreement, is_export
from kit.eval.judge import resolve_judge
from kit.eval.metrics import check_metric
from kit.eval.judged import compare_judged, format_judged, free_answers, judge_run, load_judge_items
from kit.eval.vqa import before_after_table, evaluate, format_result, model_notes, write_predictions
from kit.infer.llama_cpp import ExportFolder, require_llama_cpp
from kit.infer.load import load_for_inference


def eval_command(model: Path, data: Path, *, out: Path | None = None, baseline: Path | None = None, judge: str | None = None,
                 judge_model: str | None = None, allow_remote: bool = False, echo: Callable[[str], None] = print,
                 **asking: Any) -> dict[str, Any]:
    """Evaluate `model` (a model or adapter folder) on `data` (JSONL) as `asking` (Asking's fields:
    limit, batch_size, max_new_tokens, metric llava-med | strict, judge_answer_tokens) says, print a
    metric table (95% intervals) and, with `out`, write the predictions as JSONL. With `baseline`,
    evaluate it on the same questions first and print a base | adapted | change table; its result
    is returned under "baseline".

    With `judge` (openai | an OpenAI-compatible URL | hf:PATH, see kit.eval.judge), also answer freely
    and have the judge score the answers against the references (LLaVA-Bench's relative score);
    the judged result is returned under "judged" (and under "baseline"/"judged"), and each written
    prediction carries its judged answer, scores and the judge's replies under "judged".

    Raises KitError for a bad file (file:line), a missing image, or a folder kit cannot load; and,
    before anything is loaded or sent, for a non-loopback judge without `allow_remote`.
    """
    ask = Asking(**asking)
    if out is not None and Path(out).is_dir():
        raise KitError(f"--out {out} is a folder; give a .jsonl file path for the predictions")
    judge_backend, judge_items = judge_setup(judge, judge_model, allow_remote, data=Path(data), limit=ask.limit)

    exports = {p: ExportFolder.read(Path(p)) for p in (model, baseline) if p is not None and is_export(Path(p))}
    if exports and judge is not None:
        raise KitError("--judge evaluates a transformers model or adapter; judge the folder the export came from")
    if exports:
        require_llama_cpp("kit eval on an export folder")
    run = EvalRun(Path(data), ask, exports, judge_items=judge_items, echo=echo)
    before = run.one(baseline) if baseline is not None else None
    after = run.one(model)  # the baseline's model is gone by now: one model in memory at a time
    result = after.result
    if before is not None and exports:
        labels = tuple("export" if p in exports else "baseline" if p == baseline else "model" for p in (baseline, model))
        echo(before_after_table(before.result, result, labels=labels))
        result["agreement"] = agreement(before.result, result)
        echo(format_agreement(result["agreement"], (before.result["seconds_per_item"], result["seconds_per_item"])))
    else:
        echo(before_after_table(before.result, result) if before is not None else format_result(result))
    if judge_backend is not None:
        run.judge(judge_backend, before, after)
    if out is not None:
        write_predictions(result, Path(out))
        echo(f"predictions -> {out}")
    if before is not None:
        result["baseline"] = before.result
    return result


def judge_setup(judge: str | None, judge_model: str | None, allow_remote: bool, data: Path, limit: int | None) -> tuple[Any, list | None]:
    """(judge backend, items it judges), or (None, None) without --judge; KitError before any model
    loads for a remote judge without `allow_remote` or a bad context / category line."""
    if judge is None:
        if judge_model is not None:
            raise KitError("--judge-model needs --judge")
        return None, None
    return resolve_judge(judge, judge_model, allow_remote), load_judge_items(data, None, limit)


@dataclass
class Evaluated:
    """One folder's VQA result and, for the judge, its free-form answers and the notes its report carries."""

    path: Path
    result: dict[str, Any]
    answers: list[str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Asking:
    """How every folder of one `kit eval` is asked (checked when made)."""

    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 32
    metric: str = "llava-med"
    judge_answer_tokens: int = 128

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise KitError(f"--limit must be at least 1 (got {self.limit})")
        check_metric(self.metric)


@dataclass(frozen=True)
class EvalRun:
    """The questions and settings every folder of one `kit eval` is asked with."""

    data: Path
    ask: Asking
    exports: dict[Path, ExportFolder]
    judge_items: list | None
    echo: Callable[[str], None]

    def one(self, path: Path) -> Evaluated:
        """One load of the folder for the VQA scores and the judge's answers both."""
        ask = self.ask
        asked = dict(batch_size=ask.batch_size, max_new_tokens=ask.max_new_tokens, echo=self.echo, metric=ask.metric)
        text_only = any(f.mmproj is None for f in self.exports.values())
        if path in self.exports:
            answerer = GgufAnswerer(self.exports[path])
            try:
                return Evaluated(path, evaluate(Path(path), self.data, ask.limit, answerer=answerer, text_only=text_only, **asked))
            finally:
                answerer.close()
        if text_only:
            return Evaluated(path, evaluate(Path(path), self.data, ask.limit, text_only=True, **asked))
        loaded = load_for_inference(Path(path))
        result = evaluate(Path(path), self.data, ask.limit, loaded=loaded, **asked)
        if self.judge_items is None:
            return Evaluated(path, result)
        self.echo(f"{path}: answering {len(self.judge_items)} questions freely (up to {ask.judge_answer_tokens} tokens) for the judge")
        answers = free_answers(loaded, self.judge_items, batch_size=ask.batch_size, max_new_tokens=ask.judge_answer_tokens)
        return Evaluated(path, result, answers, notes=model_notes(loaded))

    def judge(self, backend, before: Evaluated | None, after: Evaluated) -> None:
        """Judge both folders' answers; the results go under "judged", each prediction its row."""
        self.echo(f"judge: {backend.describe()}")
        for one in (before, after):
            if one is not None:
                one.result["judged"] = judge_run(backend, self.judge_items, one.answers, model=str(one.path), data=self.data,
                                                 notes=one.notes)
        self.echo(compare_judged(before.result["judged"], after.result["judged"]) if before is not None
                  else format_judged(after.result["judged"]))
        for pred, row in zip(after.result["predictions"], after.result["judged"]["predictions"]):
            pred["judged"] = {k: v for k, v in row.items() if k not in ("id", "question", "answer")}
