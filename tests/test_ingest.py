"""`kit data ingest`: stage-1 caption pairs that train as they are."""

from __future__ import annotations

import json
import shutil

from pydicom.data import get_testdata_file

from kit.data.dataset import build_dataset, default_image_folder
from kit.data.formats import load_samples
from kit.ingest.sources import phi_values
from helpers import run_cli


def test_dicom_ingest_writes_trainable_caption_pairs_without_phi(capsys, tmp_path, tiny_base):
    from transformers import AutoProcessor

    src = tmp_path / "dicom"
    src.mkdir()
    files = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm")]
    for f in files:
        shutil.copy(f, src)
    out = tmp_path / "pairs" / "stage1.json"
    code, stdout, err = run_cli(capsys, "data", "ingest", "--source", "dicom", "--input", str(src), "--out", str(out))
    assert code == 0, err
    samples = load_samples(out)
    assert len(samples) == 2 and all(s.turns[0][1].startswith("<image>\n") for s in samples)
    assert any("CT" in s.turns[1][1] or "computed tomography" in s.turns[1][1] for s in samples)
    ds, report = build_dataset(out, AutoProcessor.from_pretrained(tiny_base), "plain", 256, "pad")
    assert len(ds) == 2 and not report.problems
    text = out.read_text() + json.dumps(json.loads((out.parent / "kit.json").read_text()))
    for f in files:
        for value in phi_values(f):
            if len(value) >= 3:
                assert value not in text
    assert not list(out.parent.glob(".ingest.*"))
    assert default_image_folder(out).resolve() == out.parent.resolve()


def test_ingest_error_leaves_nothing(capsys, tmp_path):
    src = tmp_path / "dicom"
    src.mkdir()
    (src / "broken.dcm").write_bytes(b"not a dicom file at all")
    out = tmp_path / "pairs" / "stage1.json"
    code, _, err = run_cli(capsys, "data", "ingest", "--source", "dicom", "--input", str(src), "--out", str(out))
    assert code == 2 and "broken.dcm" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list((tmp_path / "pairs").glob(".ingest.*"))
