"""A folder with a `manifest.jsonl`: the layout users are told to use for their own data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.ingest.records import Box, Record
from kit.core.files import read_jsonl
from kit.data.images import ImageProblem, check_image, image_size
from kit.ingest.sources.common import BoxError, clean_texts, default_id, numbers, pixel_box, safe_relpath, text_list


MANIFEST_NAME = "manifest.jsonl"
_MANIFEST_FIELDS = {"id", "image", "captions", "caption", "boxes", "findings", "metadata", "private"}
_BOX_FIELDS = {"label", "bbox", "format"}
BOX_FORMATS = ("xyxy_pixels", "xyxy_norm", "xywh_pixels")


def _parse_box(raw: Any, size: tuple[int, int], where: str) -> Box:
    if not isinstance(raw, dict):
        raise KitError(f"{where}: each box must be an object {{\"label\", \"bbox\", \"format\"}}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _BOX_FIELDS)
    if unknown:
        raise KitError(f"{where}: unknown box field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_BOX_FIELDS))}")
    label = raw.get("label")
    if not isinstance(label, str) or not label.strip():
        raise KitError(f"{where}: a box needs a non-empty 'label' string")
    fmt = raw.get("format", "xyxy_pixels")
    if fmt not in BOX_FORMATS:
        raise KitError(f"{where}: box '{label}' has format {fmt!r}; use one of {', '.join(BOX_FORMATS)}")
    nums = numbers(raw.get("bbox"), 4)
    if nums is None:
        raise KitError(f"{where}: box '{label}' needs 'bbox' as four numbers, got {raw.get('bbox')!r}")
    width, height = size
    a, b, c, d = nums
    if fmt == "xyxy_norm":
        a, b, c, d = a * width, b * height, c * width, d * height
    elif fmt == "xywh_pixels":
        c, d = a + c, b + d
    try:
        return Box(label.strip(), pixel_box(a, b, c, y2=d, width=width, height=height))
    except BoxError as e:
        raise KitError(f"{where}: box '{label}' {nums} ({fmt}) {e}; check the coordinates and 'format'") from None


def from_manifest(folder: Path) -> list[Record]:
    """Records from a folder that holds images and a `manifest.jsonl` describing them.

    Layout::

        my_data/
          manifest.jsonl
          images/0001.png
          scans/knee/0002.jpg
          ...

    `manifest.jsonl` holds one JSON object per line (blank lines are ignored)::

        {"image": "images/0001.png",
         "captions": ["A chest X-ray, PA view."],
         "boxes": [{"label": "pacemaker", "bbox": [410, 220, 505, 330]}],
         "findings": "Left-sided pacemaker; lungs clear.",
         "metadata": {"modality": "X-ray", "view": "PA"}}

    Fields (any other field is an error, so typos are caught):

    - `image` (required): path relative to the folder; it may not be absolute or climb out with `..`.
    - `id`: unique string; default: the image path without its extension, `/` replaced by `_`
      (`scans/knee/0002.jpg` -> `scans_knee_0002`).
    - `captions`: list of strings, or `caption`: one string (not both).
    - `boxes`: list of `{"label": str, "bbox": [4 numbers], "format": ...}` where `format` is
      `xyxy_pixels` (default: x1, y1, x2, y2 in pixels), `xyxy_norm` (the same as fractions of
      width/height, 0..1) or `xywh_pixels` (x, y, width, height in pixels, COCO style). A box may
      overshoot the image by at most 1 pixel.
    - `findings`: string or list of strings: free text such as report findings.
    - `metadata`: object of short descriptive strings (modality, view, stain...). Never put names,
      ids, dates or other identifying data here: it is sent to the generator.
    - `private`: true/false; default true (a manifest describes the organisation's own data, which
      never goes to a remote generator without --allow-remote).

    Each line needs at least one of captions, findings or boxes.

    Raises KitError naming `manifest.jsonl:LINE` for: a missing or empty manifest, invalid JSON, an
    unknown field, a missing or unreadable image, a path outside the folder, a malformed box or one
    outside its image, a duplicate id, a line with nothing to describe the image.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise KitError(f"{manifest} does not exist; put a {MANIFEST_NAME} (one JSON object per image) in {folder}")
    return [_manifest_record(obj, rid=rid, rel=rel, size=size, where=where, root=folder, source=f"{manifest}:{lineno}")
            for where, lineno, obj, rel, size, rid in checked_lines(manifest, "manifest", _MANIFEST_FIELDS, root=folder)]


def _manifest_record(obj: dict[str, Any], *, rid: str, rel: str, size: tuple[int, int], where: str, root: Path, source: str) -> Record:
    """One manifest line (its image already checked) as a Record; KitError naming `where` otherwise."""
    if "caption" in obj and "captions" in obj:
        raise KitError(f"{where}: give either 'caption' or 'captions', not both")
    captions = text_list(obj["captions"], "captions", where) if "captions" in obj else []
    if "caption" in obj:
        if not isinstance(obj["caption"], str):
            raise KitError(f"{where}: 'caption' must be a string (use 'captions' for a list)")
        captions = clean_texts([obj["caption"]])
    findings = text_list(obj["findings"], "findings", where) if "findings" in obj else []
    raw_boxes = obj.get("boxes", [])
    if not isinstance(raw_boxes, list):
        raise KitError(f"{where}: 'boxes' must be a list of box objects")
    boxes = [_parse_box(b, size, where) for b in raw_boxes]
    metadata = _metadata(obj.get("metadata", {}), where)
    private = obj.get("private", True)
    if not isinstance(private, bool):
        raise KitError(f"{where}: 'private' must be true or false")
    if not (captions or findings or boxes):
        raise KitError(f"{where}: image '{rel}' has no captions, findings or boxes; a generator needs at least one of them")
    return Record(id=rid, image=rel, root=root, captions=captions, boxes=boxes, findings=findings, metadata=metadata,
                  private=private, source=source)


def _checked_image(value: Any, folder: Path, where: str) -> tuple[str, tuple[int, int]]:
    if value is None:
        raise KitError(f"{where}: missing 'image' (a path relative to {folder})")
    rel = safe_relpath(value)
    if rel is None:
        raise KitError(f"{where}: image path {value!r} must be relative to {folder} and stay inside it (no absolute paths, no '..')")
    path = folder / rel
    if not path.is_file():
        raise KitError(f"{where}: image file {path} does not exist")
    try:
        check_image(path)  # every pixel: a truncated file is found here, not in training
        size = image_size(path)
    except ImageProblem as e:
        raise KitError(f"{where}: {e}") from None
    return rel, size


def checked_lines(file: Path, what: str, allowed: set[str], root: Path) -> Iterator[tuple[str, int, dict[str, Any], str, tuple[int, int], str]]:
    """(where, line number, object, image path relative to `root`, image size, record id) per line of
    a JSONL file describing images. KitError naming `FILE:LINE` for an unknown field, a bad image
    path or image, or a duplicate id."""
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(file, what):
        where = f"{file.name}:{lineno}"
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise KitError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))} ({file})")
        rel, size = _checked_image(obj.get("image"), root, where)
        yield where, lineno, obj, rel, size, _record_id(obj, rel, where, seen=seen, lineno=lineno)


def _record_id(obj: dict[str, Any], rel: str, where: str, seen: dict[str, int], lineno: int) -> str:
    rid = obj.get("id", default_id(rel))
    if not isinstance(rid, str) or not rid.strip():
        raise KitError(f"{where}: 'id' must be a non-empty string")
    rid = rid.strip()
    if rid in seen:
        raise KitError(f"{where}: duplicate id '{rid}' (first on line {seen[rid]}); ids must be unique")
    seen[rid] = lineno
    return rid


def _metadata(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise KitError(f"{where}: 'metadata' must be an object of short strings")
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise KitError(f"{where}: metadata '{k}' must be a string or a number, not {type(v).__name__}")
        out[str(k)] = str(v)
    return out
