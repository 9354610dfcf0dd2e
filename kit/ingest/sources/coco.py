"""COCO captions + instances files, read through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.ingest.records import Box, Record
from kit.ingest.sources.common import BoxError, clean_texts, numbers, pixel_box, safe_relpath


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
        if not isinstance(iid, (int, str)) or isinstance(iid, bool):
            raise KitError(f"{file}: images[{i}].id is {type(iid).__name__} {json.dumps(iid)[:40]}; an image id must be an integer or a string")
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise KitError(f"{file}: image id {iid} lacks a positive integer width/height (got width={w!r}, height={h!r}); add the image size")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise KitError(f"{file}: image id {iid} has no 'file_name'")
        if safe_relpath(img["file_name"]) is None:
            raise KitError(f"{file}: image id {iid}: file_name {img['file_name']!r} must be a path inside the images folder "
                           "(no absolute paths, no '..')")
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
        if not isinstance(ann["image_id"], (int, str)) or ann["image_id"] not in images:
            raise KitError(f"{file}: annotation id {aid} refers to image_id {ann['image_id']!r}, which is not in 'images'; fix or drop the annotation")
        if "id" not in ann:
            raise KitError(f"{file}: annotations[{i}] has no 'id'; COCO annotations need unique ids")


def from_coco(
    captions_file: Path, images_dir: Path, instances_file: Path | None = None, private: bool = True
) -> list[Record]:
    """Records from a COCO captions file and, optionally, a COCO instances file.

    One record per image that has at least one caption, in the order of the captions file's
    `images`; id `coco-<image_id>`; boxes are `category: [x1, y1, x2, y2]` normalised to 0..1 with
    three decimals, as LLaVA gives them to the generator. Records are private (they never go to a
    remote backend without --allow-remote) unless the caller says the data is public.

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
        captions = clean_texts(a["caption"] for a in anns)
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
        if numbers(ann.get("bbox"), 4) is None:
            raise KitError(f"{file}: annotation id {ann['id']} needs 'bbox' as four numbers [x, y, width, height], got {ann.get('bbox')!r}")
    coco = _coco_index(data, file)

    out: dict[Any, list[Box]] = {}
    for iid, img in images.items():
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[iid])):
            x, y, w, h = (float(v) for v in ann["bbox"])
            try:
                bbox = pixel_box(x, y, x + w, y2=y + h, width=img["width"], height=img["height"])
            except BoxError as e:
                raise KitError(
                    f"{file}: annotation id {ann['id']} (image id {iid}, {img['width']} x {img['height']} px): bbox "
                    f"[{x:g}, {y:g}, {w:g}, {h:g}] (x, y, width, height) {e}; fix the box or the image size"
                ) from None
            out.setdefault(iid, []).append(Box(names[ann["category_id"]], bbox))
    return out
