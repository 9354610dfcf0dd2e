"""A battery of malformed inputs, as a careless user or an attacker would give them, through the CLI.

Every case must end with a non-zero exit and exactly one `error:` line that names the file (and
line, index or field) and says how to fix it: no traceback, no "unexpected", and no output folder
or file left behind. (kit serve's malformed requests are in test_serve.py: 4xx, never 500.)
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from helpers import run_cli

GOOD_TURNS = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Blue."}]


def _png(path: Path, size=(16, 16)) -> Path:
    Image.new("RGB", size, (0, 90, 200)).save(path)
    return path


def _bomb_png(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit PNG of w x h that is a few KB on disk (its rows compress to almost nothing)."""
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * ((w + 7) // 8) for _ in range(h)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _data(root: Path, records, name="data.json") -> Path:
    _png(root / "ok.png")
    f = root / name
    if isinstance(records, (bytes, str)):
        f.write_bytes(records if isinstance(records, bytes) else records.encode())
    else:
        f.write_text(json.dumps(records))
    return f


def _sample(image="ok.png", turns=None, sid="a", **extra):
    rec = {"id": sid, "conversations": turns if turns is not None else GOOD_TURNS, **extra}
    if image is not None:
        rec["image"] = image
    return rec


# ------------------------------------------------------------------------- training data files
# (case, records or a function of the folder, expected message)
DATA_CASES = [
    ("missing image", [_sample("nope.png")], r"data\.json\[0\]: sample 'a': image file .*nope\.png is missing"),
    ("corrupt image", lambda r: (r / "bad.png").write_bytes(b"garbage") and [_sample("bad.png")],
     r"data\.json\[0\]: sample 'a': image file .*bad\.png is not an image kit reads"),
    ("truncated JPEG", lambda r: _truncated_jpeg(r / "cut.jpg") and [_sample("cut.jpg")], r"sample 'a': image file .*cut\.jpg .*[Tt]runcated"),
    ("decompression bomb", lambda r: _bomb_png(r / "bomb.png", 30000, 30000) and [_sample("bomb.png")],
     r"sample 'a': image file .*bomb\.png is far larger than kit takes"),
    ("extreme shape", lambda r: _bomb_png(r / "strip.png", 40000, 1000) and [_sample("strip.png")],
     r"sample 'a': image file .*strip\.png is 40000x1000 pixels"),
    ("EPS file", lambda r: (r / "fig.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n") and [_sample("fig.eps")],
     r"sample 'a': image file .*fig\.eps is not an image kit reads \(formats: PNG"),
    ("NUL in image path", [_sample("ok\x00.png")], r"data\.json\[0\]: sample 'a': image path 'ok\\x00\.png' is not a usable file name"),
    ("path escapes folder", [_sample("../outside.png")], r"sample 'a': image path '\.\./outside\.png' escapes the image folder"),
    ("absolute image path", [_sample("/etc/passwd")], r"sample 'a': image path '/etc/passwd' escapes the image folder"),
    ("image is a number", [_sample(123)], r"data\.json\[0\]: sample 'a': field 'image' must be a relative path"),
    ("image list with a blank", [_sample(["ok.png", ""])], r"data\.json\[0\]: sample 'a': field 'image' must be a relative path"),
    ("not a list", {"id": "a"}, r"data\.json: expected a JSON list of samples"),
    ("sample not an object", ["just text"], r"data\.json\[0\]: a sample must be a JSON object"),
    ("no conversations", [{"id": "a", "image": "ok.png"}], r"data\.json\[0\]: field 'conversations' must be a non-empty list"),
    ("empty conversations", [_sample(turns=[])], r"data\.json\[0\]: field 'conversations' must be a non-empty list"),
    ("turn without value", [_sample(turns=[{"from": "human"}])], r"sample 'a': conversations\[0\] needs 'from' and 'value'"),
    ("unknown role", [_sample(turns=[{"from": "bot", "value": "x"}])], r"sample 'a': conversations\[0\]\.from 'bot' is not human/gpt"),
    ("role is a list", [_sample(turns=[{"from": ["human"], "value": "x"}])], r"sample 'a': conversations\[0\]\.from .* is not human/gpt"),
    ("value not a string", [_sample(turns=[{"from": "human", "value": 5}])], r"sample 'a': conversations\[0\]\.value must be a string"),
    ("duplicate ids", [_sample(), _sample()], r"data\.json\[1\]: duplicate sample id 'a'"),
    ("<image> in an answer", [_sample(turns=[GOOD_TURNS[0], {"from": "gpt", "value": "<image> blue"}])],
     r"sample 'a': turn 2 is an answer that holds <image>"),
    ("two placeholders, one image", [_sample(turns=[{"from": "human", "value": "<image><image>?"}, GOOD_TURNS[1]])],
     r"sample 'a': 2 <image> placeholders for 1 image"),
    ("special token in text", [_sample(turns=[GOOD_TURNS[0], {"from": "gpt", "value": "Blue.<|im_end|> more"}])],
     r"sample 'a': turn 2 \(assistant\) holds the text '<\|im_end\|>'"),
    ("empty file", [], r"data\.json holds no samples"),
    ("invalid JSON", "[{\"id\": ", r"data\.json.*(invalid JSON|not valid JSON)"),
    ("non-UTF-8 file", b"\xff\xfe\x00[", r"data\.json.*(UTF-8|invalid JSON|not valid JSON)"),
    ("corrupt kit.json beside data", lambda r: (r / "kit.json").write_text("{oops") and [_sample()], r"kit\.json"),
    ("image tokens truncated", [_sample(turns=[GOOD_TURNS[0], {"from": "gpt", "value": "word " * 400}])],
     r"sample 'a': image tokens would be truncated"),
]


@pytest.mark.parametrize("case,records,expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_training_data(capsys, tmp_path, tiny_base, case, records, expected):
    root = tmp_path / "d"
    root.mkdir()
    records = records(root) if callable(records) else records
    data = _data(root, records)
    extra = ["--set", "data.max_length=40"] if case == "image tokens truncated" else []
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-finetune", "--base", str(tiny_base), "--data", str(data),
                           "--out", str(out), "--max-steps", "1", *extra)
    _assert_clean(code, err, expected)
    assert not out.exists()


def test_jsonl_line_numbers(capsys, tmp_path, tiny_base):
    root = tmp_path / "d"
    root.mkdir()
    data = _data(root, json.dumps(_sample()) + "\n{\"id\": \"b\", oops}\n", "data.jsonl")
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-finetune", "--base", str(tiny_base), "--data", str(data),
                           "--out", str(tmp_path / "out"))
    _assert_clean(code, err, r"data\.jsonl:2: invalid JSON")


# ------------------------------------------------------------------------------------- recipes

RECIPE_CASES = [
    ("unknown recipe", ["--recipe", "nope"], r"unknown recipe 'nope'; available:"),
    ("unknown key", ["--set", "train.learning_rate=1e-4"], r"unknown key 'train\.learning_rate'"),
    ("bad value", ["--set", "train.lr=fast"], r"train\.lr"),
    ("huge seed", ["--set", "train.seed=1180591620717411303424"], r"train\.seed"),
    ("no = in --set", ["--set", "train.lr"], r"--set 'train\.lr': expected key=value"),
]


@pytest.mark.parametrize("case,args,expected", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_options(capsys, tmp_path, tiny_base, case, args, expected):
    data = _data(tmp_path, [_sample()])
    recipe = [] if args[0] == "--recipe" else ["--recipe", "llava15-finetune"]
    code, _, err = run_cli(capsys, "finetune", *recipe, *args, "--base", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "o"))
    _assert_clean(code, err, expected)
    assert not (tmp_path / "o").exists()


RECIPE_FILES = [
    ("non-UTF-8 recipe", b"name: x\nstage: finetune\ndescription: \xff\xfe\n", r"r\.yaml.*UTF-8"),
    ("YAML syntax error", b"name: x\nstage: [finetune\n", r"r\.yaml.*(YAML|line)"),
    ("recipe not a mapping", b"- just\n- a list\n", r"r\.yaml.*mapping"),
]


@pytest.mark.parametrize("case,content,expected", RECIPE_FILES, ids=[c[0] for c in RECIPE_FILES])
def test_recipe_files(capsys, tmp_path, case, content, expected):
    (tmp_path / "r.yaml").write_bytes(content)
    code, _, err = run_cli(capsys, "recipes", "show", str(tmp_path / "r.yaml"))
    _assert_clean(code, err, expected)


# ---------------------------------------------------------------------------- manifest folders

MANIFEST_CASES = [
    ("no image field", {"caption": "x"}, r"manifest\.jsonl:1: missing 'image'"),
    ("unknown field", {"image": "images/a.png", "caption": "x", "patient": "Jane"}, r"manifest\.jsonl:1: unknown field"),
    ("box outside image", {"image": "images/a.png", "boxes": [{"label": "x", "bbox": [0, 0, 500, 500]}]}, r"manifest\.jsonl:1: .*box"),
    ("image outside folder", {"image": "../a.png", "caption": "x"}, r"manifest\.jsonl:1: image path '\.\./a\.png' must be relative"),
    ("truncated image", {"image": "images/cut.jpg", "caption": "x"}, r"manifest\.jsonl:1: image file .*cut\.jpg .*[Tt]runcated"),
    ("private not a bool", {"image": "images/a.png", "caption": "x", "private": "no"}, r"manifest\.jsonl:1: 'private' must be true or false"),
    ("invalid JSON line", "{\"image\": ", r"manifest\.jsonl:1: invalid JSON"),
]


@pytest.mark.parametrize("case,line,expected", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_folders(capsys, tmp_path, tiny_base, case, line, expected):
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    _png(root / "images" / "a.png", (64, 64))
    _truncated_jpeg(root / "images" / "cut.jpg")
    (root / "manifest.jsonl").write_text((line if isinstance(line, str) else json.dumps(line)) + "\n")
    code, _, err = run_cli(capsys, "data", "check", "--recipe", "medical", "--base", str(tiny_base), "--data", str(root))
    _assert_clean(code, err, expected)
    assert not (root / ".kit").exists()


# ------------------------------------------------------------------------------------- COCO

def _coco(root: Path, images: list, anns: list | None = None) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    _png(root / "imgs" / "a.png", (32, 32))
    f = root / "captions.json"
    f.write_text(json.dumps({"images": images, "annotations": anns if anns is not None else [{"id": 1, "image_id": 1, "caption": "a dog"}]}))
    return f


COCO_CASES = [
    ("list image id", [{"id": [1], "file_name": "a.png", "width": 32, "height": 32}], None, r"captions\.json: images\[0\]\.id is list"),
    ("file_name escapes", [{"id": 1, "file_name": "../../etc/passwd", "width": 32, "height": 32}], None,
     r"captions\.json: image id 1: file_name '\.\./\.\./etc/passwd' must be a path inside the images folder"),
    ("no width", [{"id": 1, "file_name": "a.png", "height": 32}], None, r"captions\.json: image id 1 lacks a positive integer width/height"),
    ("annotation image_id a list", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
     [{"id": 1, "image_id": [1], "caption": "x"}], r"captions\.json: annotation id 1 refers to image_id \[1\]"),
]


@pytest.mark.parametrize("case,images,anns,expected", COCO_CASES, ids=[c[0] for c in COCO_CASES])
def test_coco(capsys, tmp_path, case, images, anns, expected):
    f = _coco(tmp_path, images, anns)
    out = tmp_path / "out" / "pairs.json"
    code, _, err = run_cli(capsys, "data", "ingest", "--source", "coco", "--input", str(f), "--images", str(tmp_path / "imgs"),
                           "--out", str(out))
    _assert_clean(code, err, expected)
    assert not out.exists()


def test_coco_not_coco(capsys, tmp_path):
    f = tmp_path / "captions.json"
    f.write_text(json.dumps([1, 2]))
    (tmp_path / "imgs").mkdir()
    code, _, err = run_cli(capsys, "data", "ingest", "--source", "coco", "--input", str(f), "--images", str(tmp_path / "imgs"),
                           "--out", str(tmp_path / "p.json"))
    _assert_clean(code, err, r"captions\.json: not a COCO annotation file")


# ------------------------------------------------------------------------------------- DICOM

def test_dicom_cases(capsys, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    src = tmp_path / "dcm"
    src.mkdir()
    (src / "broken.dcm").write_bytes(b"not dicom at all")
    code, _, err = run_cli(capsys, "data", "ingest", "--source", "dicom", "--input", str(src), "--out", str(tmp_path / "o" / "p.json"))
    _assert_clean(code, err, r"broken\.dcm")
    (src / "broken.dcm").unlink()
    code, _, err = run_cli(capsys, "data", "ingest", "--source", "dicom", "--input", str(src), "--out", str(tmp_path / "o" / "p.json"))
    _assert_clean(code, err, r"no DICOM images under")
    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom test files are not installed")
    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(src / "ct.dcm")
    code, _, err = run_cli(capsys, "data", "ingest", "--source", "dicom", "--input", str(src), "--out", str(tmp_path / "o" / "p.json"))
    _assert_clean(code, err, r"BurnedInAnnotation is YES.*--burned-in-checked")
    assert not (tmp_path / "o" / "p.json").exists() and not list((tmp_path / "o").glob("images/*"))


# --------------------------------------------------------------------------- merge and eval

def test_merge_cases(capsys, tmp_path, tiny_base):
    code, _, err = run_cli(capsys, "merge", str(tiny_base), "--out", str(tmp_path / "m"))
    _assert_clean(code, err, r"is a full model, not an adapter")
    code, _, err = run_cli(capsys, "merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"))
    _assert_clean(code, err, r"nowhere does not exist or is not a folder")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "merge", str(adapter), "--out", str(tmp_path / "m"))
    _assert_clean(code, err, r"adapter .*adapter: (no adapter_model|.*adapter_config\.json)")
    assert not (tmp_path / "m").exists()


EVAL_CASES = [
    ("missing field", {"id": "q", "image": "ok.png", "question": "?"}, r"eval\.jsonl:1: missing field 'answer'"),
    ("unknown answer type", {"id": "q", "image": "ok.png", "question": "?", "answer": "yes", "answer_type": "maybe"},
     r"eval\.jsonl:1: unknown answer_type 'maybe'"),
    ("missing image", {"id": "q", "image": "no.png", "question": "?", "answer": "yes", "answer_type": "closed"}, r"eval\.jsonl:1: .*no\.png"),
    ("question not a string", {"id": "q", "image": "ok.png", "question": ["?"], "answer": "yes", "answer_type": "closed"},
     r"eval\.jsonl:1: field 'question' must be a string"),
]


@pytest.mark.parametrize("case,line,expected", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_files(capsys, tmp_path, tiny_base, case, line, expected):
    _png(tmp_path / "ok.png")
    (tmp_path / "eval.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "pred.jsonl"
    code, _, err = run_cli(capsys, "eval", str(tiny_base), "--data", str(tmp_path / "eval.jsonl"), "--out", str(out))
    _assert_clean(code, err, expected)
    assert not out.exists()


def _assert_clean(code: int, err: str, expected: str) -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "unexpected" not in lines[0], lines[0]
    assert re.search(expected, lines[0]), lines[0]
