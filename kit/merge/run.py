"""What `kit merge` does: one adapter into its base (kit.merge.single), or several combined (kit.merge.multi)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.merge.multi import CombineOptions, merge_adapters
from kit.merge.single import merge
from kit.merge.verify import DEFAULT_TOLERANCE


def parse_weights(values: list[str] | None) -> list[float] | None:
    """`--weights 0.6,0.4` and/or repeated `--weights 0.6 --weights 0.4` as floats."""
    if not values:
        return None
    out = []
    for part in (p.strip() for v in values for p in v.split(",")):
        try:
            out.append(float(part))
        except ValueError:
            raise KitError(f"--weights: '{part}' is not a number; give e.g. --weights 0.6,0.4") from None
    return out


def run(adapters: list[Path], out: Path, *, weights: list[str] | None = None, tolerance: float | None = None, force: bool = False,
        echo=print, **choices: Any) -> Path:
    """What `kit merge` does: one adapter into its base, or several combined (kit.merge.multi) as
    `choices` (kit.merge.multi.CombineOptions' fields) say."""
    opts = CombineOptions(tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance, **choices)
    parsed = parse_weights(weights)
    if len(adapters) == 1:
        if parsed is not None or opts.method != "linear" or opts.rank is not None or opts.as_adapter:
            raise KitError("--weights, --method, --rank and --as-adapter combine several adapters; give two or more adapter folders")
        return merge(adapters[0], out, base_precision=opts.base_precision, tolerance=opts.tolerance, force=force, echo=echo)
    return merge_adapters(adapters, out, parsed, options=opts, force=force, echo=echo)
