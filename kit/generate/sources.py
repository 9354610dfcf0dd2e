"""Sources: turn COCO files, a manifest folder, DICOM folders and figure captions into `Record`s.

A record is all a text-only generator may learn about an image: captions, labelled boxes, free-text
findings and a few safe metadata fields. Nothing here hands pixels to a generator; DICOM pixels are
only converted to PNG so the *training* step can see them later.

Every problem a user can fix is raised as a one-line `KitError` that names the file and the
offending line or id, so a broken 100k-line file can be repaired without a debugger.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from kit import cards
from kit.errors import KitError
from kit.generate.records import Box, Record

PRIVATE_DIR_NAME = "private_data"
# A box may poke this far past the image edge (rounding in annotation tools) and is clamped.
_EDGE_TOLERANCE_PX = 1.0


# --------------------------------------------------------------------------- shared helpers


class _BoxError(ValueError):
    """A box problem without location; callers add file/line/id before raising KitError."""


def _under_private(*paths: Path | None) -> bool:
    for p in paths:
        if p is not None and PRIVATE_DIR_NAME in Path(os.path.abspath(p)).parts:
            return True
    return False


def _pixel_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel corners -> normalised corners with three decimals, after the edge check.

    Raises _BoxError when the box is inverted or lies outside the image by more than 1 px.
    """
    x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)  # numpy scalars would leak into JSON
    if any(not math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise _BoxError("has a non-finite coordinate")
    if x2 < x1 or y2 < y1:
        raise _BoxError(f"is inverted ([{x1:g}, {y1:g}, {x2:g}, {y2:g}] has x2 < x1 or y2 < y1)")
    tol = _EDGE_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise _BoxError(
            f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}] (pixels, x1 y1 x2 y2) lies outside the {width} x {height} image"
        )
    x1, x2 = (min(max(v, 0.0), width) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), height) for v in (y1, y2))
    return (round(x1 / width, 3), round(y1 / height, 3), round(x2 / width, 3), round(y2 / height, 3))


def _numbers(value: Any, n: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value]


def _clean_texts(values: Iterable[str]) -> list[str]:
    """Stripped, blank-free, first occurrence kept: five near-identical captions add nothing."""
    out: list[str] = []
    for v in values:
        v = v.strip()
        if v and v not in out:
            out.append(v)
    return out


def _safe_relpath(rel: Any) -> str | None:
    """A POSIX path that stays inside its folder, or None.

    The check is lexical on purpose: a symlinked images folder inside the data folder is fine,
    an absolute path or `..` is not (the data would stop being portable and could point anywhere).
    """
    if not isinstance(rel, str) or not rel.strip():
        return None
    rel = rel.strip().replace("\\", "/")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return None
    norm = posixpath.normpath(rel)
    if norm == "." or norm == ".." or norm.startswith("../"):
        return None
    return norm


def _one_line(e: BaseException) -> str:
    # library messages (pydicom's codec hints) span lines; KitError is printed as one
    return " ".join(str(e).split())


def _default_id(rel: str) -> str:
    return posixpath.splitext(rel)[0].replace("/", "_")


def _image_size(path: Path) -> tuple[int, int]:
    # Image.open reads only the header; the pixels are never decoded here.
    with Image.open(path) as im:
        return im.size


def _read_jsonl(file: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """Non-blank lines of a JSONL file as (line number, object). Raises KitError on bad lines."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KitError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start}); save the {what} as UTF-8") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KitError(f"{file.name}:{lineno}: invalid JSON ({e.msg} at column {e.colno}) in {file}; fix the line") from None
        if not isinstance(obj, dict):
            raise KitError(f"{file.name}:{lineno}: expected a JSON object per line, got {type(obj).__name__} ({file})")
        rows.append((lineno, obj))
    if not rows:
        raise KitError(f"{file} is empty; add one JSON object per line (see the {what} layout in the docs)")
    return rows


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- COCO


def _load_coco_json(file: Path, what: str) -> dict[str, Any]:
    if not file.is_file():
        raise KitError(f"COCO {what} file {file} does not exist; pass the path of the annotations JSON")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KitError(f"{file}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); fix or re-download the file") from None
    except UnicodeDecodeError as e:
        raise KitError(f"{file}: not UTF-8 JSON ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise KitError(f"{file}: not a COCO annotation file (expected an object with 'images' and 'annotations' lists)")
    return data


def _coco_images(file: Path, data: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    images: dict[Any, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise KitError(f"{file}: images[{i}] has no 'id'; every COCO image entry needs id, file_name, width, height")
        iid = img["id"]
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise KitError(f"{file}: image id {iid} lacks a positive integer width/height (got width={w!r}, height={h!r}); add the image size")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise KitError(f"{file}: image id {iid} has no 'file_name'")
        if iid in images:
            raise KitError(f"{file}: image id {iid} appears twice in 'images'; ids must be unique")
        images[iid] = img
    return images


def _coco_index(data: dict[str, Any], file: Path) -> Any:
    """A pycocotools COCO object over already-validated data, without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise KitError(f"{file}: malformed COCO entry (missing or wrong field {e}); check the file against the COCO format") from None
    return coco


def _check_ann_images(file: Path, data: dict[str, Any], images: dict[Any, dict[str, Any]]) -> None:
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise KitError(f"{file}: annotations[{i}] is not an object")
        aid = ann.get("id", f"#{i}")
        if "image_id" not in ann:
            raise KitError(f"{file}: annotation id {aid} has no 'image_id'")
        if ann["image_id"] not in images:
            raise KitError(f"{file}: annotation id {aid} refers to image_id {ann['image_id']!r}, which is not in 'images'; fix or drop the annotation")
        if "id" not in ann:
            raise KitError(f"{file}: annotations[{i}] has no 'id'; COCO annotations need unique ids")


def from_coco(
    captions_file: Path, images_dir: Path, instances_file: Path | None = None, private: bool | None = None
) -> list[Record]:
    """Records from a COCO captions file and, optionally, a COCO instances file.

    One record per image that has at least one caption, in the order of the captions file's
    `images`; id `coco-<image_id>`; boxes are `category: [x1, y1, x2, y2]` normalised to 0..1 with
    three decimals, as LLaVA gives them to the generator. `private` defaults to True when a path
    component of `images_dir` or an annotation file is `private_data`.

    Raises KitError (naming the file and the id) for: a missing file; invalid JSON; a file that is not
    COCO; an image entry without width/height; an annotation whose image_id is not in `images`; an
    unknown category; a malformed bbox; a box outside its image by more than 1 px; a missing
    `images_dir`.
    """
    captions_file, images_dir = Path(captions_file), Path(images_dir)
    instances_file = Path(instances_file) if instances_file is not None else None
    cap_data = _load_coco_json(captions_file, "captions")
    inst_data = _load_coco_json(instances_file, "instances") if instances_file is not None else None
    if not images_dir.is_dir():
        raise KitError(f"COCO images folder {images_dir} does not exist; pass the folder that holds the images' file_name paths")
    if private is None:
        private = _under_private(images_dir, captions_file, instances_file)

    cap_images = _coco_images(captions_file, cap_data)
    _check_ann_images(captions_file, cap_data, cap_images)
    for ann in cap_data["annotations"]:
        if not isinstance(ann.get("caption"), str):
            raise KitError(f"{captions_file}: annotation id {ann['id']} has no 'caption' string; is this a captions file (captions_*.json)?")
    cap_coco = _coco_index(cap_data, captions_file)

    boxes_by_image: dict[Any, list[Box]] = {}
    if inst_data is not None:
        assert instances_file is not None
        boxes_by_image = _coco_boxes(instances_file, inst_data)

    records: list[Record] = []
    for iid, img in cap_images.items():
        anns = cap_coco.loadAnns(cap_coco.getAnnIds(imgIds=[iid]))
        captions = _clean_texts(a["caption"] for a in anns)
        if not captions:
            continue
        records.append(
            Record(
                id=f"coco-{iid}",
                image=img["file_name"],
                root=images_dir,
                captions=captions,
                boxes=boxes_by_image.get(iid, []),
                private=private,
                source=f"{captions_file}#{iid}",
            )
        )
    return records


def _coco_boxes(file: Path, data: dict[str, Any]) -> dict[Any, list[Box]]:
    images = _coco_images(file, data)
    _check_ann_images(file, data, images)
    cats = data.get("categories")
    if not isinstance(cats, list):
        raise KitError(f"{file}: no 'categories' list; is this an instances file (instances_*.json)?")
    names: dict[Any, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise KitError(f"{file}: categories[{i}] needs 'id' and 'name'")
        names[c["id"]] = c["name"]
    for ann in data["annotations"]:
        if ann.get("category_id") not in names:
            raise KitError(f"{file}: annotation id {ann['id']} has category_id {ann.get('category_id')!r}, which is not in 'categories'")
        if _numbers(ann.get("bbox"), 4) is None:
            raise KitError(f"{file}: annotation id {ann['id']} needs 'bbox' as four numbers [x, y, width, height], got {ann.get('bbox')!r}")
    coco = _coco_index(data, file)

    out: dict[Any, list[Box]] = {}
    for iid, img in images.items():
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[iid])):
            x, y, w, h = (float(v) for v in ann["bbox"])
            try:
                bbox = _pixel_box(x, y, x + w, y + h, img["width"], img["height"])
            except _BoxError as e:
                raise KitError(
                    f"{file}: annotation id {ann['id']} (image id {iid}, {img['width']} x {img['height']} px): bbox "
                    f"[{x:g}, {y:g}, {w:g}, {h:g}] (x, y, width, height) {e}; fix the box or the image size"
                ) from None
            out.setdefault(iid, []).append(Box(names[ann["category_id"]], bbox))
    return out


# --------------------------------------------------------------------------- manifest folder

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
    nums = _numbers(raw.get("bbox"), 4)
    if nums is None:
        raise KitError(f"{where}: box '{label}' needs 'bbox' as four numbers, got {raw.get('bbox')!r}")
    width, height = size
    a, b, c, d = nums
    if fmt == "xyxy_norm":
        a, b, c, d = a * width, b * height, c * width, d * height
    elif fmt == "xywh_pixels":
        c, d = a + c, b + d
    try:
        return Box(label.strip(), _pixel_box(a, b, c, d, width, height))
    except _BoxError as e:
        raise KitError(f"{where}: box '{label}' {nums} ({fmt}) {e}; check the coordinates and 'format'") from None


def _text_list(value: Any, field: str, where: str) -> list[str]:
    if isinstance(value, str):
        return _clean_texts([value])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _clean_texts(value)
    raise KitError(f"{where}: '{field}' must be a string or a list of strings")


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
    records: list[Record] = []
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(manifest, "manifest"):
        where = f"{MANIFEST_NAME}:{lineno}"
        unknown = sorted(set(obj) - _MANIFEST_FIELDS)
        if unknown:
            raise KitError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_MANIFEST_FIELDS))} ({manifest})")
        rel, size = _checked_image(obj.get("image"), folder, where)
        rid = _record_id(obj, rel, where, seen, lineno)
        if "caption" in obj and "captions" in obj:
            raise KitError(f"{where}: give either 'caption' or 'captions', not both")
        captions = _text_list(obj["captions"], "captions", where) if "captions" in obj else []
        if "caption" in obj:
            if not isinstance(obj["caption"], str):
                raise KitError(f"{where}: 'caption' must be a string (use 'captions' for a list)")
            captions = _clean_texts([obj["caption"]])
        findings = _text_list(obj["findings"], "findings", where) if "findings" in obj else []
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
        records.append(
            Record(
                id=rid, image=rel, root=folder, captions=captions, boxes=boxes, findings=findings,
                metadata=metadata, private=private, source=f"{manifest}:{lineno}",
            )
        )
    return records


def _checked_image(value: Any, folder: Path, where: str) -> tuple[str, tuple[int, int]]:
    if value is None:
        raise KitError(f"{where}: missing 'image' (a path relative to {folder})")
    rel = _safe_relpath(value)
    if rel is None:
        raise KitError(f"{where}: image path {value!r} must be relative to {folder} and stay inside it (no absolute paths, no '..')")
    path = folder / rel
    if not path.is_file():
        raise KitError(f"{where}: image file {path} does not exist")
    try:
        size = _image_size(path)
    except (OSError, Image.DecompressionBombError) as e:
        raise KitError(f"{where}: cannot read image {path} ({_one_line(e)})") from None
    return rel, size


def _record_id(obj: dict[str, Any], rel: str, where: str, seen: dict[str, int], lineno: int) -> str:
    rid = obj.get("id", _default_id(rel))
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


# --------------------------------------------------------------------------- figure captions

_FIGURE_FIELDS = {"id", "image", "caption", "mentions"}


def from_figures(file: Path, images_dir: Path) -> list[Record]:
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
    private = _under_private(file, images_dir)
    records: list[Record] = []
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(file, "figure-caption file"):
        where = f"{file.name}:{lineno}"
        unknown = sorted(set(obj) - _FIGURE_FIELDS)
        if unknown:
            raise KitError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FIGURE_FIELDS))} ({file})")
        rel, _ = _checked_image(obj.get("image"), images_dir, where)
        rid = _record_id(obj, rel, where, seen, lineno)
        caption = obj.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise KitError(f"{where}: 'caption' must be a non-empty string")
        mentions = _text_list(obj["mentions"], "mentions", where) if "mentions" in obj else []
        records.append(
            Record(
                id=rid, image=rel, root=images_dir, captions=[caption.strip()], findings=mentions,
                private=private, source=f"{file}:{lineno}",
            )
        )
    return records


# --------------------------------------------------------------------------- DICOM

# Keywords whose values identify a patient, a visit, staff or a site, or are free text that often
# carries such data. None of them is ever copied; tests use `phi_values` to prove it.
PHI_KEYWORDS: tuple[str, ...] = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
    "CountryOfResidence", "RegionOfResidence", "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService",
    "MedicalRecordLocator", "PatientReligiousPreference", "AdditionalPatientHistory", "PatientComments",
    "ResponsiblePerson", "ResponsibleOrganization", "MedicalAlerts", "Allergies", "PregnancyStatus",
    "PatientInsurancePlanCodeSequence",
    # staff and site
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "ContentCreatorName", "StationName",
    "DeviceSerialNumber", "DetectorID", "PlateID", "CassetteID", "GantryID",
    # dates and times
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate", "OverlayDate",
    "CurveDate", "AcquisitionDateTime", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "InstanceCreationTime", "OverlayTime", "CurveTime", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime",
    # identifiers
    "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "MediaStorageSOPInstanceUID", "FrameOfReferenceUID", "ReferencedSOPInstanceUID", "IrradiationEventUID",
    "RequestAttributesSequence", "PerformedProcedureStepID", "ScheduledProcedureStepID", "RequestedProcedureID",
    "AdmissionID", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialCoordinatingCenterName", "ClinicalTrialTimePointID", "ClinicalTrialSeriesID",
    # free text that often holds any of the above
    "StudyDescription", "SeriesDescription", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
    "ImageComments", "ContentDescription", "ContentLabel", "ProtocolName", "DerivationDescription",
    "ReasonForStudy", "RequestedProcedureComments", "ImagingServiceRequestComments",
)

_PHI_SET = frozenset(PHI_KEYWORDS)

# Only coded or numeric tags (VR CS/DS/IS/US): their values cannot carry a name or a sentence.
DICOM_METADATA_ALLOWLIST: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ViewPosition", "PatientPosition", "ImageType", "PhotometricInterpretation",
    "Rows", "Columns", "NumberOfFrames", "SliceThickness", "PixelSpacing", "ImageLaterality", "Laterality",
    "SegmentationType",
)
_SAFE_VRS = {"CS", "DS", "IS", "US", "UL", "SS"}

MODALITY_WORDS: dict[str, str] = {
    "CT": "computed tomography (CT) image",
    "MR": "magnetic resonance (MR) image",
    "NM": "nuclear medicine image",
    "US": "ultrasound image",
    "CR": "computed radiography image",
    "DX": "digital X-ray image",
    "MG": "mammography image",
    "PT": "positron emission tomography (PET) image",
    "XA": "X-ray angiography image",
    "RF": "fluoroscopy image",
    "SEG": "segmentation mask",
    "OT": "medical image",
    "SC": "secondary capture image",
    "IO": "intra-oral X-ray image",
    "PX": "panoramic dental X-ray image",
    "OP": "ophthalmic photograph",
    "ES": "endoscopy image",
    "SM": "slide microscopy image",
    "XC": "external camera photograph",
}
_BODY_PARTS: dict[str, str] = {
    "WHOLEBODY": "the whole body", "WHOLE BODY": "the whole body", "CSPINE": "the cervical spine",
    "TSPINE": "the thoracic spine", "LSPINE": "the lumbar spine", "HEADNECK": "the head and neck",
    "CHESTABDOMEN": "the chest and abdomen", "ABDOMENPELVIS": "the abdomen and pelvis",
    "CHEST_TO_PELVIS": "the chest to pelvis", "TMJ": "the temporomandibular joint",
    "EXTREMITY": "an extremity",
}
_VIEWS: dict[str, str] = {
    "PA": "posteroanterior (PA) view", "AP": "anteroposterior (AP) view", "LAT": "lateral view",
    "LL": "left lateral view", "RL": "right lateral view", "OBL": "oblique view", "CC": "craniocaudal (CC) view",
    "MLO": "mediolateral oblique (MLO) view", "ML": "mediolateral view", "LM": "lateromedial view",
}
_LATERALITY = {"L": "left side", "R": "right side", "B": "both sides"}
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")


def _is_multi(value: Any) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, (MultiValue, list, tuple))


def _walk_phi(ds: Any, inside: bool, out: list[str]) -> None:
    for el in ds:
        hit = inside or el.keyword in _PHI_SET
        if el.VR == "SQ":
            for item in el.value or []:
                _walk_phi(item, hit, out)
            continue
        if not hit or el.value is None or isinstance(el.value, (bytes, bytearray)):
            continue
        values = list(el.value) if _is_multi(el.value) else [el.value]  # PersonName iterates by character
        for v in values:
            s = str(v).strip()
            if s and s not in out:
                out.append(s)


def phi_values(path: Path) -> list[str]:
    """String values of every `PHI_KEYWORDS` tag in a DICOM file, nested sequences and file meta
    included; values inside a PHI sequence count too. Empty values are left out.

    Raises KitError when the file cannot be read as DICOM.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types for damaged files
        raise KitError(f"cannot read DICOM file {path}: {_one_line(e)}") from None
    return _dataset_phi(ds)


def _dataset_phi(ds: Any) -> list[str]:
    out: list[str] = []
    if getattr(ds, "file_meta", None) is not None:
        _walk_phi(ds.file_meta, False, out)
    _walk_phi(ds, False, out)
    return out


def _first(value: Any) -> Any:
    if value is None:
        return None
    if _is_multi(value):
        items = list(value)
        return items[0] if items else None
    return value


def _dicom_metadata(ds: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for kw in DICOM_METADATA_ALLOWLIST:
        if kw not in ds:  # top level only: nested items belong to other images or people
            continue
        el = ds.data_element(kw)
        if el is None or el.VR not in _SAFE_VRS or el.value is None or el.value == "":
            continue
        val = el.value
        if _is_multi(val):
            text = ", ".join(str(v).strip() for v in val if str(v).strip())
        else:
            text = str(val).strip()
        if text:
            out[kw] = text
    plane = _plane(ds)
    if plane:
        out["ImagePlane"] = plane
    return out


def _plane(ds: Any) -> str | None:
    """Axial/sagittal/coronal from the orientation cosines (numbers only), else from ImageType."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is not None and len(iop) == 6:
        try:
            row, col = np.array([float(v) for v in iop[:3]]), np.array([float(v) for v in iop[3:]])
            normal = np.abs(np.cross(row, col))
            if normal.max() > 0.8:  # oblique slices get no plane name rather than a wrong one
                return ("sagittal", "coronal", "axial")[int(normal.argmax())]
            return None
        except (TypeError, ValueError):
            pass
    for v in getattr(ds, "ImageType", None) or []:
        if str(v).strip().upper() in ("AXIAL", "SAGITTAL", "CORONAL"):
            return str(v).strip().lower()
    return None


def _article(word: str) -> str:
    first = word.split()[0] if word.split() else word
    vowel_sound = first[:1].lower() in "aeiou" or first in ("MR", "MRI", "X-ray", "NM", "MLO", "LAT", "SEG")
    return "An" if vowel_sound else "A"


def dicom_caption(metadata: dict[str, str], segments: list[str] | None = None) -> str:
    """A short factual sentence from safe metadata; says what is unknown instead of guessing."""
    code = metadata.get("Modality", "").upper()
    if not code:
        noun = "medical image of unrecorded modality"
    else:
        noun = MODALITY_WORDS.get(code, f"medical image (modality code {code})")
    colour = metadata.get("PhotometricInterpretation", "").upper() in _COLOUR_PHOTOMETRICS
    words = [w for w in (metadata.get("ImagePlane"), "colour" if colour else None, noun) if w]
    phrase = " ".join(words)
    text = f"{_article(phrase)} {phrase}"
    if metadata.get("Columns") and metadata.get("Rows"):
        text += f" ({metadata['Columns']} x {metadata['Rows']} pixels)"
    if segments:
        quoted = ", ".join(f'"{s}"' for s in segments)
        text += f" with the segment {quoted}" if len(segments) == 1 else f" with {len(segments)} segments: {quoted}"
    part = metadata.get("BodyPartExamined", "").strip().upper()
    tail: list[str] = []
    if part:
        text += " of " + _BODY_PARTS.get(part, "the " + part.lower().replace("_", " "))
    view = metadata.get("ViewPosition", "").strip().upper()
    if view:
        tail.append(_VIEWS.get(view, f"{view} view"))
    side = _LATERALITY.get(metadata.get("ImageLaterality", metadata.get("Laterality", "")).strip().upper())
    if side:
        tail.append(side)
    frames = metadata.get("NumberOfFrames", "")
    if frames.isdigit() and int(frames) > 1:
        n = int(frames)
        tail.append(f"frame {n // 2 + 1} of a {n}-frame sequence")
    if tail:
        text += ", " + ", ".join(tail)
    if not part:
        text += "; the body part is not recorded"
    return text + "."


def _window(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """DICOM linear VOI window to 0..1, or None when the file has no usable window."""
    try:
        centre = float(_first(ds.get("WindowCenter")))
        width = float(_first(ds.get("WindowWidth")))
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 1:
        return None
    out = ((arr - (centre - 0.5)) / (width - 1) + 0.5).clip(0.0, 1.0)
    # A window written for another series can blank the image; min-max is more useful then.
    return out if out.max() > out.min() else None


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return (arr - lo) / (hi - lo)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render(ds: Any, frame: np.ndarray) -> np.ndarray:
    """One decoded frame -> 8-bit grey (H, W) or RGB (H, W, 3) array for display and training."""
    from pydicom import pixels

    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        frame = pixels.apply_color_lut(frame, ds)
    if frame.ndim == 3:
        # pixel_array(as_rgb=True) already turned YBR into RGB
        if frame.dtype == np.uint8:
            return frame
        bits = int(ds.get("BitsStored", 16) or 16) if photometric != "PALETTE COLOR" else 16
        return _to_uint8(frame.astype(np.float64) / float((1 << bits) - 1))
    values = pixels.apply_modality_lut(frame, ds).astype(np.float64)
    unit = _window(values, ds)
    if unit is None:
        unit = _min_max(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values as white
    return _to_uint8(unit)


def _segments(ds: Any, frame_index: int, frame: np.ndarray, phi: list[str]) -> tuple[list[str], list[Box]]:
    """Segment labels (safe ones) and the box of each segment visible in the rendered frame."""
    labels: dict[int, str] = {}
    for item in ds.get("SegmentSequence") or []:
        label = str(item.get("SegmentLabel", "") or "").strip()
        coded = ""
        for code in item.get("SegmentedPropertyTypeCodeSequence") or []:
            coded = str(code.get("CodeMeaning", "") or "").strip()
        # A segment label is free text: fall back to the coded term when it echoes an identifier.
        if label and any(p.lower() in label.lower() for p in phi if len(p) >= 3):
            label = coded
        label = label or coded
        if label:
            labels[int(item.get("SegmentNumber", len(labels) + 1))] = label
    if not labels:
        return [], []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    number = None
    if frame_index < len(per_frame):
        for ident in per_frame[frame_index].get("SegmentIdentificationSequence") or []:
            number = int(ident.get("ReferencedSegmentNumber", 0))
    if number is None and len(labels) == 1:
        number = next(iter(labels))
    boxes: list[Box] = []
    mask = np.asarray(frame) > 0
    if number in labels and mask.any():
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        h, w = mask.shape
        boxes.append(Box(labels[number], _pixel_box(cols[0], rows[0], cols[-1] + 1, rows[-1] + 1, w, h)))
    return list(labels.values()), boxes


def _read_dicom(path: Path, strict: bool) -> Any | None:
    """The dataset, or None for a file that is not DICOM (only allowed when not `strict`)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path))
    except InvalidDicomError:
        if not strict:
            return None
    except Exception as e:  # damaged files raise anything from EOFError to struct.error
        if not strict:
            return None
        raise KitError(f"cannot read DICOM file {path} ({type(e).__name__}: {_one_line(e)}); remove or replace it") from None
    # A .dcm without the 128-byte preamble is still common from older systems.
    try:
        ds = pydicom.dcmread(str(path), force=True)
    except Exception as e:
        raise KitError(f"cannot read DICOM file {path} ({type(e).__name__}: {_one_line(e)}); remove or replace it") from None
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        raise KitError(f"cannot read DICOM file {path}: it ends in .dcm but is not DICOM; remove or rename it")
    return ds


def _dicom_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() == ".dcm" or (not p.suffix and not name.startswith(".")):
                files.append(p)
    return files


def from_dicom(folder: Path, work_dir: Path) -> list[Record]:
    """Records from every DICOM image under `folder` (recursive), with an 8-bit PNG per file.

    Files ending in `.dcm` must be DICOM; files without an extension are used when pydicom can read
    them and silently skipped otherwise; DICOM objects without pixel data (reports, DICOMDIR) are
    skipped. Each image becomes `work_dir/images/<id>.png` (the middle frame of a multi-frame file,
    modality LUT then the file's window or min-max, MONOCHROME1 inverted, colour as RGB).

    Ids are `dicom-` + 12 hex chars of sha256 of the path relative to `folder`: stable, and unlike
    UIDs not traceable to the patient. Metadata holds only `DICOM_METADATA_ALLOWLIST` (coded or
    numeric tags); captions come from it. A segmentation's labels go to findings and the box of the
    segment shown in the PNG to boxes. Records are always private.

    Raises KitError for: a missing folder; a `.dcm` file that cannot be read; pixel data that cannot
    be decoded (a codec plugin is missing); a folder with no DICOM image.
    """
    from pydicom import pixels

    folder, work_dir = Path(folder), Path(work_dir)
    if not folder.is_dir():
        raise KitError(f"DICOM folder {folder} does not exist")
    records: list[Record] = []
    for path in _dicom_files(folder):
        ds = _read_dicom(path, strict=path.suffix.lower() == ".dcm")
        if ds is None or "PixelData" not in ds:
            continue
        rel = path.relative_to(folder).as_posix()
        rid = "dicom-" + hashlib.sha256(rel.encode("utf-8")).hexdigest()[:12]
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        index = n_frames // 2
        try:
            frame = pixels.pixel_array(ds, index=index if n_frames > 1 else None)
        except Exception as e:  # missing codec plugins and corrupt streams both land here
            raise KitError(
                f"cannot decode the pixel data of {path} ({type(e).__name__}: {_one_line(e)}); install the codec pydicom names "
                "(e.g. pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg) or remove the file"
            ) from None
        if frame.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
            frame = frame[frame.shape[0] // 2]  # frames the header did not count
        image = _render(ds, frame)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")  # no text chunks: nothing but pixels
        _atomic_write_bytes(work_dir / "images" / f"{rid}.png", buf.getvalue())

        metadata = _dicom_metadata(ds)
        labels: list[str] = []
        boxes: list[Box] = []
        if str(ds.get("Modality", "")).upper() == "SEG":
            labels, boxes = _segments(ds, index, frame, _dataset_phi(ds))
        records.append(
            Record(
                id=rid,
                image=f"images/{rid}.png",
                root=work_dir,
                captions=[dicom_caption(metadata, labels)],
                boxes=boxes,
                findings=[f"Segmented region: {label}" for label in labels],
                metadata=metadata,
                private=True,
                source=f"dicom#{rid}",  # not the path: folder names are often patient names
            )
        )
    if not records:
        raise KitError(f"no DICOM images under {folder} (looked for *.dcm and extensionless DICOM files)")
    return records


# --------------------------------------------------------------------------- stage-1 caption pairs

CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Give a brief description of this picture.",
    "What does this image show? Answer in one sentence.",
    "Summarize the visual content of the image.",
    "Write a short caption for the image.",
    "Provide a one-sentence summary of what is shown.",
    "Briefly say what can be seen here.",
    "Offer a compact description of the image.",
)


def _instruction(seed: int, rid: str) -> str:
    # sha256 rather than hash(): Python's str hash changes per process.
    digest = hashlib.sha256(f"{seed}\0{rid}".encode("utf-8")).digest()
    return CAPTION_INSTRUCTIONS[int.from_bytes(digest[:8], "big") % len(CAPTION_INSTRUCTIONS)]


def _image_folder(records: list[Record], out_dir: Path) -> Path:
    """The folder all image paths are written relative to.

    The data file's own folder when every image lies under it (kit's default image folder, so the
    file works without configuration); else the records' shared root; else their common ancestor.
    """
    files = [Path(os.path.abspath(r.root / r.image)) for r in records]
    out_abs = Path(os.path.abspath(out_dir))
    if all(f.is_relative_to(out_abs) for f in files):
        return out_abs
    roots = {Path(os.path.abspath(r.root)) for r in records}
    if len(roots) == 1:
        return roots.pop()
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def write_caption_pairs(records: list[Record], out_file: Path, seed: int = 0) -> int:
    """Write stage-1 (concept alignment) LLaVA data: one image -> caption sample per record.

    Records without a caption are skipped; the first caption is the answer; the instruction is one
    of `CAPTION_INSTRUCTIONS`, chosen from (seed, id) so reruns give the same file. `.jsonl` output
    is one sample per line, anything else a JSON list; written atomically. A `kit.json` card beside
    the file records `image_folder` (absolute), which the `image` paths are relative to.

    Returns the number of samples. Raises KitError when no record has a caption or two records
    share an id.
    """
    out_file = Path(out_file)
    usable = [r for r in records if r.captions]
    if not usable:
        raise KitError(f"no record has a caption; nothing to write to {out_file}")
    seen: dict[str, str] = {}
    for r in usable:
        if r.id in seen:
            raise KitError(f"two records share id '{r.id}' ({seen[r.id]} and {r.source}); ids must be unique in one data file")
        seen[r.id] = r.source
    out_file.parent.mkdir(parents=True, exist_ok=True)
    folder = _image_folder(usable, out_file.parent)
    samples = []
    for r in usable:
        image = Path(os.path.relpath(os.path.abspath(r.root / r.image), folder)).as_posix()
        samples.append(
            {
                "id": r.id,
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + _instruction(seed, r.id)},
                    {"from": "gpt", "value": r.captions[0]},
                ],
            }
        )
    if out_file.suffix == ".jsonl":
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        _atomic_write_bytes(out_file, text.encode("utf-8"))
    else:
        cards.write_json_atomic(out_file, samples)
    cards.write_card(
        out_file.parent,
        cards.new_card(
            "data", made_by="kit data ingest", image_folder=str(folder), files=[out_file.name],
            samples=len(samples), private=any(r.private for r in usable),
        ),
    )
    return len(samples)


SOURCES = ("coco", "manifest", "dicom", "figures")


def load_records(source: str, input: Path, work_dir: Path, images: Path | None = None, instances: Path | None = None) -> list[Record]:
    """Dispatch on the source kind (what `kit generate` and `kit data ingest` take).

    `work_dir` receives rendered DICOM images. Raises KitError for an unknown source or bad input.
    """
    input = Path(input)
    if source == "coco":
        if images is None:
            raise KitError("--source coco needs --images DIR (the folder of the images' file_name paths)")
        return from_coco(input, Path(images), Path(instances) if instances else None)
    if source == "manifest":
        return from_manifest(input)
    if source == "dicom":
        return from_dicom(input, Path(work_dir))
    if source == "figures":
        return from_figures(input, Path(images) if images else input.parent)
    raise KitError(f"unknown --source '{source}'; choose from {', '.join(SOURCES)}")
