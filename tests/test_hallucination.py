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
    items = build_probes(records, GENERAL, tmp_path, seed=1)
    again = build_probes(records, GENERAL, tmp_path, seed=1)
    other = build_probes(records, GENERAL, tmp_path, seed=2)
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
    from helpers import run_cli

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


def _preds(truth_said: list[tuple[str, bool]], describe_bad: list[int]) -> dict:
    """A fake evaluation result: probe predictions (answer, said_yes) and describe predictions with
    `describe_bad[i]` unsupported objects out of 2 mentioned."""
    preds = [{"id": f"p{i}", "answer_type": "closed", "answer": a, "said_yes": s, "probe": {"concept": "x", "set": "random"}, "score": 0.0}
             for i, (a, s) in enumerate(truth_said)]
    for i, bad in enumerate(describe_bad):
        claims = [{"kind": "object", "concept": f"c{k}", "status": "unsupported" if k < bad else "supported"} for k in range(2)]
        preds.append({"id": f"d{i}", "answer_type": "describe", "claims": claims, "score": None})
    return {"predictions": preds}


def test_the_gate_fails_only_past_its_limit_and_beyond_noise():
    from kit.adapt import gate_verdict
    from kit.core.recipes import GateArgs

    good = _preds([("yes", True), ("no", False)] * 20, [0] * 20)
    worse = _preds([("yes", True), ("no", True)] * 20, [1] * 20)  # says yes to every absent concept, invents one object each
    v = gate_verdict(GateArgs(pope_f1_drop=2.0, chair_i_rise=2.0), good, worse)
    assert not v["passed"] and len(v["failed"]) == 2 and v["checked"] == ["POPE F1", "CHAIR_i"]
    assert v["failed"][0].startswith("POPE F1 dropped 33.3 points (limit 2") and v["failed"][1].startswith("CHAIR_i rose 50.0 points")
    assert gate_verdict(GateArgs(pope_f1_drop=40.0, chair_i_rise=60.0), good, worse)["passed"]
    assert gate_verdict(GateArgs(pope_f1_drop=2.0), good, good)["passed"]
    assert gate_verdict(None, good, worse) is None
    # A change past the limit whose interval includes zero is noise: one flipped probe of 40.
    flip = _preds([("yes", True), ("no", False)] * 19 + [("yes", False), ("no", False)], [0] * 20)
    assert gate_verdict(GateArgs(pope_f1_drop=1.0), good, flip)["passed"]


def _annotated_folder(tmp_path: Path) -> Path:
    root = tmp_path / "domain"
    (root / "images").mkdir(parents=True)
    scenes = [("dog", "car"), ("person", "dog"), ("cup", "bowl"), ("car", "person"), ("bowl", "dining table"), ("dog", "person"),
              ("cup", "dining table"), ("car", "bus")]
    with open(root / "manifest.jsonl", "w") as m, open(root / "eval.jsonl", "w") as e:
        for i, labels in enumerate(scenes):
            Image.new("RGB", (32, 32), (30 * i, 120, 200)).save(root / "images" / f"img{i}.png")
            boxes = [{"label": label, "bbox": [2 + 14 * k, 4, 14 + 14 * k, 28]} for k, label in enumerate(labels)]
            m.write(json.dumps({"image": f"images/img{i}.png", "captions": [f"A {labels[0]} and a {labels[1]}."], "boxes": boxes}) + "\n")
            e.write(json.dumps({"id": f"img{i}-q", "image": f"images/img{i}.png", "question": f"Is there a {labels[0]}?",
                                "answer": "yes", "answer_type": "closed"}) + "\n")
    return root


def test_kit_adapt_adds_probes_reports_them_and_gates(capsys, tmp_path, tiny_base, monkeypatch):
    from mock_openai import MockOpenAI
    from test_adapt import TINY
    from helpers import run_cli

    data = _annotated_folder(tmp_path)
    args = ["--recipe", "llava15-qlora", "--base", str(tiny_base), "--data", str(data), "--max-steps", "2", *TINY,
            "--set", "generate.backend=openai", "--set", "generate.model=mock", "--set", "eval.held_out=0.3",
            "--set", "generate.types=[detail]", "--set", "eval.gate.pope_f1_drop=100"]
    with MockOpenAI() as server:
        args += ["--set", f"generate.base_url={server.base_url}"]
        code, out, err = run_cli(capsys, "adapt", *args, "--out", str(tmp_path / "a"))
        assert code == 0, err
        said = out + err
        assert "hallucination probes:" in said and "POPE F1 random" in said and "CHAIR_i" in said
        card = json.loads((tmp_path / "a" / "kit.json").read_text())
        ev = card["evaluation"]
        assert set(ev["base"]["pope"]) >= {"random", "popular", "adversarial", "all"} and ev["adapted"]["chair"]["n"] > 0
        assert "pope_f1_all" in ev["hallucination_change"] and ev["gate"] == {"checked": ["POPE F1"], "failed": [], "passed": True}

        # A gate that fails: one line, exit 1, the adapter kept with the failed gate on its card.
        import kit.adapt

        monkeypatch.setattr(kit.adapt, "gate_verdict", lambda *a: {"checked": ["POPE F1"], "passed": False,
                                                                   "failed": ["POPE F1 dropped 9.0 points (limit 2, ...)"]})
        code, out, err = run_cli(capsys, "adapt", *args, "--out", str(tmp_path / "b"))
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: release gate failed: POPE F1 dropped 9.0 points"), err
    card = json.loads((tmp_path / "b" / "kit.json").read_text())
    assert card["evaluation"]["gate"]["passed"] is False and (tmp_path / "b" / "adapter_model.safetensors").is_file()


def test_probes_outside_the_image_folder_are_one_line_errors(tmp_path, capsys):
    from helpers import run_cli

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "images" / "0.png")
    (root / "manifest.jsonl").write_text(json.dumps({"image": "images/0.png", "captions": ["A dog and a car."]}) + "\n")
    elsewhere = tmp_path / "other" / "probes.jsonl"
    elsewhere.parent.mkdir()
    code, out, err = run_cli(capsys, "data", "probes", str(root), "--out", str(elsewhere))
    assert code == 2 and out == "" and err.count("\n") == 1 and "is not below" in err and "--out" in err, err
    assert not elsewhere.exists()
