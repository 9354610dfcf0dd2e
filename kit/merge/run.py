"""What `kit merge` does: one adapter into its base (kit.merge.single), or several combined (kit.merge.multi)."""

from __future__ import annotations

from pathlib import Path

from kit.core import options
from kit.core.errors import KitError
from kit.merge.multi import merge_adapters
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


def run(adapters: list[Path], out: Path, *, weights: list[str] | None = None, method: str = options.MERGE_METHODS[0], rank: int | None = None,
        as_adapter: bool = False, density: float = options.MERGE_DENSITY, seed: int = 0, base_precision: str = options.MERGE_PRECISIONS[0],
        tolerance: float | None = None, force: bool = False, echo=print) -> Path:
    """What `kit merge` does: one adapter into its base, or several combined (kit.merge.multi)."""
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    parsed = parse_weights(weights)
    if len(adapters) == 1:
        if parsed is not None or method != "linear" or rank is not None or as_adapter:
            raise KitError("--weights, --method, --rank and --as-adapter combine several adapters; give two or more adapter folders")
        return merge(adapters[0], out, base_precision=base_precision, tolerance=tol, force=force, echo=echo)
    return merge_adapters(adapters, out, parsed, method=method, rank=rank, as_adapter=as_adapter, density=density, seed=seed,
                          base_precision=base_precision, tolerance=tol, force=force, echo=echo)
