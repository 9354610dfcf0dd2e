"""`kit data check`: everything a run would reject or silently lose, before the run."""

from __future__ import annotations


import numpy as np

from kit.recipes import Recipe


def length_histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    if not lengths:
        return []
    arr = np.asarray(lengths)
    edges = np.linspace(0, max(max_length, int(arr.max())), bins + 1).astype(int)
    counts, _ = np.histogram(arr, bins=edges)
    top = max(counts.max(), 1)
    return [f"{lo:6d}-{hi:<6d} {'#' * int(round(width * c / top)):<{width}} {c}" for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def check(recipe: Recipe, base: str | None, data: str | None, echo=print, gpu: str | None = None) -> bool:
    """Print a pre-flight report; True when a run would start without errors.

    Raises KitError for problems that stop everything (missing file, broken JSON, bad base).
    """
    from kit.data.dataset import build_dataset
    from kit.models import image_aspect_of, load_processor
    from kit.train import plan_run

    plan = plan_run(recipe, base, data, out=None, resume=False)  # nothing is written
    processor = load_processor(plan.base)
    dataset, report = build_dataset(
        plan.data, processor, recipe.data.template, recipe.data.max_length,
        recipe.data.image_aspect or image_aspect_of(plan.base), image_folder=plan.image_folder,
        on_bad_sample="skip", system=recipe.data.system_prompt,
    )
    n_img = sum(1 for it in dataset.items if it.image is not None)
    echo(f"data:     {plan.data} ({report.total} samples; {n_img} with an image, {len(dataset) - n_img} text-only)")
    echo(f"base:     {plan.base} (one image = {report.image_tokens} tokens)")
    echo(f"template: {recipe.data.template}, max_length {recipe.data.max_length}")
    lengths = report.lengths
    if lengths:
        arr = np.asarray(lengths)
        echo(f"tokens per sample (image tokens included): min {arr.min()}, median {int(np.median(arr))}, p95 {int(np.percentile(arr, 95))}, max {arr.max()}")
        for line in length_histogram(lengths, recipe.data.max_length):
            echo("  " + line)
    echo(f"text truncated to max_length: {report.truncated_text}")
    if lengths:
        from kit.memory import estimate, parse_gpu

        tokens = int(np.percentile(np.asarray(lengths), 95))
        est = estimate(recipe, plan.base, tokens)
        echo(f"GPU memory for {recipe.name} on this base (quantization {recipe.quantization}, p95 length):")
        for line in est.lines():
            echo("  " + line)
        if gpu:
            card = parse_gpu(gpu)
            verdict = "fits" if est.total <= card else "does NOT fit: lower train.batch_size, enable gradient checkpointing or use quantization=nf4"
            echo(f"  on a {gpu} card: {verdict}")
    if report.problems:
        echo(f"problems: {len(report.problems)} samples (the run {'stops' if recipe.data.on_bad_sample == 'error' else 'skips them'}):")
        for line in report.problem_lines(50):
            echo("  " + line)
    else:
        echo("problems: none")
    return not report.problems or recipe.data.on_bad_sample == "skip"
