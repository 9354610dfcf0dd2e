"""Tests for kit.ingest.shapes: determinism, exact bboxes, COCO/LLaVA files, scoring."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from kit.ingest.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    caption,
    draw_scene,
    score_caption,
    write_shapes_dataset,
)

ALL_TRUE = {"colour": True, "shape": True, "position": True}


def _dir_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = _dir_bytes(Path(write_shapes_dataset(tmp_path / "a", n=6, seed=3, size=64)["root"]))
    b = _dir_bytes(Path(write_shapes_dataset(tmp_path / "b", n=6, seed=3, size=64)["root"]))
    c = _dir_bytes(Path(write_shapes_dataset(tmp_path / "c", n=6, seed=4, size=64)["root"]))
    assert a == b
    assert a.keys() == c.keys()
    assert a["pretrain.json"] != c["pretrain.json"]
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    # No temp files left behind by the atomic writes.
    assert not any(k.endswith(".tmp") for k in a)


def test_draw_scene_deterministic() -> None:
    img1, attrs1 = draw_scene(random.Random(7), size=96)
    img2, attrs2 = draw_scene(random.Random(7), size=96)
    assert attrs1 == attrs2
    assert img1.tobytes() == img2.tobytes()


@pytest.mark.parametrize("seed", range(40))
def test_bbox_is_tight_and_position_matches(seed: int) -> None:
    size = 96
    img, attrs = draw_scene(random.Random(seed), size=size)
    assert img.mode == "RGB" and img.size == (size, size)
    arr = np.asarray(img)
    ys, xs = np.nonzero(np.all(arr == COLOURS[attrs["colour"]], axis=2))
    x, y, w, h = attrs["bbox"]
    # Every object pixel is inside the box and the box touches all four edges.
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (x, x + w - 1, y, y + h - 1)
    assert 0.25 * size - 1 <= max(w, h) <= 0.40 * size
    # The box centre lies in the grid cell its position names.
    col = int((x + w / 2) // (size / 3))
    row = int((y + h / 2) // (size / 3))
    expected = {"top left": (0, 0), "top right": (2, 0), "bottom left": (0, 2), "bottom right": (2, 2), "center": (1, 1)}
    assert (col, row) == expected[attrs["position"]]


def test_coco_files_load(tmp_path: Path) -> None:
    n = 8
    paths = write_shapes_dataset(tmp_path, n=n, seed=0, size=64)
    det = COCO(paths["instances"])
    cap = COCO(paths["captions"])
    assert len(det.getImgIds()) == len(det.getAnnIds()) == n
    assert len(cap.getImgIds()) == len(cap.getAnnIds()) == n
    assert len(det.getCatIds()) == len(COLOURS) * len(SHAPES)
    attributes = json.loads(Path(paths["attributes"]).read_text())
    for img in det.loadImgs(det.getImgIds()):
        assert (tmp_path / img["file_name"]).is_file()
        (ann,) = det.loadAnns(det.getAnnIds(imgIds=img["id"]))
        attrs = attributes[Path(img["file_name"]).stem]
        assert ann["bbox"] == attrs["bbox"]
        assert det.loadCats(ann["category_id"])[0]["name"] == f"{attrs['colour']} {attrs['shape']}"
        (c,) = cap.loadAnns(cap.getAnnIds(imgIds=img["id"]))
        assert score_caption(c["caption"], attrs) == ALL_TRUE


def test_llava_files(tmp_path: Path) -> None:
    n = 10
    paths = write_shapes_dataset(tmp_path, n=n, seed=1, size=64)
    pretrain = json.loads(Path(paths["pretrain"]).read_text())
    instruct = json.loads(Path(paths["instruct"]).read_text())
    attributes = json.loads(Path(paths["attributes"]).read_text())
    assert len(pretrain) == len(instruct) == len(attributes) == n
    assert pretrain[0]["id"] == "shape_00000" and pretrain[0]["image"] == "images/shape_00000.png"
    for p, q in zip(pretrain, instruct):
        attrs = attributes[p["id"]]
        human, gpt = p["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and score_caption(gpt["value"], attrs) == ALL_TRUE
        turns = q["conversations"]
        assert q["image"] == p["image"] and 4 <= len(turns) <= 6 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1


def test_every_caption_scores_correct() -> None:
    rng = random.Random(0)
    for _ in range(300):
        attrs = {
            "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES),
            "position": rng.choice(POSITIONS),
        }
        text = caption(attrs, rng)
        assert score_caption(text, attrs) == ALL_TRUE, text


ATTRS = {"colour": "red", "shape": "square", "position": "center", "bbox": [0, 0, 1, 1]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A red square in the center.", (True, True, True)),
        ("A RED SQUARE in the Middle.", (True, True, True)),
        ("a red square, centred", (True, True, True)),
        ("Two red squares at the centre of the image.", (True, True, True)),
        ("A blue square in the center.", (False, True, True)),
        ("A red or blue square in the center.", (False, True, True)),
        ("A red box in the center.", (True, False, True)),
        ("A red rectangle in the center.", (True, False, True)),
        ("A red square or circle in the center.", (True, False, True)),
        ("A red square in the top left corner.", (True, True, False)),
        ("A red square between the center and the top-left.", (True, True, False)),
        ("A reddish thing.", (False, False, False)),
        ("", (False, False, False)),
    ],
)
def test_score_caption(text: str, expected: tuple[bool, bool, bool]) -> None:
    got = score_caption(text, ATTRS)
    assert (got["colour"], got["shape"], got["position"]) == expected


def test_score_caption_corner_synonyms() -> None:
    attrs = {"colour": "green", "shape": "star", "position": "bottom right"}
    assert score_caption("A green star in the lower-right corner.", attrs) == ALL_TRUE
    assert score_caption("A green star in the bottom left corner.", attrs)["position"] is False
    assert score_caption("A green start in the bottom right.", attrs)["shape"] is False


def test_class_balance() -> None:
    rng = random.Random(123)
    draws = [draw_scene(rng, size=48)[1] for _ in range(500)]
    for key, values in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS)):
        counts = Counter(d[key] for d in draws)
        assert set(counts) == set(values)
        assert min(counts.values()) >= 50, (key, counts)
