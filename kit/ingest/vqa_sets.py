"""The medical VQA sets users bring, in their published layouts, as kit data files.

- VQA-RAD (OSF release): `VQA_RAD Dataset Public.json` (a list of {qid, image_name, question, answer,
  answer_type OPEN|CLOSED, phrase_type, ...}) beside `VQA_RAD Image Folder/`. The test split is the
  questions whose phrase_type is test_freeform or test_para; the rest is train.
- SLAKE 1.0: `train.json`, `validate.json`, `test.json` (lists of {qid, img_name, question, answer,
  answer_type, q_lang, ...}) beside `imgs/`; English questions by default (q_lang "en").
- PathVQA: `qas/<split>/<split>_qa.pkl` (lists of {image, question, answer}) and
  `images/<split>/<image>.jpg`; yes/no answers are the closed questions. The pickles are read as
  plain data only: any Python object inside is refused, never constructed.

Each split becomes `<split>.jsonl` in kit's VQA format (kit eval) and `<split>.json` in LLaVA format
(one conversation per question, asked as written: kit adapt / kit train), with a data card naming
the image folder.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.files import read_json, staged_folder, write_json_atomic, write_jsonl_atomic
from kit.core.templates import IMAGE_TOKEN
from kit.data.images import ImageProblem, check_image, resolve_image

VQA_SETS = ("vqa-rad", "slake", "pathvqa")
_VQA_RAD_FILE = "VQA_RAD Dataset Public.json"
_VQA_RAD_IMAGES = "VQA_RAD Image Folder"
_VQA_RAD_TEST = ("test_freeform", "test_para")
_SLAKE_SPLITS = {"train": "train.json", "validation": "validate.json", "test": "test.json"}
_PATHVQA_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class _Refused(pickle.UnpicklingError):
    pass


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise _Refused(f"{module}.{name}")


def read_plain_pickle(path: Path) -> Any:
    """Lists, dicts, strings and numbers from a pickle; a pickle that names any class or function
    (which unpickling would import and call) is refused."""
    try:
        with open(path, "rb") as f:
            return _PlainData(f).load()
    except _Refused as e:
        raise KitError(f"{path}: the pickle holds a Python object ({e}), not plain data; kit does not unpickle objects") from None
    except OSError as e:
        raise KitError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - no code of the file's runs (classes are refused), so any
        # failure (AttributeError from BUILD on a list, MemoryError / OverflowError from a forged
        # length, ...) means a damaged or crafted file
        raise KitError(f"{path}: not a readable pickle ({type(e).__name__}); download the file again") from None


def _text(rec: dict, key: str, where: str) -> str:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise KitError(f"{where}: field '{key}' must be a non-empty text (got {type(value).__name__ if value is not None else 'nothing'})")
    return str(value).strip()


def _kind(value: Any, where: str) -> str:
    kind = str(value or "").strip().lower()
    if kind not in ("open", "closed"):
        raise KitError(f"{where}: answer_type must be OPEN or CLOSED (got {value!r})")
    return kind


def _records(data: Any, path: Path) -> list[dict]:
    if not isinstance(data, list):
        raise KitError(f"{path}: expected a list of questions, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise KitError(f"{path}[{i}]: each question must be an object, got {type(rec).__name__}")
    return data


def _vqa_rad(root: Path, language: str) -> tuple[Path, dict[str, list[dict]]]:
    path = root / _VQA_RAD_FILE
    if not path.is_file():
        raise KitError(f"{root}: no '{_VQA_RAD_FILE}'; point at the folder of the VQA-RAD release")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i, rec in enumerate(_records(read_json(path, "VQA-RAD file", expect=None), path)):
        where = f"{path}[{i}]"
        split = "test" if str(rec.get("phrase_type", "")).strip() in _VQA_RAD_TEST else "train"
        splits[split].append({
            "id": f"vqarad-{_text(rec, 'qid', where)}", "image": _text(rec, "image_name", where),
            "question": _text(rec, "question", where), "answer": _text(rec, "answer", where),
            "answer_type": _kind(rec.get("answer_type"), where),
        })
    return root / _VQA_RAD_IMAGES, splits


def _slake(root: Path, language: str) -> tuple[Path, dict[str, list[dict]]]:
    found = {s: root / f for s, f in _SLAKE_SPLITS.items() if (root / f).is_file()}
    if not found:
        raise KitError(f"{root}: no train.json / validate.json / test.json; point at the Slake1.0 folder")
    splits = {}
    for split, path in found.items():
        rows = []
        for i, rec in enumerate(_records(read_json(path, "SLAKE file", expect=None), path)):
            where = f"{path}[{i}]"
            if language != "all" and str(rec.get("q_lang", "")).strip() != language:
                continue
            rows.append({
                "id": f"slake-{_text(rec, 'qid', where)}", "image": _text(rec, "img_name", where),
                "question": _text(rec, "question", where), "answer": _text(rec, "answer", where),
                "answer_type": _kind(rec.get("answer_type"), where),
            })
        splits[split] = rows
    return root / "imgs", splits


def _pathvqa(root: Path, language: str) -> tuple[Path, dict[str, list[dict]]]:
    splits = {}
    for split, name in _PATHVQA_SPLITS.items():
        path = root / "qas" / name / f"{name}_qa.pkl"
        if not path.is_file():
            continue
        rows = []
        for i, rec in enumerate(_records(read_plain_pickle(path), path)):
            where = f"{path}[{i}]"
            answer = _text(rec, "answer", where)
            image = _text(rec, "image", where)
            rows.append({
                "id": f"pathvqa-{name}-{i}", "image": f"{name}/{image}.jpg" if not Path(image).suffix else f"{name}/{image}",
                "question": _text(rec, "question", where), "answer": answer,
                "answer_type": "closed" if answer.lower() in ("yes", "no") else "open",
            })
        splits[split] = rows
    if not splits:
        raise KitError(f"{root}: no qas/<split>/<split>_qa.pkl; point at the pvqa folder of the PathVQA release")
    return root / "images", splits


_READERS: dict[str, Callable[[Path, str], tuple[Path, dict[str, list[dict]]]]] = {
    "vqa-rad": _vqa_rad, "slake": _slake, "pathvqa": _pathvqa,
}


def read_vqa_set(name: str, root: Path, language: str = "en") -> tuple[Path, dict[str, list[dict]]]:
    """(image folder, {split: [kit VQA item]}) for a published layout. KitError naming the file and
    record for anything kit cannot read, and for a question whose image is missing."""
    if name not in _READERS:
        raise KitError(f"unknown VQA set '{name}'; choose one of {', '.join(VQA_SETS)}")
    root = Path(root)
    if not root.is_dir():
        raise KitError(f"{root} is not a folder; point at the unpacked {name} release")
    images, splits = _READERS[name](root, language)
    if not images.is_dir():
        raise KitError(f"{root}: the image folder {images.name}/ is missing; unpack the images beside the questions")
    for split, rows in splits.items():
        for row in rows:
            try:
                check_image(resolve_image(images, row["image"]))
            except ImageProblem as e:
                raise KitError(f"{name} {split} question {row['id']}: {e}") from None
    if not any(splits.values()):
        raise KitError(f"{root}: no questions{' in language ' + language if language != 'all' else ''}")
    return images, splits


def training_conversations(rows: list[dict]) -> list[dict]:
    """One LLaVA conversation per question, asked as written (as LLaVA-Med's downstream finetuning)."""
    return [{
        "id": row["id"], "image": row["image"],
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{row['question']}"}, {"from": "gpt", "value": row["answer"]}],
    } for row in rows]


def import_vqa_set(name: str, root: Path, out: Path, language: str = "en") -> dict[str, int]:
    """Write every split of `root` into `out` (see the module docstring); nothing is written on error.
    Returns {split: questions}."""
    images, splits = read_vqa_set(name, root, language)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"--out {out} exists and is not an empty folder; pick a new one")
    with staged_folder(out) as tmp:
        for split, rows in splits.items():
            write_jsonl_atomic(tmp / f"{split}.jsonl", rows)
            write_json_atomic(tmp / f"{split}.json", training_conversations(rows), indent=1)
        Card.new("data", made_by=f"kit data import-vqa {name}", image_folder=str(images.resolve()),
                 samples={s: len(r) for s, r in splits.items()}, private=True).write(tmp)
    return {s: len(r) for s, r in splits.items()}
