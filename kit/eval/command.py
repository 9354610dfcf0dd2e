"""`kit eval`: LLaVA-Med-style VQA scores of a model or adapter folder, or of a `kit export`
folder through llama.cpp (kit.eval.gguf), optionally against a baseline, optionally judged."""

from __future__ import annotations

from collections.abc import Callable
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


def eval_command(
    model: Path,
    data: Path,
    limit: int | None = None,
    out: Path | None = None,
    echo: Callable[[str], None] = print,
    *,
    baseline: Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    judge: str | None = None,
    judge_model: str | None = None,
    allow_remote: bool = False,
    judge_answer_tokens: int = 128,
    metric: str = "llava-med",
) -> dict[str, Any]:
    """Evaluate `model` (a model or adapter folder) on `data` (JSONL) with `metric` (llava-med |
    strict, kit.eval.metrics), print a metric table (95% intervals) and,
    with `out`, write the predictions as JSONL. With `baseline`, evaluate it on the same questions
    first and print a base | adapted | change table; its result is returned under "baseline".

    With `judge` (openai | an OpenAI-compatible URL | hf:PATH, see kit.eval.judge), also answer freely
    and have the judge score the answers against the references (LLaVA-Bench's relative score);
    the judged result is returned under "judged" (and under "baseline"/"judged"), and each written
    prediction carries its judged answer, scores and the judge's replies under "judged".

    Raises KitError for a bad file (file:line), a missing image, or a folder kit cannot load; and,
    before anything is loaded or sent, for a non-loopback judge without `allow_remote`.
    """
    if limit is not None and limit < 1:
        raise KitError(f"--limit must be at least 1 (got {limit})")
    check_metric(metric)
    if out is not None and Path(out).is_dir():
        raise KitError(f"--out {out} is a folder; give a .jsonl file path for the predictions")
    judge_backend = judge_items = None
    if judge is not None:
        judge_backend = resolve_judge(judge, judge_model, allow_remote)
        judge_items = load_judge_items(Path(data), None, limit)  # a bad context/category line fails before any model loads
    elif judge_model is not None:
        raise KitError("--judge-model needs --judge")

    exports = {p: ExportFolder.read(Path(p)) for p in (model, baseline) if p is not None and is_export(Path(p))}
    if exports and judge is not None:
        raise KitError("--judge evaluates a transformers model or adapter; judge the folder the export came from")
    if exports:
        require_llama_cpp("kit eval on an export folder")
    text_only = any(f.mmproj is None for f in exports.values())

    def run(path: Path) -> tuple[dict[str, Any], list[str] | None]:
        """VQA result and, for the judge, free-form answers: one load of the model for both."""
        if path in exports:
            answerer = GgufAnswerer(exports[path])
            try:
                return evaluate(Path(path), Path(data), limit, batch_size=batch_size, max_new_tokens=max_new_tokens, echo=echo, metric=metric,
                                answerer=answerer, text_only=text_only), None
            finally:
                answerer.close()
        if text_only:
            return evaluate(Path(path), Path(data), limit, batch_size=batch_size, max_new_tokens=max_new_tokens, echo=echo, metric=metric,
                            text_only=True), None
        loaded = load_for_inference(Path(path))
        result = evaluate(Path(path), Path(data), limit, batch_size=batch_size, max_new_tokens=max_new_tokens, echo=echo, loaded=loaded, metric=metric)
        answers = None
        if judge_items is not None:
            echo(f"{path}: answering {len(judge_items)} questions freely (up to {judge_answer_tokens} tokens) for the judge")
            answers = free_answers(loaded, judge_items, batch_size=batch_size, max_new_tokens=judge_answer_tokens)
            result["judge_notes"] = model_notes(loaded)
        return result, answers

    before = before_answers = None
    if baseline is not None:
        before, before_answers = run(baseline)
    result, answers = run(model)  # the baseline's model is gone by now: one model in memory at a time
    if before is not None and exports:
        labels = tuple("export" if p in exports else "baseline" if p == baseline else "model" for p in (baseline, model))
        echo(before_after_table(before, result, labels=labels))
        result["agreement"] = agreement(before, result)
        echo(format_agreement(result["agreement"], (before["seconds_per_item"], result["seconds_per_item"])))
    else:
        echo(before_after_table(before, result) if before is not None else format_result(result))
    if judge_backend is not None:
        echo(f"judge: {judge_backend.describe()}")
        for res, ans, path in ((before, before_answers, baseline), (result, answers, model)):
            if res is not None:
                res["judged"] = judge_run(judge_backend, judge_items, ans, model=str(path), data=Path(data), notes=res.pop("judge_notes"))
        echo(compare_judged(before["judged"], result["judged"]) if before is not None else format_judged(result["judged"]))
        for pred, row in zip(result["predictions"], result["judged"]["predictions"]):
            pred["judged"] = {k: v for k, v in row.items() if k not in ("id", "question", "answer")}
    if out is not None:
        write_predictions(result, Path(out))
        echo(f"predictions -> {out}")
    if before is not None:
        result["baseline"] = before
    return result
