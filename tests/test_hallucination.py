"""Hallucination on your own images: POPE probes built from annotations, POPE and CHAIR scores
(values derived by hand), and `kit eval` on a probes file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kit.ground import facts_of, load_vocab
from kit.ground.probes import SETS, build_probes
from kit.ingest.records import Box, Record

GENERAL = load_vocab("general")


def _records(root: Path) -> list[Record]:
    """Street scenes (people, dogs, cars, bicycles co-occur) and kitchens (bowls, cups, tables)."""
    street = [("person", "dog", "car"), ("person", "bicycle", "car"), ("person", "dog", "bicycle"), ("car", "bus", "person")]
    kitchen = [("bowl", "cup", "dining table"), ("cup", "bottle", "dining table"), ("bowl", "bottle", "oven")]
    out = []
    for i, labels in enumerate(street + kitchen):
        out.append(Record(id=f"img{i}", image=f"images/{i}.png", root=root, captions=[f"A scene with {', '.join(labels)}."],
                          boxes=[Box(label, (0.1 * k, 0.1, 0.1 * k + 0.2, 0.5)) for k, label in enumerate(labels)]))
    return out


def test_probes_are_balanced_true_and_deterministic(tmp_path):
    records = _records(tmp_path)
    items = build_probes(records, GENERAL, seed=1)
    again = build_probes(records, GENERAL, seed=1)
    other = build_probes(records, GENERAL, seed=2)
    assert items == again and items != other
    facts = {r.id: facts_of(r, GENERAL) for r in records}
    probes = [it for it in items if "probe" in it]
    for r in records:
        for name in SETS:
            mine = [it for it in probes if it["id"].startswith(f"{r.id}-{name}-")]
            yes = [it for it in mine if it["answer"] == "yes"]
            assert len(yes) == len(mine) - len(yes) == 3, (r.id, name)
            for it in mine:
                concept = it["probe"]["concept"]
                assert (concept in facts[r.id].present) == (it["answer"] == "yes"), it
                assert it["answer_type"] == "closed" and it["question"].startswith("Is there a")
    # Adversarial negatives co-occur with the image's own objects elsewhere in the data; popular ones are frequent.
    street_adv = {it["probe"]["concept"] for it in probes if it["id"].startswith("img0-adversarial-") and it["answer"] == "no"}
    assert street_adv <= {"bicycle", "bus"} | {"bowl", "cup", "dining table", "bottle", "oven"} and "bicycle" in street_adv
    kitchen_adv = {it["probe"]["concept"] for it in probes if it["id"].startswith("img4-adversarial-") and it["answer"] == "no"}
    assert {"bottle", "oven"} & kitchen_adv and not {"dog", "bus"} & kitchen_adv
    describe = [it for it in items if it["answer_type"] == "describe"]
    assert len(describe) == len(records) and all(d["facts"]["present"] and d["vocab"] == "general" for d in describe)


def test_pope_by_hand():
    from kit.eval.hallucination import pope, says_yes

    always = pope([True, False] * 10, [True] * 20)
    assert (always["accuracy"], always["precision"], always["recall"], always["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert always["f1"] == pytest.approx(2 / 3) and always["n"] == 20
    # 4 yes-items: 3 said yes; 4 no-items: 1 said yes. tp 3, fp 1, fn 1, tn 3.
    s = pope([True] * 4 + [False] * 4, [True, True, True, False, True, False, False, False])
    assert s["accuracy"] == 0.75 and s["precision"] == 0.75 and s["recall"] == 0.75 and s["f1"] == 0.75 and s["yes_ratio"] == 0.5
    lo, hi = s["f1_ci"]
    assert 0 <= lo < 0.75 < hi <= 1
    assert says_yes("Yes, there is.") and not says_yes("No.") and not says_yes("There is not a dog.")


def test_chair_by_hand():
    from kit.eval.hallucination import chair, description_claims

    record = Record(id="r", image="r.png", root=Path("."), captions=["A dog next to a car."],
                    boxes=[Box("dog", (0.1, 0.1, 0.3, 0.3)), Box("car", (0.5, 0.5, 0.9, 0.9))])
    facts = facts_of(record, GENERAL).to_json()
    texts = ["A dog sits by a car.", "A dog and a cat near a bus; the dog barks.", "An empty street."]
    preds = [{"answer_type": "describe", "claims": [c.to_json() for c in description_claims(t, facts, "general")]} for t in texts]
    c = chair(preds)
    # mentioned objects counted once per description: {dog, car}, {dog, cat, bus}, {} -> 5, of which cat and bus unsupported
    assert c["objects"] == 5 and c["chair_i"] == pytest.approx(2 / 5) and c["chair_s"] == pytest.approx(1 / 3) and c["n"] == 3


def test_kit_eval_scores_probes_and_descriptions(tiny_base, tmp_path, capsys):
    from test_cli_errors import run_cli

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    records = _records(root)
    with open(root / "manifest.jsonl", "w") as fh:
        for i, r in enumerate(records):
            Image.new("RGB", (32, 32), (40 * i % 255, 120, 200)).save(root / r.image)
            fh.write(json.dumps({"image": r.image, "captions": r.captions,
                                 "boxes": [{"label": b.label, "bbox": [b.bbox[0] * 32, b.bbox[1] * 32, b.bbox[2] * 32, b.bbox[3] * 32]}
                                           for b in r.boxes]}) + "\n")
    code, _, err = run_cli(capsys, "data", "probes", str(root), "--out", str(root / "probes.jsonl"), "--per-image", "2")
    assert code == 0, err
    assert "84 yes/no probes (28 random, 28 popular, 28 adversarial; half answer yes), 7 describe items" in err
    code, out, err = run_cli(capsys, "eval", str(tiny_base), "--data", str(root / "probes.jsonl"), "--out", str(tmp_path / "pred.jsonl"))
    assert code == 0, err
    said = out + err
    assert all(name in said for name in ("POPE set", "random", "popular", "adversarial", "CHAIR_i", "CHAIR_s"))
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    probes = [p for p in preds if p.get("probe")]
    assert len(probes) == 84 and all(isinstance(p["said_yes"], bool) for p in probes)
    assert all(isinstance(p["claims"], list) for p in preds if p["answer_type"] == "describe")
    # The table's F1 for the random set is the one these predictions give.
    from kit.eval.hallucination import pope

    rnd = [p for p in probes if p["probe"]["set"] == "random"]
    f1 = pope([p["answer"] == "yes" for p in rnd], [p["said_yes"] for p in rnd])["f1"]
    assert f"{100 * f1:.1f}" in said
    code, _, err = run_cli(capsys, "data", "probes", str(root), "--out", str(root / "probes.jsonl"))
    assert code == 2 and "already exists" in err
