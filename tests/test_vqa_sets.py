"""VQA-RAD, SLAKE and PathVQA in their published layouts -> kit eval / training files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from kit.core.errors import KitError
from kit.data.formats import load_samples
from kit.data.vqa import load_items
from kit.ingest.vqa_sets import import_vqa_set, read_plain_pickle, read_vqa_set


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (40, 40, 40)).save(path)


def _vqa_rad(root: Path) -> Path:
    for name in ("synpic1.jpg", "synpic2.jpg"):
        _img(root / "VQA_RAD Image Folder" / name)
    rows = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "Yes", "answer_type": "CLOSED", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Which lobe?", "answer": "right upper lobe", "answer_type": "OPEN", "phrase_type": "para"},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "How many ribs are broken?", "answer": 2, "answer_type": "OPEN ", "phrase_type": "test_freeform"},
        {"qid": 4, "image_name": "synpic2.jpg", "question": "Is this a CT?", "answer": "no", "answer_type": "CLOSED", "phrase_type": "test_para"},
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return root


def _slake(root: Path) -> Path:
    _img(root / "imgs" / "xmlab1" / "source.jpg")
    base = {"img_name": "xmlab1/source.jpg", "img_id": 1}
    (root / "train.json").write_text(json.dumps([
        {**base, "qid": 10, "question": "Which side is abnormal?", "answer": "Left", "answer_type": "CLOSED", "q_lang": "en"},
        {**base, "qid": 11, "question": "哪侧异常?", "answer": "左", "answer_type": "CLOSED", "q_lang": "zh"},
    ]))
    (root / "test.json").write_text(json.dumps([
        {**base, "qid": 12, "question": "What modality is used?", "answer": "CT", "answer_type": "CLOSED", "q_lang": "en"},
        {**base, "qid": 13, "question": "Which organ is shown?", "answer": "Liver", "answer_type": "OPEN", "q_lang": "en"},
    ]))
    return root


def _pathvqa(root: Path) -> Path:
    for split in ("train", "test"):
        _img(root / "images" / split / f"{split}_0001.jpg")
        qa = [{"image": f"{split}_0001", "question": "Is there necrosis?", "answer": "yes"},
              {"image": f"{split}_0001", "question": "What is present?", "answer": "granulomas"}]
        (root / "qas" / split).mkdir(parents=True)
        (root / "qas" / split / f"{split}_qa.pkl").write_bytes(pickle.dumps(qa))
    return root


def test_vqa_rad_uses_the_published_test_split(tmp_path):
    images, splits = read_vqa_set("vqa-rad", _vqa_rad(tmp_path / "rad"))
    assert [r["id"] for r in splits["test"]] == ["vqarad-3", "vqarad-4"]
    assert [r["answer_type"] for r in splits["train"]] == ["closed", "open"]
    assert splits["test"][0]["answer"] == "2" and splits["test"][0]["answer_type"] == "open"
    assert images.name == "VQA_RAD Image Folder"


def test_import_writes_eval_and_training_files_that_kit_reads(tmp_path):
    counts = import_vqa_set("slake", _slake(tmp_path / "Slake1.0"), tmp_path / "out")
    assert counts == {"train": 1, "test": 2}  # the Chinese question is left out by default
    items = load_items(tmp_path / "out" / "test.jsonl")
    assert [(i.answer, i.answer_type) for i in items] == [("CT", "closed"), ("Liver", "open")]
    assert items[0].image.is_file()
    samples = load_samples(tmp_path / "out" / "train.json")
    assert samples[0].turns == [("user", "<image>\nWhich side is abnormal?"), ("assistant", "Left")]
    card = json.loads((tmp_path / "out" / "kit.json").read_text())
    assert card["private"] is True and Path(card["image_folder"]).name == "imgs"
    assert import_vqa_set("slake", tmp_path / "Slake1.0", tmp_path / "all", language="all")["train"] == 2
    with pytest.raises(KitError, match="exists and is not an empty folder"):
        import_vqa_set("slake", tmp_path / "Slake1.0", tmp_path / "out")


def test_pathvqa_pickles_are_read_as_plain_data(tmp_path):
    images, splits = read_vqa_set("pathvqa", _pathvqa(tmp_path / "pvqa"))
    assert [r["answer_type"] for r in splits["test"]] == ["closed", "open"]
    assert (images / splits["test"][0]["image"]).is_file()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kit-evil-pickle-ran",))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = Path("/tmp/kit-evil-pickle-ran")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"image": "x", "question": "q", "answer": _Evil()}]))
    with pytest.raises(KitError, match=r"evil\.pkl: the pickle holds a Python object \((posix|os)\.system\)"):
        read_plain_pickle(path)
    assert not marker.exists()
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps([{"a": "b"}])[:-3])
    with pytest.raises(KitError, match="not a readable pickle"):
        read_plain_pickle(tmp_path / "cut.pkl")


# Crafted pickles that hold no class yet fail inside the unpickler with errors other than
# UnpicklingError: each is a one-line KitError naming the file.
CRAFTED_PICKLES = {
    "build-on-a-list": b"\x80\x02]}b.",  # BUILD on a list: AttributeError
    "huge-bytes": b"\x80\x04\x8e" + (2**64 - 1).to_bytes(8, "little") + b"x.",  # OverflowError
    "huge-text": b"\x80\x04\x8d" + (2**62).to_bytes(8, "little") + b"x.",  # MemoryError or truncated
    "huge-long": b"\x80\x02\x8b" + (2**31 - 1).to_bytes(4, "little") + b".",
    "bad-int": b"\x80\x02I1x\n.",
}


@pytest.mark.parametrize("name", sorted(CRAFTED_PICKLES))
def test_crafted_pickles_are_one_line_errors(tmp_path, name):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(CRAFTED_PICKLES[name])
    with pytest.raises(KitError) as err:
        read_plain_pickle(path)
    assert f"{name}.pkl: not a readable pickle" in str(err.value) and "\n" not in str(err.value)


def test_bad_layouts_name_the_file_and_record(tmp_path):
    root = _vqa_rad(tmp_path / "rad")
    rows = json.loads((root / "VQA_RAD Dataset Public.json").read_text())
    rows[1]["answer_type"] = "MAYBE"
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(KitError, match=r"Public\.json\[1\]: answer_type must be OPEN or CLOSED \(got 'MAYBE'\)"):
        read_vqa_set("vqa-rad", root)
    rows[1]["answer_type"] = "OPEN"
    rows[2]["question"] = None
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(KitError, match=r"Public\.json\[2\]: field 'question' must be a non-empty text"):
        read_vqa_set("vqa-rad", root)
    (root / "VQA_RAD Image Folder" / "synpic2.jpg").unlink()
    rows[2]["question"] = "Q?"
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(KitError, match="vqa-rad test question vqarad-3: image .*synpic2.jpg is missing"):
        read_vqa_set("vqa-rad", root)
    rows[2]["image_name"] = "../outside.jpg"
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(KitError, match="vqa-rad test question vqarad-3: image path '../outside.jpg' escapes the image folder"):
        read_vqa_set("vqa-rad", root)
    with pytest.raises(KitError, match="no train.json"):
        read_vqa_set("slake", tmp_path)
    with pytest.raises(KitError, match="unknown VQA set 'mimic'"):
        read_vqa_set("mimic", tmp_path)
    assert not (tmp_path / "never").exists()
    with pytest.raises(KitError):
        import_vqa_set("vqa-rad", root, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_import(tmp_path, capsys):
    from helpers import run_cli

    code, out, err = run_cli(capsys, "data", "import-vqa", "pathvqa", str(_pathvqa(tmp_path / "pvqa")), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "train 2 questions, test 2 questions" in out and (tmp_path / "o" / "test.jsonl").is_file()
    code, out, err = run_cli(capsys, "data", "import-vqa", "pathvqa", str(tmp_path / "nope"), "--out", str(tmp_path / "p"))
    assert code != 0 and "is not a folder" in err and "Traceback" not in err
