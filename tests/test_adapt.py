"""`kit adapt` end to end on a tiny base: split, generate (local server), train, before/after evaluation."""

from __future__ import annotations

import json

from mock_openai import MockOpenAI
from PIL import Image

from helpers import as_flags, run_cli, tiny

TINY = as_flags(tiny(lora=True, train__batch_size=2, train__global_batch_size=2, data__max_length=512,
                     train__logging_steps=None, train__warmup_ratio=None))


def _folder(tmp_path, n=8):
    root = tmp_path / "domain"
    (root / "images").mkdir(parents=True)
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    with open(root / "manifest.jsonl", "w") as m, open(root / "eval.jsonl", "w") as e:
        for i in range(n):
            name = list(colours)[i % 2]
            Image.new("RGB", (32, 32), colours[name]).save(root / "images" / f"img{i}.png")
            m.write(json.dumps({"image": f"images/img{i}.png", "captions": [f"A plain {name} square filling the picture."]}) + "\n")
            e.write(json.dumps({"id": f"img{i}-q1", "image": f"images/img{i}.png", "question": f"Is the square {name}?", "answer": "yes", "answer_type": "closed"}) + "\n")
            e.write(json.dumps({"id": f"img{i}-q2", "image": f"images/img{i}.png", "question": "What colour is the square?", "answer": name, "answer_type": "open"}) + "\n")
    return root


def test_adapt_runs_the_whole_pipeline_and_records_before_after(capsys, tmp_path, tiny_base):
    data = _folder(tmp_path)
    out = tmp_path / "adapter"
    with MockOpenAI() as server:
        code, stdout, err = run_cli(capsys, "adapt", "--recipe", "medical", "--base", str(tiny_base), "--data", str(data),
                                    "--out", str(out), "--max-steps", "3", *TINY, "--set", "generate.backend=openai",
                                    "--set", f"generate.base_url={server.base_url}", "--set", "generate.model=mock",
                                    "--set", "eval.held_out=0.3")
    assert code == 0, err
    card = json.loads((out / "kit.json").read_text())
    assert card["kind"] == "adapter" and card["recipe"]["name"] == "medical"
    ev = card["evaluation"]
    assert ev["base"]["n_closed"] == ev["adapted"]["n_closed"] > 0
    assert 0 <= ev["adapted"]["closed_accuracy"] <= 1
    assert ev["metric"] == "llava-med" and ev["prompts"] == "as-written"
    lo, hi = ev["change"]["overall"]["ci"]
    assert lo <= ev["change"]["overall"]["change"] <= hi
    said = stdout + err
    assert "95% interval" in said and ("from noise" in said or "larger than the noise" in said)
    train_questions = [s for s in json.loads((data / ".kit" / "medical" / "train.json").read_text()) if s["id"].endswith("-vqa")]
    assert train_questions and all(not s["conversations"][0]["value"].endswith(("Answer yes or no.", "Answer briefly."))
                                   for s in train_questions), "VQA training pairs are asked as the metric asks"
    held_items = [json.loads(l) for l in open(ev["data"])]
    held = [it["image"] for it in held_items]
    # What the manifest says about each held-out image travels with its questions, for a judge.
    captions = {r["image"]: r["captions"][0] for r in map(json.loads, open(data / "manifest.jsonl"))}
    assert held_items and all(it["context"] == captions[it["image"]] for it in held_items)
    train = json.loads((data / ".kit" / "medical" / "train.json").read_text())
    assert not {s["image"] for s in train} & set(held), "held-out images leaked into training"
    assert "closed" in err or "closed" in stdout


def test_adapt_bad_inputs(capsys, tmp_path, tiny_base):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "adapt", "--recipe", "medical", "--base", str(tiny_base), "--data", str(empty), *TINY)
    assert code == 2 and "needs a manifest.jsonl" in err
    code, _, err = run_cli(capsys, "adapt", "--recipe", "llava15-qlora", "--base", str(tiny_base), *TINY)
    assert code == 2 and "names no sample set" in err
    code, _, err = run_cli(capsys, "adapt", "--recipe", "medical", "--base", str(tiny_base), "--data", str(_folder(tmp_path)),
                           "--out", str(tmp_path / "none"), "--resume", *TINY)
    assert code == 2 and "--resume: no checkpoint" in err
