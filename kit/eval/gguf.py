"""Evaluating what is deployed: a `kit export` folder answers the evaluation items through
llama.cpp (kit.infer.llama_cpp), greedy, in the prompt format its card records, and is scored by
the same metrics and intervals as a transformers model. Against a baseline (the HF model or
adapter it came from) the comparison adds agreement: how often the two greedy answers are the
same text, and where the first few that differ part ways, token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.data.images import open_rgb
from kit.data.vqa import Item, ask
from kit.eval.vqa import before_after_table, changes, evaluate
from kit.infer.llama_cpp import ExportFolder, LlamaCppModel


def is_export(path: Path) -> bool:
    """Whether `path` is a `kit export` folder (its card says so)."""
    card = Card.read(Path(path)) if Path(path).is_dir() else None
    return card is not None and card.kind == "export"


class GgufAnswerer:
    """An export folder answering through llama.cpp, one item at a time."""

    def __init__(self, folder: ExportFolder):
        self.folder = folder
        self.runtime = LlamaCppModel(folder)
        export = folder.card.model_extra.get("export", {})
        self.kind = f"GGUF export, {export.get('quant', '?')}, llama.cpp"
        self.notes = [] if self.runtime.sees_images else [
            "text-only export (no mmproj): only the questions without an image are evaluated"]

    def answers(self, items: list[Item], budget: int, style: str) -> list[tuple[str, list[int]]]:
        return [self.runtime.answer(ask(it.question, it.answer, it.answer_type, style=style),
                                    open_rgb(it.image) if it.image is not None else None, budget) for it in items]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.runtime.llm.detokenize([t]).decode("utf-8", errors="replace") for t in ids]

    def close(self) -> None:
        self.runtime.close()


@dataclass
class Difference:
    """Where two greedy answers to one item part ways."""

    id: str
    position: int  # the first answer token that differs
    baseline: str  # that token, as text (or "<end>" where one answer ended)
    export: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "position": self.position, "baseline": self.baseline, "export": self.export}


def agreement(baseline: dict[str, Any], export: dict[str, Any], shown: int = 3) -> dict[str, Any]:
    """The share of items whose answers are the same text, and the first `shown` differences."""
    same, diffs = 0, []
    pairs = zip(baseline["predictions"], export["predictions"], baseline["answer_tokens"], export["answer_tokens"])
    for b, e, bt, et in pairs:
        if b["prediction"] == e["prediction"]:
            same += 1
            continue
        if len(diffs) < shown:
            at = next((j for j, (x, y) in enumerate(zip(bt["ids"], et["ids"])) if x != y), min(len(bt["ids"]), len(et["ids"])))
            diffs.append(Difference(b["id"], at, _piece(bt, at), export=_piece(et, at)))
    n = len(export["predictions"])
    return {"identical": same / n if n else None, "n": n, "differences": [d.to_json() for d in diffs]}


def _piece(tokens: dict[str, list], at: int) -> str:
    return repr(tokens["pieces"][at]) if at < len(tokens["pieces"]) else "<end>"


def format_agreement(agree: dict[str, Any], seconds: tuple[float, float] | None = None) -> str:
    rows = [f"answers identical to the baseline's: {agree['identical'] * 100:.1f}% of {agree['n']}"
            if agree["identical"] is not None else "no items to compare"]
    for d in agree["differences"]:
        rows.append(f"  {d['id']}: first differs at answer token {d['position']}: baseline {d['baseline']}, export {d['export']}")
    if seconds:
        rows.append(f"time per item: baseline {seconds[0]:.2f} s, export {seconds[1]:.2f} s")
    return "\n".join(rows)



def compare_export(hf_model: Path, folder: ExportFolder, data: Path, max_drop: float | None = None,
                   max_new_tokens: int = 32, echo=print) -> dict[str, Any]:
    """`kit export --eval`: the HF model the export was written from, then its GGUF files in
    llama.cpp, on the same items (greedy, one at a time on both sides, so batching cannot make them
    differ). Returns what the card records. KitError when `max_drop` is set and the GGUF's overall
    score is lower by more than that many points with the paired 95% interval excluding zero."""
    text_only = folder.mmproj is None
    hf = evaluate(hf_model, data, batch_size=1, max_new_tokens=max_new_tokens, echo=echo, text_only=text_only)
    answerer = GgufAnswerer(folder)
    try:
        gguf = evaluate(folder.path, data, max_new_tokens=max_new_tokens, echo=echo, answerer=answerer, text_only=text_only)
    finally:
        answerer.close()
    echo(before_after_table(hf, gguf, labels=("HF", "GGUF")))
    agree = agreement(hf, gguf)
    echo(format_agreement(agree, (hf["seconds_per_item"], gguf["seconds_per_item"])))
    change = changes(hf, gguf)
    record = {
        "data": str(data), "max_new_tokens": max_new_tokens, "text_only": text_only, "metric": gguf["metric"],
        "hf": _summary(hf), "gguf": _summary(gguf), "change": change, "agreement": agree, "max_drop": max_drop,
    }
    overall = (change or {}).get("overall") or {}
    if max_drop is not None and overall.get("change") is not None and overall.get("ci") is not None:
        drop, (lo, hi) = -100 * overall["change"], overall["ci"]
        if drop > max_drop and hi < 0:
            raise KitError(f"the GGUF export scores {drop:.1f} points below the HF model on {data} (paired 95% interval "
                           f"[{100 * lo:+.1f}, {100 * hi:+.1f}]), more than --max-drop {max_drop:g}: nothing was written")
    return record


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("closed_accuracy", "closed_accuracy_ci", "open_recall", "open_recall_ci", "overall", "overall_ci", "n_closed",
            "n_open", "pope", "chair", "seconds_per_item", "kind")
    return {k: result[k] for k in keep if k in result}
