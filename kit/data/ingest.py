"""`kit data ingest`: stage-1 caption pairs from COCO, manifests, DICOM or figure captions."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kit.core.errors import KitError


def ingest(source: str, input: Path, out: Path, images: Path | None = None, instances: Path | None = None, seed: int = 0) -> int:
    """Read the source fully, then write `out` (+ its data card). Raises KitError; writes nothing on error."""
    from kit.ingest.sources import load_records, write_caption_pairs

    out = Path(out)
    if out.suffix != ".json":
        raise KitError(f"--out {out}: give a .json file path")
    if out.exists():
        raise KitError(f"--out {out} already exists; choose another file")
    out.parent.mkdir(parents=True, exist_ok=True)
    # DICOM pixels are rendered next to the output; a failed read leaves no half-filled folder.
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".ingest."))
    try:
        records = load_records(source, input, staging, images, instances)
        if not any(r.captions for r in records):
            raise KitError(f"{input}: no record has a caption to pair with its image")
        if source == "dicom":
            target = out.parent / "images"
            target.mkdir(exist_ok=True)
            for f in (staging / "images").glob("*.png"):
                f.replace(target / f.name)
            for r in records:
                r.root = out.parent
        return write_caption_pairs(records, out, seed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
