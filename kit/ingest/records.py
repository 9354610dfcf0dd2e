"""Records: what a text-only generator may know about an image (never the pixels).

Every source (COCO, a manifest folder, DICOM, figure captions) becomes a list of `Record`s; the
generator, the stage-1 caption writer and the privacy check read only these.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kit.core import options

TYPES = options.GENERATE_TYPES


@dataclass(frozen=True)
class Box:
    label: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2, normalised to 0..1 of width/height

    def line(self) -> str:
        """LLaVA's symbolic form: `label: [x1, y1, x2, y2]` with three decimals."""
        return f"{self.label}: [{', '.join(f'{v:.3f}' for v in self.bbox)}]"


@dataclass
class Record:
    id: str  # stable across runs: derived from the source, never from order or time
    image: str  # path relative to `root`
    root: Path  # the image folder
    captions: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # free text: report findings, inline figure mentions
    metadata: dict[str, str] = field(default_factory=dict)  # safe descriptive fields only (modality, body part); never PHI
    private: bool = False  # private sources never go to a non-loopback backend without --allow-remote
    source: str = ""  # "file#key", for messages

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["root"] = str(self.root)
        d["boxes"] = [{"label": b.label, "bbox": list(b.bbox)} for b in self.boxes]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Path) -> Record:
        """A record as `to_json` (or kit generate's sources.jsonl) wrote it, its image under `root`.
        Raises KeyError, TypeError or ValueError for what is not one."""
        boxes = [Box(str(b["label"]), tuple(float(v) for v in b["bbox"])) for b in d.get("boxes") or []]
        return cls(id=str(d["id"]), image=str(d.get("image") or ""), root=Path(root),
                   captions=[str(c) for c in d.get("captions") or []], boxes=boxes,
                   findings=[str(f) for f in d.get("findings") or []],
                   metadata={str(k): str(v) for k, v in (d.get("metadata") or {}).items()},
                   private=bool(d.get("private", False)), source=str(d.get("source") or ""))


def image_folder_for(records: list[Record], out_dir: Path) -> Path:
    """The folder a data file's image paths are written relative to.

    The output folder when every image lies under it (kit's default image folder, so the file works
    without configuration); else the records' shared root; else the images' common ancestor.
    """
    files = [Path(os.path.abspath(Path(r.root) / r.image)) for r in records]
    out_abs = Path(os.path.abspath(out_dir))
    if all(f.is_relative_to(out_abs) for f in files):
        return out_abs
    roots = {Path(os.path.abspath(r.root)) for r in records}
    if len(roots) == 1:
        return roots.pop()
    return Path(os.path.commonpath([str(f.parent) for f in files]))
