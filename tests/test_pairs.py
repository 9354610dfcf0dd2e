"""`kit data pairs`: a grounded answer against the same answer with one fact made false, every edit
kind, every pair checked both ways, dropped pairs counted; from a manifest and from a reviewed
`kit generate` folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from test_review import KITCHEN, STREET, generated_folder

from kit.data.reviewed import Decision, ReviewLog
from kit.ground.claims import check_text
from kit.ground.edits import EDIT_KINDS, Alternatives, minimal_edits
from kit.ground.facts import facts_of
from kit.ground.vocab import load_vocab
from kit.ingest.records import Box, Record

GENERAL, MEDICAL = load_vocab("general"), load_vocab("medical")
STREET_RECORD = Record("street", "s.png", Path("."), captions=["Two people walk a dog past a parked car."],
                       boxes=[Box("person", (0.05, 0.17, 0.25, 0.83)), Box("person", (0.3, 0.17, 0.5, 0.83)),
                              Box("dog", (0.1, 0.67, 0.3, 0.83)), Box("car", (0.6, 0.33, 0.97, 0.83))])
CT_RECORD = Record("ct", "c.png", Path("."), captions=["CT image of the chest showing a nodule in the right lung."],
                   findings=["No pleural effusion."])


@pytest.mark.parametrize("record, vocab, answer, kind, before, after, flagged", [
    (STREET_RECORD, GENERAL, "Two people walk a dog past a parked car.", "swap", "dog", None, ("object", "unsupported")),
    (STREET_RECORD, GENERAL, "Two people walk a dog past a parked car.", "count", "Two", "Three", ("count", "contradicted")),
    (STREET_RECORD, GENERAL, "There is a car on the right of the image.", "side", "right", "left", ("position", "contradicted")),
    (STREET_RECORD, GENERAL, "Two people walk a dog past a parked car.", "negate", "a dog", "no dog", ("absence", "contradicted")),
    (STREET_RECORD, GENERAL, "Two people walk a dog past a parked car.", "add", "", None, ("object", "unsupported")),
    (CT_RECORD, MEDICAL, "This CT image of the chest shows a nodule.", "modality", "CT image", None, ("object", "contradicted")),
    (CT_RECORD, MEDICAL, "This CT image of the chest shows a nodule.", "negate", "a nodule", "no nodule", ("absence", "contradicted")),
])
def test_each_edit_changes_one_fact_and_the_check_flags_it(record, vocab, answer, kind, before, after, flagged):
    facts = facts_of(record, vocab)
    assert not [c for c in check_text(answer, facts, vocab) if c.bad]
    edits = {e.kind: e for e in minimal_edits(answer, facts, vocab, Alternatives(vocab, [facts]))}
    e = edits[kind]
    assert e.before == before and (after is None or e.after == after)
    if kind == "add":
        assert e.text.startswith(answer) and e.after in e.text[len(answer):]
    else:  # the rest of the answer is untouched (articles aside)
        assert e.text.replace(e.after, "#", 1).split("#")[0].rstrip(" an") == answer.split(before, 1)[0].rstrip(" an")
    bad = {(c.kind, c.status) for c in check_text(e.text, facts, vocab) if c.bad}
    assert flagged in bad
    if kind == "modality":  # within the modality group, and written as the vocabulary names it
        assert MEDICAL.concepts[e.after].group == "modality" and e.after != "CT"
    if kind == "negate" and vocab is MEDICAL:  # never "no chest" in "an image of the chest", never the modality
        assert "chest" not in e.before


def test_swapped_concepts_are_absent_and_co_occurring_ones_come_first():
    beach = Record("beach", "b.png", Path("."), captions=["A dog and a frisbee on the beach."])
    park = Record("park", "p.png", Path("."), captions=["A dog runs after a frisbee in a park; a kite flies."])
    facts = [facts_of(r, GENERAL) for r in (STREET_RECORD, beach, park)]
    alts = Alternatives(GENERAL, facts)
    # The street has a dog; dogs come with frisbees in this data set, so a frisbee is the likeliest invention.
    assert alts.for_add(facts[0])[0] == "frisbee"
    swaps = alts.for_swap("dog", facts[0])
    assert swaps and "dog" not in swaps and not set(swaps) & facts[0].present
    assert all(GENERAL.concepts[c].group == GENERAL.concepts["dog"].group for c in swaps)


def _manifest(root: Path) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = [
        {"image": "images/street.png", "captions": ["Two people walk a dog past a parked car."],
         "boxes": [{"label": "person", "bbox": [2, 5, 10, 30]}, {"label": "person", "bbox": [12, 5, 20, 30]},
                   {"label": "dog", "bbox": [2, 20, 10, 30]}, {"label": "car", "bbox": [28, 10, 39, 25]}]},
        {"image": "images/kitchen.png", "captions": ["A bowl of fruit on a kitchen table."],
         "boxes": [{"label": "bowl", "bbox": [10, 10, 30, 20]}, {"label": "dining table", "bbox": [0, 15, 40, 30]}]},
        {"image": "images/ct.png", "captions": ["CT image of the chest."], "findings": ["A nodule in the right lung. No pleural effusion."]},
        {"image": "images/us.png", "captions": ["Ultrasound image of the liver with a cyst."]},
    ]
    for line in lines:
        Image.new("RGB", (40, 30), (120, 90, 60)).save(root / line["image"])
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _check_pairs(pairs: list[dict], vocab, records: dict[str, Record]) -> None:
    for p in pairs:
        record = records[p["image"]]
        facts = facts_of(record, vocab)
        assert not [c for c in check_text(p["chosen"], facts, vocab) if c.bad], p
        bad = [c for c in check_text(p["rejected"], facts, vocab) if c.bad]
        assert bad and p["claims"] and p["rejected"] != p["chosen"], p
        assert p["prompt"][-1]["from"] == "human" and "<image>" in p["prompt"][0]["value"]
        assert p["edit"]["kind"] in EDIT_KINDS and set(p["edit"]) == {"kind", "from", "to"}


def test_pairs_from_a_manifest_cover_every_edit_kind(tmp_path, capsys):
    from kit.ingest.sources import from_manifest

    src = _manifest(tmp_path / "src")
    records = {r.image: r for r in from_manifest(src)}
    by_kind = {}
    for vocab in ("general", "medical"):
        out = tmp_path / f"pairs-{vocab}.json"
        code, stdout, err = run_cli(capsys, "data", "pairs", str(src), "--out", str(out), "--vocab", vocab, "--per-answer", "6")
        assert code == 0, err
        assert stdout.strip() == str(out) and err.startswith("pairs: ")
        pairs = json.loads(out.read_text())
        _check_pairs(pairs, load_vocab(vocab), records)
        for p in pairs:
            by_kind.setdefault(p["edit"]["kind"], p)
    assert set(by_kind) == set(EDIT_KINDS), set(EDIT_KINDS) - set(by_kind)
    assert by_kind["side"]["chosen"] == "The image shows two people, a dog on the left and a car on the right."
    modality = by_kind["modality"]
    assert modality["edit"]["from"] in ("CT image", "Ultrasound image") and modality["claims"][0]["status"] == "contradicted"
    card = json.loads((tmp_path / "kit.json").read_text())
    assert card["made_by"] == "kit data pairs" and Path(card["image_folder"]) == src.resolve()
    assert card["pairs"]["pairs"] == len(json.loads((tmp_path / "pairs-medical.json").read_text()))
    assert sum(card["pairs"]["by_edit"].values()) == card["pairs"]["pairs"]

    # Deterministic: the same seed gives the same file.
    again = tmp_path / "again.json"
    assert run_cli(capsys, "data", "pairs", str(src), "--out", str(again), "--vocab", "medical", "--per-answer", "6")[0] == 0
    assert again.read_text() == (tmp_path / "pairs-medical.json").read_text()


def test_pairs_from_a_reviewed_folder_follow_the_review_and_count_what_they_drop(tmp_path, capsys):
    folder = generated_folder(tmp_path)
    data = json.loads((folder / "data.json").read_text())
    conv, detail = data
    out = tmp_path / "pairs.json"
    code, _, err = run_cli(capsys, "data", "pairs", str(folder), "--out", str(out))
    assert code == 0, err
    before = json.loads(out.read_text())
    assert {p["id"].split("-a")[0] for p in before} <= {conv["id"], detail["id"]}

    # The reviewer rejects the description and edits the conversation to claim a cat the source
    # never named: the edited answer is not grounded, so it gives no pair, and says so.
    turns = [dict(t) for t in conv["conversations"]]
    turns[1]["value"] = "A bowl sits on the table and a cat sleeps beside it."
    log = ReviewLog(folder)
    log.append(Decision(detail["id"], "reject"))
    log.append(Decision(conv["id"], "edit", conversations=turns))
    code, _, err = run_cli(capsys, "data", "pairs", str(folder), "--out", str(out), "--force")
    assert code == 0, err
    pairs = json.loads(out.read_text())
    assert pairs and all(p["id"].startswith(conv["id"] + "-a") for p in pairs)
    assert not any(p["id"].startswith(f"{conv['id']}-a1-") for p in pairs)
    assert "1 chosen answer makes a claim the source does not support" in err
    from kit.review.folder import ReviewFolder

    review = ReviewFolder(folder)
    _check_pairs(pairs, review.vocab, {p["image"]: review.records[KITCHEN] for p in pairs})
    # Rescuing a rejected street conversation makes its answers pairable.
    rescued = next(json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()
                   if json.loads(line)["id"] == f"{STREET}-conversation")
    fixed = [dict(t) for t in rescued["conversations"]]
    fixed[1]["value"] = "Yes, there is a dog walking with two people."
    log.append(Decision(rescued["id"], "edit", conversations=fixed))
    assert run_cli(capsys, "data", "pairs", str(folder), "--out", str(out), "--force")[0] == 0
    assert any(p["id"].startswith(f"{STREET}-conversation-a1-") for p in json.loads(out.read_text()))


def test_pairs_bad_inputs_are_one_line_errors(tmp_path, capsys):
    src = _manifest(tmp_path / "src")
    out = tmp_path / "p.json"
    out.write_text("[]")
    cases = [
        (["data", "pairs", str(src), "--out", str(out)], "already exists"),
        (["data", "pairs", str(src), "--out", str(tmp_path / "p.jsonl")], "give a .json file name"),
        (["data", "pairs", str(tmp_path / "nothing"), "--out", str(tmp_path / "q.json")], "give a kit generate folder"),
        (["data", "pairs", str(src), "--out", str(tmp_path / "q.json"), "--per-answer", "0"], "--per-answer 0"),
        (["data", "pairs", str(src / "manifest.jsonl"), "--out", str(tmp_path / "q.json"), "--images", str(src)], "needs both --instances"),
        (["data", "pairs", str(src), "--out", str(tmp_path / "q.json"), "--vocab", "nope"], "vocabulary 'nope'"),
    ]
    for args, message in cases:
        code, stdout, err = run_cli(capsys, *args)
        assert code != 0 and err.count("\n") == 1 and message in err and not stdout, (args, err)
    assert not (tmp_path / "q.json").exists()


def test_the_models_own_flagged_answers_become_rejected_ones(tmp_path, capsys, monkeypatch, tiny_base):
    import kit.prefer.pairs

    src = _manifest(tmp_path / "src")
    # A real model on this machine: every grounded answer's prompt is asked, each answer judged.
    out = tmp_path / "real.json"
    code, _, err = run_cli(capsys, "data", "pairs", str(src), "--out", str(out), "--from-model", str(tiny_base))
    assert code == 0, err
    line = next(l for l in err.splitlines() if l.startswith("pairs: "))
    grounded = int(line.split(" from ")[1].split()[0])
    made = sum(1 for p in json.loads(out.read_text()) if p["edit"]["kind"] == "model")
    judged_clean = int(line.split("model answer makes no claim")[0].rsplit(" ", 2)[-2]) if "model answer makes no claim" in line else 0
    assert made + judged_clean == grounded, line

    # A model that invents a cat everywhere: each of its answers is flagged and paired.
    asked = []

    def invents(model_path, answers, folder, echo=print, **kw):
        asked.extend(a.prompt[-1]["value"] for a in answers)
        return ["The image shows a cat." for _ in answers]

    monkeypatch.setattr(kit.prefer.pairs, "model_answers", invents)
    out = tmp_path / "cats.json"
    code, _, err = run_cli(capsys, "data", "pairs", str(src), "--out", str(out), "--from-model", str(tiny_base))
    assert code == 0, err
    cats = [p for p in json.loads(out.read_text()) if p["edit"]["kind"] == "model"]
    assert len(cats) == len(asked) and all(p["rejected"] == "The image shows a cat." for p in cats)
    assert all(p["edit"]["to"] == "cat" and p["claims"][0]["status"] == "unsupported" for p in cats)
    assert all(not [c for c in check_text(p["chosen"], facts_of(_record_of(src, p["image"]), GENERAL), GENERAL) if c.bad] for p in cats)


def _record_of(src: Path, image: str) -> Record:
    from kit.ingest.sources import from_manifest

    return next(r for r in from_manifest(src) if r.image == image)
