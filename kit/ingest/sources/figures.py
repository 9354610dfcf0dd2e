"""Figure captions with inline mentions (LLaVA-Med style)."""

from __future__ import annotations

from pathlib import Path

from kit.core.errors import KitError
from kit.ingest.records import Record
from kit.ingest.sources.common import text_list
from kit.ingest.sources.manifest import checked_lines


_FIGURE_FIELDS = {"id", "image", "caption", "mentions"}


def from_figures(file: Path, images_dir: Path, private: bool = True) -> list[Record]:
    """Records from LLaVA-Med-style figure captions: a JSONL file, one figure per line::

        {"id": "PMC123_fig2", "image": "PMC123/fig2.jpg", "caption": "CT of the chest showing ...",
         "mentions": ["As shown in Figure 2, the nodule ..."]}

    `image` is relative to `images_dir`; `id` defaults as in `from_manifest`; `mentions` (inline
    references to the figure from the paper text) is optional and becomes the record's findings.
    `private` is True when a path component of the file or `images_dir` is `private_data`.

    Raises KitError naming `FILE:LINE` for: a missing or empty file, invalid JSON, an unknown field,
    a missing or empty caption, malformed mentions, a missing image, a path outside `images_dir`, a
    duplicate id; and for a missing `images_dir`.
    """
    file, images_dir = Path(file), Path(images_dir)
    if not file.is_file():
        raise KitError(f"figure-caption file {file} does not exist")
    if not images_dir.is_dir():
        raise KitError(f"figure images folder {images_dir} does not exist")
    records: list[Record] = []
    for where, lineno, obj, rel, _, rid in checked_lines(file, "figure-caption file", _FIGURE_FIELDS, root=images_dir):
        caption = obj.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise KitError(f"{where}: 'caption' must be a non-empty string")
        mentions = text_list(obj["mentions"], "mentions", where) if "mentions" in obj else []
        records.append(
            Record(
                id=rid, image=rel, root=images_dir, captions=[caption.strip()], findings=mentions,
                private=private, source=f"{file}:{lineno}",
            )
        )
    return records
