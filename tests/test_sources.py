"""Sources -> Records: COCO, manifest folders, DICOM (with PHI kept out), figure captions, stage-1 pairs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kit.core.errors import KitError
from kit.ingest.pairs import CAPTION_INSTRUCTIONS, write_caption_pairs
from kit.ingest.sources import from_coco, from_dicom, from_figures, from_manifest, phi_values


def _draw(path: Path, size: tuple[int, int], box: tuple[int, int, int, int], colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle(box, fill=colour)
    im.save(path)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- COCO


@pytest.fixture
def coco(tmp_path: Path) -> dict:
    images_dir = tmp_path / "images"
    _draw(images_dir / "a.png", (40, 30), (4, 3, 23, 17))
    _draw(images_dir / "b.png", (50, 50), (10, 10, 39, 49), "blue")
    _draw(images_dir / "c.png", (20, 20), (0, 0, 9, 9))
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
        {"id": 3, "file_name": "c.png", "width": 20, "height": 20},  # no caption: no record
    ]
    captions = {
        "images": images,
        "annotations": [
            {"id": 10, "image_id": 1, "caption": " A red rectangle on white. "},
            {"id": 11, "image_id": 1, "caption": "A red rectangle on white."},  # duplicate after strip
            {"id": 12, "image_id": 1, "caption": "A small red box."},
            {"id": 13, "image_id": 2, "caption": "A blue block at the bottom."},
        ],
    }
    instances = {
        "images": images,
        "categories": [{"id": 1, "name": "red box"}, {"id": 2, "name": "blue box"}],
        "annotations": [
            {"id": 20, "image_id": 1, "category_id": 1, "bbox": [4, 3, 20, 15], "area": 300, "iscrowd": 0},
            # overshoots the bottom edge by 0.6 px: clamped, not an error
            {"id": 21, "image_id": 2, "category_id": 2, "bbox": [10, 10, 30, 40.6], "area": 1218, "iscrowd": 0},
            {"id": 22, "image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        ],
    }
    return {
        "images_dir": images_dir,
        "captions": _write(tmp_path / "captions.json", captions),
        "instances": _write(tmp_path / "instances.json", instances),
        "cap_data": captions,
        "inst_data": instances,
    }


def test_coco_records_and_normalised_boxes(coco):
    records = from_coco(coco["captions"], coco["images_dir"], coco["instances"])
    assert [r.id for r in records] == ["coco-1", "coco-2"]
    a, b = records
    assert a.image == "a.png" and a.root == coco["images_dir"]
    assert a.captions == ["A red rectangle on white.", "A small red box."]
    assert [(x.label, x.bbox) for x in a.boxes] == [("red box", (0.1, 0.1, 0.6, 0.6))]
    assert [(x.label, x.bbox) for x in b.boxes] == [("blue box", (0.2, 0.2, 0.8, 1.0))]
    assert b.boxes[0].line() == "blue box: [0.200, 0.200, 0.800, 1.000]"
    assert a.private and a.findings == []
    assert from_coco(coco["captions"], coco["images_dir"])[0].boxes == []
    json.dumps([r.to_json() for r in records])  # plain JSON types only


def test_coco_is_private_unless_said_public(tmp_path, coco):
    """Private by default wherever the files are (a symlink or another folder name changes nothing)."""
    elsewhere = tmp_path / "Private Data" / "coco"
    shutil.copytree(coco["images_dir"], elsewhere / "images")
    (tmp_path / "link").symlink_to(elsewhere / "images")
    for images in (coco["images_dir"], elsewhere / "images", tmp_path / "link"):
        assert all(r.private for r in from_coco(coco["captions"], images))
    assert not any(r.private for r in from_coco(coco["captions"], coco["images_dir"], private=False))


def test_coco_loads_drawn_shapes(tmp_path):
    from kit.ingest.shapes import write_shapes_dataset

    paths = write_shapes_dataset(tmp_path / "shapes", 4, seed=1, size=32)
    records = from_coco(Path(paths["captions"]), Path(paths["root"]), Path(paths["instances"]))
    attrs = json.loads(Path(paths["attributes"]).read_text())
    assert len(records) == 4
    for i, r in enumerate(records):
        x, y, w, h = attrs[f"shape_{i:05d}"]["bbox"]
        assert r.boxes[0].bbox == tuple(round(v / 32, 3) for v in (x, y, x + w, y + h))
        assert (r.root / r.image).is_file()


@pytest.mark.parametrize(
    "which, edit, needles",
    [
        ("inst", lambda d: d["annotations"].append({"id": 77, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}), ["77", "99"]),
        ("cap", lambda d: d["annotations"].append({"id": 78, "image_id": 42, "caption": "x"}), ["78", "42"]),
        ("inst", lambda d: d["annotations"][0].update(bbox=[30, 3, 20, 15]), ["annotation id 20", "40 x 30"]),
        ("inst", lambda d: d["annotations"][1].update(bbox=[-2, 10, 5, 5]), ["annotation id 21", "50 x 50"]),
        ("inst", lambda d: d["images"][1].pop("width"), ["image id 2", "width"]),
        ("cap", lambda d: d["images"][0].pop("height"), ["image id 1", "height"]),
    ],
)
def test_coco_errors_name_file_and_id(coco, which, edit, needles):
    key = "captions" if which == "cap" else "instances"
    data = json.loads(json.dumps(coco["inst_data" if which == "inst" else "cap_data"]))
    edit(data)
    _write(coco[key], data)
    with pytest.raises(KitError) as e:
        from_coco(coco["captions"], coco["images_dir"], coco["instances"])
    msg = str(e.value)
    assert str(coco[key]) in msg and "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_coco_missing_and_invalid_files(coco, tmp_path):
    with pytest.raises(KitError, match="does not exist") as e:
        from_coco(tmp_path / "nope.json", coco["images_dir"])
    assert "nope.json" in str(e.value)
    coco["instances"].write_text('{"images": [1, 2,,]}')
    with pytest.raises(KitError, match="invalid JSON") as e:
        from_coco(coco["captions"], coco["images_dir"], coco["instances"])
    assert str(coco["instances"]) in str(e.value)


# --------------------------------------------------------------------------- manifest


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    _draw(folder / "images" / "one.png", (100, 50), (10, 5, 59, 24))
    _draw(folder / "scans" / "knee" / "two.jpg", (64, 64), (0, 0, 31, 31))
    return folder


def _manifest(folder: Path, *lines) -> None:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    (folder / "manifest.jsonl").write_text(text + "\n")


def test_manifest_happy_path(manifest_dir):
    _manifest(
        manifest_dir,
        {"image": "images/one.png", "captions": ["A red bar.", " A red bar. "], "metadata": {"stain": "none", "n": 1},
         "boxes": [{"label": "bar", "bbox": [10, 5, 60, 25]},
                   {"label": "bar", "bbox": [0.1, 0.1, 0.6, 0.5], "format": "xyxy_norm"},
                   {"label": "bar", "bbox": [10, 5, 50, 20], "format": "xywh_pixels"}]},
        "",
        {"id": "knee-2", "image": "scans/knee/two.jpg", "caption": "A knee.", "findings": "No effusion.", "private": False},
        {"image": "scans/knee/two.jpg", "findings": ["Square top left.", "Square top left."]},
    )
    a, b, c = from_manifest(manifest_dir)
    assert a.id == "images_one" and a.captions == ["A red bar."] and a.private
    assert [x.bbox for x in a.boxes] == [(0.1, 0.1, 0.6, 0.5)] * 3
    assert a.metadata == {"stain": "none", "n": "1"}
    assert a.source.endswith("manifest.jsonl:1")
    assert (b.id, b.captions, b.findings, b.private) == ("knee-2", ["A knee."], ["No effusion."], False)
    assert c.id == "scans_knee_two" and c.findings == ["Square top left."] and c.captions == []


@pytest.mark.parametrize(
    "lines, needle",
    [
        ([{"image": "images/one.png", "caption": "ok"}, '{"image": "images/one.png", "caption": '], "manifest.jsonl:2: invalid JSON"),
        ([{"image": "images/missing.png", "caption": "x"}], "manifest.jsonl:1: image file"),
        ([{"image": "images/one.png", "captoins": ["typo"]}], "manifest.jsonl:1: unknown field(s) captoins"),
        ([{"image": "images/one.png", "boxes": [{"label": "bar", "bbox": [10, 5, 102, 25]}]}], "manifest.jsonl:1: box 'bar'"),
        ([{"image": "images/one.png", "boxes": [{"label": "bar", "bbox": [0, 0, 0.5, 1.1], "format": "xyxy_norm"}]}], "outside the 100 x 50 image"),
        ([{"image": "images/one.png", "boxes": [{"label": "bar", "bbox": [1, 1, 2, 2], "colour": "red"}]}], "unknown box field(s) colour"),
        ([{"image": "images/one.png", "boxes": [{"label": "bar", "bbox": [1, 1, 2, 2], "format": "yolo"}]}], "format 'yolo'"),
        ([{"image": "images/one.png", "caption": "x"}, {"id": "b", "image": "images/one.png", "metadata": {"a": "b"}}], "manifest.jsonl:2: image 'images/one.png' has no captions, findings or boxes"),
        ([{"image": "../outside.png", "caption": "x"}], "manifest.jsonl:1: image path '../outside.png'"),
        ([{"image": "/etc/hosts", "caption": "x"}], "must be relative"),
        ([{"image": "images/one.png", "caption": "x"}, {"image": "images/one.png", "caption": "y"}], "manifest.jsonl:2: duplicate id 'images_one' (first on line 1)"),
        ([{"image": "images/one.png", "caption": "x", "private": "no"}], "'private' must be true or false"),
    ],
)
def test_manifest_errors(manifest_dir, lines, needle):
    _manifest(manifest_dir, *lines)
    with pytest.raises(KitError) as e:
        from_manifest(manifest_dir)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_manifest_missing_and_empty(manifest_dir):
    with pytest.raises(KitError, match="manifest.jsonl does not exist"):
        from_manifest(manifest_dir)
    (manifest_dir / "manifest.jsonl").write_text("\n  \n")
    with pytest.raises(KitError, match="is empty"):
        from_manifest(manifest_dir)


def test_manifest_images_are_fully_decoded_when_read(manifest_dir):
    """A truncated JPEG has a valid header: only decoding every pixel finds it, at check time."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="JPEG")
    (manifest_dir / "images" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _manifest(manifest_dir, {"image": "images/one.png", "boxes": [{"label": "bar", "bbox": [10, 5, 60, 25]}]},
              {"image": "images/cut.jpg", "caption": "x"})
    with pytest.raises(KitError) as e:
        from_manifest(manifest_dir)
    msg = str(e.value)
    assert "manifest.jsonl:2" in msg and "cut.jpg" in msg and "truncated" in msg.lower() and "\n" not in msg


# --------------------------------------------------------------------------- DICOM

DICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm", "liver_1frame.dcm")
MODALITY = {"CT_small.dcm": "CT", "MR_small.dcm": "MR", "JPEG2000.dcm": "nuclear medicine",
            "examples_ybr_color.dcm": "ultrasound", "liver_1frame.dcm": "segmentation"}


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path)


def _rid(rel: str, work: Path) -> str:
    from kit.ingest.sources.dicom import salt_file

    salt = salt_file(work).read_bytes().strip()
    return "dicom-" + hashlib.sha256(salt + b"\0" + rel.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory) -> dict:
    """All test files converted in one call; one lives in a subfolder, one has no extension."""
    import pydicom

    src = tmp_path_factory.mktemp("dicom-src")
    work = tmp_path_factory.mktemp("dicom-work")
    placed, undecodable = {}, {}
    for name in DICOM_FILES:
        path = _testdata(name)
        try:
            pydicom.dcmread(path).pixel_array
        except Exception as e:  # the codec plugin for this transfer syntax is not installed
            undecodable[name] = str(e)
            continue
        rel = {"MR_small.dcm": "series2/MR_small.dcm", "CT_small.dcm": "series1/ct_no_extension"}.get(name, name)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / rel)
        placed[name] = rel
    (src / "README").write_text("not DICOM; ignored because it has no extension\n")
    (src / "notes.txt").write_text("ignored\n")
    # The ultrasound and the secondary-capture NM file have no BurnedInAnnotation tag: checked here.
    records = from_dicom(src, work, burned_in_checked=True)
    return {"src": src, "work": work, "records": {r.id: r for r in records}, "placed": placed, "undecodable": undecodable}


@pytest.mark.parametrize("name", DICOM_FILES)
def test_dicom_png_and_caption(dicom_run, name):
    if name in dicom_run["undecodable"]:
        pytest.skip(f"no codec for {name}: {dicom_run['undecodable'][name]}")
    rec = dicom_run["records"][_rid(dicom_run["placed"][name], dicom_run["work"])]
    assert rec.private and rec.root == dicom_run["work"] and rec.image == f"images/{rec.id}.png"
    img = np.asarray(Image.open(rec.root / rec.image))
    assert img.dtype == np.uint8 and img.max() > img.min() and img.std() > 10
    assert MODALITY[name] in rec.captions[0], rec.captions[0]
    assert rec.metadata["Rows"] == str(img.shape[0]) and rec.metadata["Columns"] == str(img.shape[1])


def test_dicom_specifics(dicom_run):
    recs, placed = dicom_run["records"], dicom_run["placed"]

    def _rid(rel):
        return globals()["_rid"](rel, dicom_run["work"])

    assert len(recs) == len(placed)  # README and notes.txt skipped
    ct = recs[_rid(placed["CT_small.dcm"])]
    assert ct.captions == ["An axial computed tomography (CT) image (128 x 128 pixels); the body part is not recorded."]
    if "examples_ybr_color.dcm" in placed:
        us = recs[_rid(placed["examples_ybr_color.dcm"])]
        rgb = np.asarray(Image.open(us.root / us.image))
        assert rgb.ndim == 3 and rgb.shape[2] == 3
        assert "frame 16 of a 30-frame sequence" in us.captions[0]
    if "JPEG2000.dcm" in placed:
        assert "of the whole body" in recs[_rid(placed["JPEG2000.dcm"])].captions[0]
    seg = recs[_rid(placed["liver_1frame.dcm"])]
    assert seg.findings == ["Segmented region: Liver"]
    assert [b.label for b in seg.boxes] == ["Liver"]
    x1, y1, x2, y2 = seg.boxes[0].bbox
    assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and (x2 - x1) * (y2 - y1) > 0.1
    mask = np.asarray(Image.open(seg.root / seg.image)) > 0  # the box is the mask's extent
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    assert (round(cols[0] / 512, 3), round(rows[0] / 512, 3)) == (x1, y1)


def test_dicom_ids_are_stable_and_salted(dicom_run, tmp_path):
    """The same output folder gives the same ids (resume); another gives others: an id cannot be
    recomputed from a guessed path."""
    again = from_dicom(dicom_run["src"], dicom_run["work"], burned_in_checked=True)
    assert {r.id for r in again} == set(dicom_run["records"])
    elsewhere = from_dicom(dicom_run["src"], tmp_path / "w2", burned_in_checked=True)
    assert not {r.id for r in elsewhere} & set(dicom_run["records"])
    bare = {"dicom-" + hashlib.sha256(rel.encode()).hexdigest()[:12] for rel in dicom_run["placed"].values()}
    assert not bare & set(dicom_run["records"])


@pytest.mark.parametrize("label", ["Liver Roe^Jane", "liver (jane roe)", "J. ROE liver", "Liver - Jahne Row", "ROEJANE"])
def test_free_text_segment_labels_never_reach_the_records(tmp_path, label):
    """A segment label is free text: a name in it, however spelled, must not reach prompts; the
    coded meaning is used instead."""
    import pydicom

    ds = pydicom.dcmread(_testdata("liver_1frame.dcm"))
    ds.PatientName = "Roe^Jane"
    for item in ds.SegmentSequence:
        item.SegmentLabel = label
    src = tmp_path / "src"
    src.mkdir()
    ds.save_as(src / "seg.dcm")
    (rec,) = from_dicom(src, tmp_path / "work")
    said = json.dumps(rec.to_json()).lower()
    assert rec.findings == ["Segmented region: Liver"] and [b.label for b in rec.boxes] == ["Liver"]
    for part in ("roe", "jane", "jahne", "row^", "- jahne"):
        assert part not in said, part


def test_the_id_salt_stays_out_of_the_shared_folder(dicom_run, kit_cache):
    """Whoever receives the converted folder cannot test guessed paths against its ids: the salt
    is in kit's cache, keyed by the folder, and nothing in the folder holds it."""
    from kit.ingest.sources.dicom import salt_file

    salt = salt_file(dicom_run["work"])
    assert salt.is_file() and salt.is_relative_to(kit_cache)
    secret = salt.read_bytes().strip()
    assert len(secret) == 32
    for p in dicom_run["work"].rglob("*"):
        assert not p.name.startswith(".kit-id"), p
        if p.is_file():
            assert secret not in p.read_bytes(), p


def _seg_with_identity(tmp_path: Path, **tags) -> Path:
    import pydicom

    ds = pydicom.dcmread(_testdata("liver_1frame.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID77321", "19700312"
    for k, v in tags.items():
        setattr(ds, k, v)
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    ds.save_as(src / "seg.dcm")
    return src


def test_coded_tags_holding_personal_data_never_reach_the_records(tmp_path):
    """A CS tag can hold any text: a name in BodyPartExamined, the patient ID in ImageType, a name in
    a segment's coded meaning. Only standard terms and numbers that repeat no identity value of the
    file reach the record, and each file says which tags were left out (never their values)."""
    src = _seg_with_identity(tmp_path, BodyPartExamined="JANE DOE 1970", ImageType=["DERIVED", "PRIMARY", "PID77321"],
                             ViewPosition="DOE")
    import pydicom

    ds = pydicom.dcmread(src / "seg.dcm")
    ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Jane Doe lesion"
    ds.save_as(src / "seg.dcm")
    notes: list[str] = []
    (rec,) = from_dicom(src, tmp_path / "work", echo=notes.append)
    said = json.dumps(rec.to_json()).lower()
    for part in ("jane", "doe", "1970", "pid77321"):
        assert part not in said, (part, said)
    assert "BodyPartExamined" not in rec.metadata and rec.metadata["ImageType"] == "DERIVED, PRIMARY"
    assert rec.findings == ["Segmented region: segment 1"] and [b.label for b in rec.boxes] == ["segment 1"]
    assert "the body part is not recorded" in rec.captions[0]
    assert len(notes) == 1 and "BodyPartExamined" in notes[0] and "ImageType" in notes[0] and "ViewPosition" in notes[0]
    assert "jane" not in notes[0].lower() and "pid77321" not in notes[0].lower()


def test_standard_terms_still_reach_the_caption(tmp_path):
    src = _seg_with_identity(tmp_path, BodyPartExamined="LIVER", ImageType=["DERIVED", "PRIMARY"])
    notes: list[str] = []
    (rec,) = from_dicom(src, tmp_path / "work", echo=notes.append)
    assert rec.metadata["BodyPartExamined"] == "LIVER" and "of the liver" in rec.captions[0]
    assert rec.findings == ["Segmented region: Liver"] and notes == []


def test_a_frame_beyond_the_image_limits_is_refused_before_decoding(tmp_path):
    """An 8192 x 8192 frame (a 1 MB RLE file can declare one) would take gigabytes once rendered:
    refused from the header, with the file named, before any pixel is decoded."""
    import tracemalloc

    import pydicom

    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.Rows = ds.Columns = 8192
    src = tmp_path / "src"
    src.mkdir()
    ds.save_as(src / "huge.dcm")
    tracemalloc.start()
    try:
        with pytest.raises(KitError) as e:
            from_dicom(src, tmp_path / "work")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "huge.dcm" in str(e.value) and "8192x8192 pixels" in str(e.value) and "\n" not in str(e.value)
    assert peak < 50 * 2**20, peak
    assert not (tmp_path / "work" / "images").exists()


@pytest.mark.parametrize("name,modality,sop", [
    ("examples_rgb_color.dcm", "US", None),  # ultrasound: names are often burned into the header
    ("CT_small.dcm", "CT", "1.2.840.10008.5.1.4.1.1.7"),  # a secondary capture of a CT
])
def test_images_that_usually_show_text_need_the_burned_in_check(tmp_path, name, modality, sop):
    import pydicom

    ds = pydicom.dcmread(_testdata(name))
    if sop:
        ds.SOPClassUID = sop
    assert "BurnedInAnnotation" not in ds
    src = tmp_path / "src"
    src.mkdir()
    ds.save_as(src / "x.dcm")
    with pytest.raises(KitError) as e:
        from_dicom(src, tmp_path / "work")
    assert "src/x.dcm" in str(e.value) and "BurnedInAnnotation" in str(e.value) and "--burned-in-checked" in str(e.value)
    assert len(from_dicom(src, tmp_path / "work", burned_in_checked=True)) == 1
    ds.BurnedInAnnotation = "NO"
    ds.save_as(src / "x.dcm")
    assert len(from_dicom(src, tmp_path / "work2")) == 1


def test_burned_in_annotation_is_refused_unless_checked(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    src = tmp_path / "src"
    src.mkdir()
    ds.save_as(src / "ct.dcm")
    with pytest.raises(KitError) as e:
        from_dicom(src, tmp_path / "work")
    assert "BurnedInAnnotation is YES" in str(e.value) and "--burned-in-checked" in str(e.value)
    assert not (tmp_path / "work" / "images").exists()
    assert len(from_dicom(src, tmp_path / "work", burned_in_checked=True)) == 1


def _png_outside_pixels(data: bytes) -> bytes:
    """A PNG's bytes minus the compressed pixel stream: text could only hide in the other chunks,
    and a 3-byte value can match compressed pixels by pure chance."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [data[:8]], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        assert kind not in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"), kind
        out.append(data[pos:pos + 8] if kind == b"IDAT" else data[pos:pos + 12 + length])
        pos += 12 + length
    return b"".join(out)


def test_dicom_phi_never_copied(dicom_run):
    # root is our own tmp path (pytest-NNN could match a short value); everything else is checked
    texts = json.dumps([{**r.to_json(), "root": ""} for r in dicom_run["records"].values()])
    written = []
    for p in dicom_run["work"].rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            written.append((p, _png_outside_pixels(data) if p.suffix == ".png" else data))
    assert written
    for name, rel in dicom_run["placed"].items():
        values = [v for v in phi_values(dicom_run["src"] / rel) if len(v) >= 3]
        assert values, name  # the test files do carry names, dates and UIDs
        for v in values:
            assert v not in texts, (name, v)
            for path, data in written:
                assert v.encode() not in data, (name, v, path)


def test_phi_values_finds_identifiers():
    values = phi_values(_testdata("liver_1frame.dcm"))
    assert "JANCT000" in values and "99000" in values and "20030417" in values
    assert "1.2.392.200103.20080913.113635.0.2009.6.22.21.43.10.22941.1" in values


def test_unreadable_dcm_is_named(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.dcm").write_bytes(b"\x00\x01 this is not a dicom file at all" * 3)
    with pytest.raises(KitError) as e:
        from_dicom(tmp_path / "src", tmp_path / "work")
    assert "x.dcm" in str(e.value) and "\n" not in str(e.value)


def test_dicom_folder_without_images(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(KitError, match="no DICOM images"):
        from_dicom(tmp_path / "src", tmp_path / "work")


# --------------------------------------------------------------------------- figures


def test_figures(tmp_path):
    _draw(tmp_path / "figs" / "PMC1" / "f1.png", (30, 30), (1, 1, 5, 5))
    _draw(tmp_path / "figs" / "PMC1" / "f2.png", (30, 30), (1, 1, 5, 5))
    lines = [
        {"id": "PMC1_f1", "image": "PMC1/f1.png", "caption": "Axial CT showing a mass.", "mentions": ["As Figure 1 shows, the mass is large."]},
        {"image": "PMC1/f2.png", "caption": "A second figure."},
    ]
    f = tmp_path / "figures.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    a, b = from_figures(f, tmp_path / "figs")
    assert (a.id, a.captions, a.findings) == ("PMC1_f1", ["Axial CT showing a mass."], ["As Figure 1 shows, the mass is large."])
    assert (b.id, b.image, b.findings) == ("PMC1_f2", "PMC1/f2.png", [])  # default id from the path
    assert a.private and not from_figures(f, tmp_path / "figs", private=False)[0].private
    f.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"image": "PMC1/f1.png", "caption": "x", "mention": []}) + "\n")
    with pytest.raises(KitError, match=r"figures.jsonl:2: unknown field\(s\) mention"):
        from_figures(f, tmp_path / "figs")
    f.write_text(json.dumps({"image": "PMC1/none.png", "caption": "x"}) + "\n")
    with pytest.raises(KitError, match="figures.jsonl:1: image file"):
        from_figures(f, tmp_path / "figs")


# --------------------------------------------------------------------------- stage-1 caption pairs


def test_caption_pairs_one_root(coco, tmp_path):
    from kit.core.cards import Card
    from kit.data.formats import IMAGE_TOKEN, load_samples

    records = from_coco(coco["captions"], coco["images_dir"], coco["instances"])
    out = tmp_path / "out" / "pretrain.json"
    assert write_caption_pairs(records, out, seed=3) == 2
    samples = load_samples(out)
    card = Card.read(out.parent).model_dump(mode="json")
    assert card["kind"] == "data" and card["image_folder"] == str(coco["images_dir"].resolve())
    for s, r in zip(samples, records):
        assert s.image == r.image and (Path(card["image_folder"]) / s.image).is_file()
        assert s.turns[0][1].startswith(IMAGE_TOKEN + "\n")
        assert s.turns[0][1][len(IMAGE_TOKEN) + 1:] in CAPTION_INSTRUCTIONS
        assert s.turns[1] == ("assistant", r.captions[0])
    first = out.read_bytes()
    write_caption_pairs(records, out, seed=3)
    assert out.read_bytes() == first


def test_caption_pairs_mixed_roots(coco, manifest_dir, tmp_path):
    from kit.core.cards import Card
    from kit.data.formats import IMAGE_TOKEN, load_samples

    _manifest(manifest_dir, {"image": "images/one.png", "caption": "A red bar."}, {"image": "scans/knee/two.jpg", "findings": "no caption"})
    records = from_coco(coco["captions"], coco["images_dir"]) + from_manifest(manifest_dir)
    out = tmp_path / "stage1" / "pairs.jsonl"
    assert write_caption_pairs(records, out) == 3  # the findings-only record has no caption
    folder = Path(Card.read(out.parent).image_folder)
    samples = load_samples(out)
    assert [s.id for s in samples] == ["coco-1", "coco-2", "images_one"]
    for s in samples:
        assert s.turns[0][1].startswith(IMAGE_TOKEN) and (folder / s.image).is_file()
    assert Card.read(out.parent).private is True


def test_caption_pairs_inside_data_folder_need_no_image_folder(manifest_dir):
    from kit.data.formats import load_samples

    _manifest(manifest_dir, {"image": "images/one.png", "caption": "A red bar."})
    out = manifest_dir / "stage1.json"
    write_caption_pairs(from_manifest(manifest_dir), out)
    assert load_samples(out)[0].image == "images/one.png"


def test_caption_pairs_errors(coco, tmp_path):
    records = from_coco(coco["captions"], coco["images_dir"])
    with pytest.raises(KitError, match="share id 'coco-1'"):
        write_caption_pairs(records + records[:1], tmp_path / "x.json")
    for r in records:
        r.captions = []
    with pytest.raises(KitError, match="no record has a caption"):
        write_caption_pairs(records, tmp_path / "x.json")


def test_undecodable_pixels_give_one_line_error(tmp_path, monkeypatch):
    import pydicom.pixels

    def no_codec(*a, **k):
        raise RuntimeError("Unable to decode the pixel data\nThe following plugins are missing:\n  pylibjpeg")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_codec)
    (tmp_path / "src").mkdir()
    shutil.copy(_testdata("CT_small.dcm"), tmp_path / "src" / "scan.dcm")
    with pytest.raises(KitError) as e:
        from_dicom(tmp_path / "src", tmp_path / "work")
    msg = str(e.value)
    assert "scan.dcm" in msg and "pylibjpeg" in msg and "\n" not in msg
