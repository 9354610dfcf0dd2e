"""`kit data check`: everything a run would reject or silently lose, before the run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.base.folder import Base
from kit.base.memory import GIB, estimate, model_parts, parse_gpu
from kit.core.errors import KitError
from kit.data.reviewed import is_generated_folder
from kit.core.recipes import Recipe
from kit.core.strategies import STRATEGIES, STRATEGY_CONFIG, check_strategy
from kit.data.vqa import load_items
from kit.ingest.sources import from_manifest
from kit.ingest.split import held_out_groups, image_group, sample_folder
from kit.train.plan import plan_run, resolve_base
from kit.train.run import plan_data


def length_histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    if not lengths:
        return []
    arr = np.asarray(lengths)
    edges = np.linspace(0, max(max_length, int(arr.max())), bins + 1).astype(int)
    counts, _ = np.histogram(arr, bins=edges)
    top = max(counts.max(), 1)
    return [f"{lo:6d}-{hi:<6d} {'#' * int(round(width * c / top)):<{width}} {c}" for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


@dataclass(frozen=True)
class GpuPlan:
    """What `kit data check` estimates memory for: `gpus` cards of `gpu` (e.g. 24GB) under `strategy`."""

    gpus: int = 1
    strategy: str = STRATEGIES[0]
    gpu: str | None = None

    def __post_init__(self):
        check_strategy(self.strategy)  # before the data checks, not after them


def _memory_report(recipe: Recipe, base: Base, tokens: int, what: str, echo, memory: GpuPlan) -> None:
    parts = model_parts(base)
    est = estimate(recipe, base, tokens, gpus=memory.gpus, strategy=memory.strategy, parts=parts)
    spread = f", {memory.strategy} over {memory.gpus} GPUs" if memory.gpus > 1 else ""
    echo(f"GPU memory for {recipe.name} on this base (quantization {recipe.quantization}, {tokens} tokens per sample = {what}{spread}):")
    for line in est.lines():
        echo("  " + line)
    if not memory.gpu:
        return
    card = parse_gpu(memory.gpu)
    verdict = "fits" if est.total <= card else "does NOT fit: lower train.batch_size, enable gradient checkpointing or use quantization=nf4"
    echo(f"  on a {memory.gpu} card: {verdict}")
    if memory.gpus > 1:
        echo(f"  per GPU on {memory.gpus} x {memory.gpu}, by strategy (launch with configs/accelerate/<config>):")
        for name in STRATEGIES:
            try:
                total = estimate(recipe, base, tokens, gpus=memory.gpus, strategy=name, parts=parts).total
            except KitError as e:
                echo(f"    {name:6s} -          {e}")
                continue
            fits = "fits" if total <= card else "does not fit"
            echo(f"    {name:6s} {total / GIB:7.2f} GiB  {fits:12s} {STRATEGY_CONFIG[name]}")


def _manifest_folder(recipe: Recipe, data: str | None):
    """The manifest folder `kit adapt` would read (--data FOLDER, or an adapt recipe's sample set), else None."""
    if data is not None:
        path = Path(data)
        if path.is_dir() and is_generated_folder(path):
            return None  # a kit generate folder: checked as the data its review says trains
        if path.is_dir():
            if not (path / "manifest.jsonl").is_file():
                raise KitError(f"--data {path}: a data folder needs a manifest.jsonl (see private_data/README.md), a kit generate "
                               "folder (data.json), or pass a LLaVA .json file")
            return path
        return None
    if recipe.stage == "adapt" and recipe.data.sample and not recipe.data.path:
        folder = sample_folder(recipe.data.sample)
        if not (folder / "manifest.jsonl").is_file():
            raise KitError(f"the '{recipe.data.sample}' sample set is not in {folder} yet; write it with `kit data sample {recipe.data.sample} --out {folder}` or pass --data")
        return folder
    return None


def check_manifest(recipe: Recipe, folder, echo=print):
    """Report on a manifest folder (records, images, held-out split, eval questions).

    Returns the training file an earlier `kit adapt` generated from it, or None. Raises KitError
    (manifest.jsonl:LINE or the eval file's FILE:LINE) for anything `kit adapt` would stop on.
    """
    records = from_manifest(folder)  # checks every line and opens every image
    groups = {image_group(r.id) for r in records}
    held = held_out_groups(groups, recipe.eval.held_out if recipe.eval else 0.0)
    kinds = Counter(
        "findings" if r.findings else "captions" if r.captions else "boxes only" for r in records
    )
    echo(f"data:     {folder}/manifest.jsonl: {len(records)} images ({len(groups)} distinct, counting augmented copies once); "
         + ", ".join(f"{n} with {k}" for k, n in sorted(kinds.items())))
    echo(f"split:    {len(groups) - len(held)} images train, {len(held)} held out for evaluation")
    if recipe.eval and (folder / recipe.eval.file).is_file():
        items = load_items(folder / recipe.eval.file, image_folder=folder)
        held_images = {str(r.image) for r in records if image_group(r.id) in held}
        on_held = sum(str(it.image.relative_to(folder.resolve())) in held_images for it in items)
        echo(f"eval:     {recipe.eval.file}: {len(items)} questions, {on_held} about held-out images")
    elif recipe.eval:
        echo(f"eval:     no {recipe.eval.file} in {folder}: kit adapt will train without a before/after table")
    made = "pairs.json" if recipe.train.objective == "dpo" else "train.json"
    generated = folder / ".kit" / recipe.name / made
    if not generated.is_file():
        what = "pairs: not made yet (`kit adapt` makes them" if made == "pairs.json" else "conversations: not generated yet (`kit adapt` generates them"
        echo(f"{what}, then checks token lengths before training)")
        return None
    return generated


def check(recipe: Recipe, base: str | None, data: str | None, echo=print, memory: GpuPlan | None = None) -> bool:
    """Print a pre-flight report; True when a run would start without errors.

    Raises KitError for problems that stop everything (missing file, broken JSON, bad base).
    """
    memory = memory or GpuPlan()
    folder = _manifest_folder(recipe, data)
    if folder is not None:
        generated = check_manifest(recipe, folder, echo)
        if generated is None:
            _memory_report(recipe, resolve_base(recipe, base), recipe.data.max_length, what="max_length: conversations not generated yet", echo=echo, memory=memory)
            return True
        echo(f"made by an earlier `kit adapt`: checking {generated}")
        data = str(generated)
    plan = plan_run(recipe, base, data, out=None, resume=False)  # nothing is written
    if recipe.train.objective == "dpo":
        return _check_pairs(plan, echo, memory)
    _, dataset, report = plan_data(plan, on_bad_sample="skip")
    n_img = sum(1 for it in dataset.items if it.images)
    n_images = sum(len(it.images) for it in dataset.items)
    several = f", {n_images} images in all" if n_images != n_img else ""
    echo(f"data:     {plan.data} ({report.total} samples; {n_img} with images{several}, {len(dataset) - n_img} text-only)")
    if report.review is not None:
        echo(f"          {report.review.line()}")
    echo(f"base:     {plan.base} ({plan.base.family.label}; one image = up to {report.image_tokens} tokens, "
         f"{report.image_total} image tokens in all)")
    echo(f"template: {recipe.data.template}, max_length {recipe.data.max_length}")
    if report.from_prompts:
        echo(f"note: this model's chat template writes a finished assistant turn differently from its generation prompt; "
             f"{report.from_prompts} samples are built from the generation-prompt renders (prompt, answer, end marker, "
             "turn by turn), as inference shows them")
    lengths = report.lengths
    if lengths:
        arr = np.asarray(lengths)
        echo(f"tokens per sample (image tokens included): min {arr.min()}, median {int(np.median(arr))}, p95 {int(np.percentile(arr, 95))}, max {arr.max()}")
        for line in length_histogram(lengths, recipe.data.max_length):
            echo("  " + line)
    echo(f"text truncated to max_length: {report.truncated_text}")
    if lengths:
        _memory_report(recipe, plan.base, int(np.percentile(np.asarray(lengths), 95)), what="p95 length", echo=echo, memory=memory)
    return _problems(report, recipe, "samples", echo=echo)


def _check_pairs(plan, echo, memory: GpuPlan) -> bool:
    """The pre-flight report of a preference run: usable pairs, edits, lengths of prompt + each
    answer, image tokens, what max_length cuts."""
    recipe = plan.recipe
    _, dataset, report = plan_data(plan, on_bad_sample="skip")
    echo(f"pairs:    {report.summary()} ({plan.data})")
    if report.edits:
        echo("edits:    " + ", ".join(f"{n} {k}" for k, n in sorted(report.edits.items(), key=lambda kv: -kv[1])))
    echo(f"base:     {plan.base} ({plan.base.family.label}; one image = up to {report.image_tokens} tokens)")
    echo(f"template: {recipe.data.template}, max_length {recipe.data.max_length}; preference: {recipe.preference.loss_type}, "
         f"beta {recipe.preference.beta}, sft_weight {recipe.preference.sft_weight}")
    for side in ("chosen", "rejected"):
        arr = np.asarray(report.lengths[side])
        if len(arr):
            echo(f"tokens, prompt + {side} (image tokens included): min {arr.min()}, median {int(np.median(arr))}, "
                 f"p95 {int(np.percentile(arr, 95))}, max {arr.max()}")
    lengths = report.lengths["chosen"] + report.lengths["rejected"]
    if lengths:
        _memory_report(recipe, plan.base, int(np.percentile(np.asarray(lengths), 95)), what="p95 length", echo=echo, memory=memory)
    return _problems(report, recipe, "pairs", echo=echo)


def _problems(report, recipe, what: str, echo) -> bool:
    """List the problems (up to 50); whether the run can go on (none, or the recipe skips them)."""
    if report.problems:
        echo(f"problems: {len(report.problems)} {what} (the run {'stops' if recipe.data.on_bad_sample == 'error' else 'skips them'}):")
        for line in report.problem_lines(50):
            echo("  " + line)
    else:
        echo("problems: none")
    return not report.problems or recipe.data.on_bad_sample == "skip"
