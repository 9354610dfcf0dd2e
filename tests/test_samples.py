"""`kit.ingest.samples.write`: the medical sample built from images that ship inside installed packages."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kit.ingest.samples import texts
from kit.ingest.samples import write as samples
from kit.ingest.samples.write import SAMPLE_DOMAINS, write_sample
from kit.core.errors import KitError
from kit.ingest.sources import from_manifest, phi_values

SOURCE_DICOMS = (
    "CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "JPEG2000.dcm",
    "examples_rgb_color.dcm", "examples_ybr_color.dcm", "liver_1frame.dcm",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two independent writes of the same sample; the second goes into an existing empty folder."""
    root = tmp_path_factory.mktemp("samples")
    first = root / "a" / "medical"
    card = write_sample("medical", first)
    second = root / "b"
    second.mkdir()
    write_sample("medical", second)
    return first, second, card


@pytest.fixture(scope="module")
def out(runs):
    return runs[0]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _eval(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines() if line.strip()]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_manifest_reads_as_private_captioned_records(out, runs):
    records = from_manifest(out)
    assert len(records) >= 20
    assert all(r.private for r in records)
    assert all(r.captions and all(c.strip() for c in r.captions) for r in records)
    assert all(r.findings and r.metadata.get("modality") for r in records)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r.image).name for r in records)
    card = json.loads((out / "kit.json").read_text())
    assert card["kind"] == "data" and card["made_by"] == "kit data sample medical"
    assert card["images"] == len(records) and card == runs[2].model_dump(mode="json", exclude_unset=True)
    assert (out / "README.md").read_text().count("Licence:") == card["base_images"]


def test_eval_items_are_balanced_and_point_at_base_images(out):
    items = _eval(out)
    base_ids = {m["id"] for m in _manifest(out) if "-aug" not in m["id"]}
    assert len({q["id"] for q in items}) == len(items)
    for q in items:
        assert set(q) == {"id", "image", "question", "answer", "answer_type"}
        assert (out / q["image"]).is_file()
        assert Path(q["image"]).stem in base_ids
        assert q["question"].endswith("?") and q["answer"].strip()
        assert q["answer_type"] in ("closed", "open")
        if q["answer_type"] == "closed":
            assert q["answer"] in ("yes", "no")
        else:
            assert q["answer"] not in ("yes", "no")
    closed = [q for q in items if q["answer_type"] == "closed"]
    assert 0.35 <= sum(q["answer"] == "yes" for q in closed) / len(closed) <= 0.65
    assert any(q["answer_type"] == "open" for q in items)
    per_image = Counter(q["image"] for q in items)
    assert set(per_image) == {f"images/{b}.png" for b in base_ids}
    assert all(4 <= n <= 6 for n in per_image.values())


def test_pngs_have_real_contrast(out):
    for png in sorted((out / "images").glob("*.png")):
        with Image.open(png) as im:
            assert not im.text  # no metadata chunks at all
            assert float(np.asarray(im).std()) > 10, png.name


def test_no_identifying_dicom_value_in_any_written_file(out):
    from pydicom.data import get_testdata_file

    values: set[str] = set()
    for name in SOURCE_DICOMS:
        path = get_testdata_file(name, download=False)
        if path is not None:
            values |= {v for v in phi_values(Path(path)) if len(v) >= 3}
    assert len(values) > 50  # names, IDs, dates, institutions and UIDs of seven files
    for rel, data in _files(out).items():
        leaked = sorted(v for v in values if v.encode("utf-8") in data)
        assert not leaked, f"{rel} contains {leaked}"


def test_burned_in_lettering_is_blacked_out(out):
    lymph = np.asarray(Image.open(out / "images" / "us-lymph-node.png"))
    assert not lymph[:54].any() and not lymph[168:].any()  # header and footer lettering
    echo = np.asarray(Image.open(out / "images" / "us-echo.png"))
    assert not echo[:12].any() and not echo[:, :44].any()  # the corner that shows the patient-name field
    assert lymph.std() > 10 and echo.std() > 10


def test_liver_box_matches_the_mask(out):
    records = {r.id: r for r in from_manifest(out)}
    liver = records["seg-liver"]
    assert [b.label for b in liver.boxes] == ["liver"]
    x1, y1, x2, y2 = liver.boxes[0].bbox
    assert 0.2 < x2 - x1 < 0.9 and 0.2 < y2 - y1 < 0.9
    assert (x1 + x2) / 2 < 0.5  # image left in the radiological display: the patient's right
    mask = np.asarray(Image.open(out / liver.image)) > 0
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    h, w = mask.shape
    assert (x1, y1, x2, y2) == pytest.approx((cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h), abs=0.002)
    assert any("right upper abdomen" in f for f in liver.findings)


def test_flipped_variants_mirror_boxes_and_drop_side_statements(out):
    records = {r.id: r for r in from_manifest(out)}
    flipped = []
    for rid, r in records.items():
        if "-aug" not in rid:
            continue
        base = records[rid.split("-aug")[0]]
        a, b = np.asarray(Image.open(out / base.image)), np.asarray(Image.open(out / r.image))
        if a.shape == b.shape and np.array_equal(a[:, ::-1], b):
            flipped.append(rid)
            text = " ".join(r.captions + r.findings + list(r.metadata.values())).lower()
            assert not re.search(r"\b(left|right)\b", text), rid
            assert [(bx.label, (round(1 - bx.bbox[2], 3), bx.bbox[1], round(1 - bx.bbox[0], 3), bx.bbox[3])) for bx in base.boxes] == [
                (bx.label, pytest.approx(bx.bbox, abs=0.002)) for bx in r.boxes
            ]
    assert {"seg-liver-aug2", "fundus-retina-aug1", "cell-phase-aug2"} <= set(flipped)
    assert records["fundus-retina"].metadata["laterality"] == "left eye"
    assert "laterality" not in records["fundus-retina-aug1"].metadata


def test_same_bytes_on_every_run(runs):
    first, second, _ = runs
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    for rel in a:
        if rel != "kit.json":
            assert a[rel] == b[rel], rel
    card_a, card_b = json.loads(a["kit.json"]), json.loads(b["kit.json"])
    card_a.pop("created"), card_b.pop("created")
    assert card_a == card_b


def test_existing_non_empty_out_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KitError, match="not an empty folder"):
        write_sample("medical", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(KitError):
        write_sample("medical", tmp_path / "file")


def test_unknown_domain_lists_the_known_ones(tmp_path):
    with pytest.raises(KitError) as e:
        write_sample("astronomy", tmp_path / "x")
    assert all(d in str(e.value) for d in SAMPLE_DOMAINS)
    assert not (tmp_path / "x").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real = samples._encode_png
    calls = []

    def failing(pixels, phi):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("disk full")
        return real(pixels, phi)

    monkeypatch.setattr(samples, "_encode_png", failing)
    with pytest.raises(OSError):
        write_sample("medical", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_file_or_codec_is_skipped_not_fatal(tmp_path, monkeypatch):
    import pydicom.data
    import pydicom.pixels

    real_get, real_decode = pydicom.data.get_testdata_file, pydicom.pixels.pixel_array

    def get(name, *args, **kwargs):
        return None if name == "693_J2KI.dcm" else real_get(name, *args, **kwargs)

    def decode(ds, *args, **kwargs):
        if ds.file_meta.TransferSyntaxUID.name.startswith("JPEG 2000"):
            raise RuntimeError("no JPEG 2000 plugin")  # what a Pillow without OpenJPEG gives
        return real_decode(ds, *args, **kwargs)

    monkeypatch.setattr(pydicom.data, "get_testdata_file", get)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", decode)
    card = write_sample("medical", tmp_path / "out")
    assert [s.split(":")[0] for s in card.skipped] == ["693_J2KI.dcm", "JPEG2000.dcm"]
    ids = {r.id for r in from_manifest(tmp_path / "out")}
    assert len(ids) >= 20 and not any(i.startswith(("ct-head", "nm-bone")) for i in ids)
    assert "Skipped in this installation" in (tmp_path / "out" / "README.md").read_text()
    assert not any(q["image"].startswith(("images/ct-head", "images/nm-bone")) for q in _eval(tmp_path / "out"))


def test_text_file_entries_are_checked(tmp_path):
    """A mistyped key, a lost entry or an unquoted yes (a YAML boolean) in the texts fails, naming the entry."""
    import yaml

    good = yaml.safe_load(texts.TEXTS_FILE.read_text(encoding="utf-8"))
    assert texts.load_texts() == good
    path = tmp_path / "medical_sample.yaml"

    def fails(data, *words):
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        with pytest.raises(RuntimeError) as e:
            texts.load_texts(path)
        assert all(w in str(e.value) for w in words), str(e.value)

    bad = copy.deepcopy(good)
    bad["ct-head"]["finding"] = bad["ct-head"].pop("findings")
    fails(bad, "'ct-head'", "missing keys ['findings']", "unknown keys ['finding']")
    bad = copy.deepcopy(good)
    del bad["nm-bone"]
    fails(bad, "missing ['nm-bone']")
    bad = copy.deepcopy(good)
    bad["cell-phase"]["qa"][0][1] = True
    fails(bad, "'cell-phase'", "quote")


def test_data_check_reports_on_a_manifest_folder_before_generation(capsys, tmp_path, tiny_base):
    """`kit data check --data FOLDER` works on the layout users are told to use, before any
    conversation exists, and stops on a broken manifest line with its line number."""
    import shutil

    from helpers import run_cli

    folder = tmp_path / "mine"
    write_sample("medical", folder)
    code, report, err = run_cli(capsys, "data", "check", "--recipe", "medical", "--base", str(tiny_base), "--data", str(folder), "--gpu", "24GB")
    assert code == 0, err
    assert "36 images (12 distinct" in report
    assert re.search(r"split: +9 images train, 3 held out", report)
    assert re.search(r"eval: +eval.jsonl: 70 questions, 18 about held-out images", report)
    assert "not generated yet" in report and "on a 24GB card: fits" in report

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    lines = (broken / "manifest.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"image"', '"imgae"')
    (broken / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    code, report, err = run_cli(capsys, "data", "check", "--recipe", "medical", "--base", str(tiny_base), "--data", str(broken))
    assert code == 2
    assert "manifest.jsonl:5" in err and len(err.strip().splitlines()) == 1
