"""`kit base build`: from parts or a preset, written atomically (no half-built folder on failure)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kit.core.errors import KitError


def build(out: Path, vision: Path | None, llm: Path | None, preset: str | None, projector: str = "mlp2x_gelu",
          vision_layer: int = -2, image_aspect: str = "pad", aligned: bool = True) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KitError(f"--out {out} already exists and is not empty; choose a new folder")
    if preset is None and (vision is None or llm is None):
        raise KitError("give --vision DIR and --llm DIR, or --preset mini")
    if preset is not None and preset != "mini":
        raise KitError(f"--preset {preset}: the only preset is 'mini'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if preset == "mini":
            from kit.base.mini import ALIGNED_PROJECTOR, build_mini

            if aligned and not ALIGNED_PROJECTOR.is_file():
                raise KitError(f"{ALIGNED_PROJECTOR} is missing; reproduce it with `kit base align-mini` or pass --no-aligned")
            build_mini(tmp, ALIGNED_PROJECTOR if aligned else None)
        else:
            from kit.base.parts import build_from_parts

            build_from_parts(vision, llm, tmp, projector, vision_layer, image_aspect)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
