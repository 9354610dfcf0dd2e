"""`kit eval`: LLaVA-Med-style VQA scores of a model or adapter folder, optionally against a baseline.

Importing this module costs nothing (no torch): everything heavy is imported inside the command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kit.errors import KitError


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
) -> dict[str, Any]:
    """Evaluate `model` (a model or adapter folder) on `data` (JSONL), print a metric table and,
    with `out`, write the predictions as JSONL. With `baseline`, evaluate it on the same questions
    first and print a base | adapted | change table; its result is returned under "baseline".

    Raises KitError for a bad file (file:line), a missing image, or a folder kit cannot load.
    """
    from kit.evaluate import compare, evaluate, format_result, write_predictions

    if limit is not None and limit < 1:
        raise KitError(f"--limit must be at least 1 (got {limit})")
    if out is not None and Path(out).is_dir():
        raise KitError(f"--out {out} is a folder; give a .jsonl file path for the predictions")
    before = None
    if baseline is not None:
        before = evaluate(Path(baseline), Path(data), limit, batch_size, max_new_tokens, echo=echo)
    result = evaluate(Path(model), Path(data), limit, batch_size, max_new_tokens, echo=echo)
    echo(compare(before, result) if before is not None else format_result(result))
    if out is not None:
        write_predictions(result, Path(out))
        echo(f"predictions -> {out}")
    if before is not None:
        result["baseline"] = before
    return result
