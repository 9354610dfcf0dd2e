"""Preference tuning (train.objective: dpo) through TRL's DPO trainer on kit's data path: tiny
models of three families learn to prefer the true answer (the reward margin rises), only the LoRA
and the projector move, the adapter loads in plain PEFT and merges with `kit merge`; a run from an
adapter kit trained keeps that adapter as its reference; the pairs file's malformed inputs are
one-line errors and `kit data check` reports pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import families
from helpers import run_cli
from test_families import LORA

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
# The chat template: each family's own (what kit adapt uses), so every family's image tokens are its processor's.
DPO = [*LORA, "--set", "data.template=chat", "--set", "train.objective=dpo", "--set", "preference.beta=0.5", "--set", "train.lr=2e-2"]
# Three families in the default run; the other eight with `-m slow` (every family trains this way).
DEFAULT_FAMILIES = ("llava", "qwen2_vl", "idefics3")
FAMILIES = [f if f in DEFAULT_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in families.FAMILIES]


def pairs_file(root: Path, n: int = 8) -> Path:
    """Colour questions: the chosen answer names the image's colour, the rejected one the other."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name, other = list(COLOURS)[i % 2], list(COLOURS)[(i + 1) % 2]
        Image.new("RGB", (48 + 8 * (i % 3), 40), COLOURS[name]).save(root / "images" / f"{i}.png")
        rows.append({"id": f"p{i}", "image": f"images/{i}.png", "prompt": [{"from": "human", "value": "<image>\nWhat colour is it?"}],
                     "chosen": f"It is {name}.", "rejected": f"It is {other}.", "edit": {"kind": "swap", "from": name, "to": other}})
    f = root / "pairs.json"
    f.write_text(json.dumps(rows))
    return f


def _margins(log: Path) -> list[float]:
    import csv

    with open(log) as fh:
        return [float(r["rewards/margins"]) for r in csv.DictReader(fh)]


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_learns_the_preference_and_moves_only_the_adapter(family, smol_tokenizer_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from kit.base.family import family_of

    base = families.save(family, smol_tokenizer_dir, tmp_path / "base")
    fam = family_of(base)
    data = pairs_file(tmp_path / "data")
    out = tmp_path / "dpo"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(base), "--data", str(data),
                           "--out", str(out), "--max-steps", "8", *DPO)
    assert code == 0, err
    assert "data: 8/8 pairs usable" in err
    margins = _margins(out / "log.csv")
    assert len(margins) == 8 and sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.5, margins
    card = json.loads((out / "kit.json").read_text())
    pref = card["preference"]
    assert pref["beta"] == 0.5 and pref["pairs"] == {"used": 8, "by_edit": {"swap": 8}} and pref["reward_margin"]["last"] > 0.5

    weights = _state(out)
    assert not (out / "ref").exists() and not any(".ref." in k for k in weights), "TRL's reference copy must not be saved"
    lora = [k for k in weights if "lora_" in k]
    assert lora and all(fam.in_llm_body(k.replace(".lora_A.weight", "").replace(".lora_B.weight", "")) for k in lora)
    saved = [k for k in weights if "lora_" not in k]
    assert saved and all(fam.part_of(k) == "projector" for k in saved), saved

    # Plain PEFT: the merged model differs from the base in the LLM and projector only; the tower is untouched.
    plain = AutoModelForImageTextToText.from_pretrained(base)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    merged = PeftModel.from_pretrained(plain, out).merge_and_unload().state_dict()
    moved = {fam.part_of(k) for k in before if k in merged and not torch.equal(before[k], merged[k])}
    assert moved == {"llm", "projector"}, moved

    code, stdout, err = run_cli(capsys, "merge", str(out), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()


def test_dpo_with_qlora_trains_on_the_4bit_base(smol_tokenizer_dir, tmp_path, capsys):
    """QLoRA as kit adapt runs it: the LLM's linear layers in nf4 (bitsandbytes, on the CPU here),
    TRL's reference taken from the same 4-bit weights with the starting adapter; the margin rises,
    the trained weights stay fp32 as in kit's SFT, the card says nf4, and plain PEFT loads it."""
    from kit.train.trainer import CheckpointCardCallback

    seen = {}
    real = CheckpointCardCallback.on_train_begin

    def spy(self, args, state, control, model=None, **kw):
        import bitsandbytes as bnb

        seen["4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        return real(self, args, state, control, model=model, **kw)

    base = families.save("llava", smol_tokenizer_dir, tmp_path / "base")
    out = tmp_path / "dpo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckpointCardCallback, "on_train_begin", spy, raising=False)
        code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(base), "--data",
                               str(pairs_file(tmp_path / "data")), "--out", str(out), "--max-steps", "8", *DPO,
                               "--set", "quantization=nf4")
    assert code == 0, err
    assert seen["4bit"] == 14, seen  # 2 layers x (q, k, v, o, gate, up, down)
    margins = _margins(out / "log.csv")
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.5, margins
    from kit.core.cards import Card

    card = Card.read(out)
    assert card.quantization == "nf4" and json.loads((out / "kit.json").read_text())["preference"]["pairs"]["used"] == 8
    weights = _state(out)
    assert not any(".ref." in k for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values()), "trained weights saved as kit's SFT saves them"
    # Plain PEFT loads it on the full-precision base. (kit merge of a 4-bit adapter is not run here:
    # bitsandbytes' CPU inference path cannot pack this fixture's 32-wide layers, smaller than its 64 block.)
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), out)


def test_dpo_from_an_adapter_keeps_it_as_the_reference(smol_tokenizer_dir, tmp_path, capsys):
    base = families.save("llava", smol_tokenizer_dir, tmp_path / "base")
    data = pairs_file(tmp_path / "data")
    sft = tmp_path / "sft"
    rows = [{"id": p["id"], "image": p["image"], "conversations": [*p["prompt"], {"from": "gpt", "value": p["chosen"]}]}
            for p in json.loads(data.read_text())]
    (tmp_path / "data" / "sft.json").write_text(json.dumps(rows))
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(base), "--data",
                           str(tmp_path / "data" / "sft.json"), "--out", str(sft), "--max-steps", "4", *LORA,
                           "--set", "data.template=chat")
    assert code == 0, err
    out = tmp_path / "dpo"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--from", str(sft), "--data", str(data),
                           "--out", str(out), "--max-steps", "3", *DPO)
    assert code == 0, err
    # The reference is the SFT adapter: the first step's policy equals it, so the first margin is 0.
    margins = _margins(out / "log.csv")
    assert margins[0] == pytest.approx(0.0, abs=1e-4) and margins[-1] > margins[0]
    card = json.loads((out / "kit.json").read_text())
    assert card["preference"]["from"] == str(sft) and card["base"]["path"] == str(base.resolve())
    # What it started from is the SFT adapter, not a fresh LoRA: same keys, other values after training.
    start, end = _state(sft), _state(out)
    assert set(start) == set(end) and any(not torch.equal(start[k], end[k]) for k in start)

    other = families.save("qwen2_vl", smol_tokenizer_dir, tmp_path / "other")
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--from", str(sft), "--base", str(other),
                           "--data", str(data), "--out", str(tmp_path / "x"), *DPO)
    assert code != 0 and err.count("\n") == 1 and "leave --base out" in err


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.pop("chosen"), "[0]: field 'chosen' must be the answer's text"),
    (lambda p: p.update(rejected=p["chosen"]), "[0]: 'chosen' and 'rejected' are the same text"),
    (lambda p: p.update(prompt=[{"from": "gpt", "value": "x"}]), "[0]: the prompt's last turn must be the question"),
    (lambda p: p.update(prompt=7), "[0]: field 'prompt' must be the question"),
    (lambda p: p.update(image=5), "[0]: field 'image' must be a relative path"),
    (lambda p: p.update(chosen="<image> red"), "[0]: an answer holds <image>"),
    (lambda p: p.update(image="images/missing.png"), "pair 'p0': chosen answer: image file"),
])
def test_malformed_pairs_are_one_line_errors(edit, message, tiny_base, tmp_path, capsys):
    data = pairs_file(tmp_path / "data", n=2)
    rows = json.loads(data.read_text())
    edit(rows[0])
    data.write_text(json.dumps(rows))
    code, stdout, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", str(data),
                                "--out", str(tmp_path / "o"), *DPO)
    assert code != 0 and err.count("\n") == 1 and message in err, err
    assert str(data) in err and not (tmp_path / "o").exists()


def test_data_check_reports_pairs(tiny_base, tmp_path, capsys):
    data = pairs_file(tmp_path / "data", n=4)
    rows = json.loads(data.read_text())
    rows[1]["chosen"] = "red " * 400  # longer than max_length with the prompt
    data.write_text(json.dumps(rows))
    code, out, err = run_cli(capsys, "data", "check", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", str(data),
                             *DPO, "--set", "data.max_length=256")
    said = out + err
    assert code != 0, said
    assert "pairs:    3/4 pairs usable" in said and "p1" in said and "longer than max_length 256" in said
    assert "edits:    4 swap" in said and "prompt + chosen" in said and "prompt + rejected" in said


def test_adapt_with_the_preference_recipe_makes_pairs_trains_from_the_adapter_and_measures(tiny_base, tmp_path, capsys):
    from test_pairs import _manifest

    src = _manifest(tmp_path / "src")
    with open(src / "eval.jsonl", "w") as fh:
        for i, line in enumerate(map(json.loads, (src / "manifest.jsonl").read_text().splitlines())):
            for j, (q, a) in enumerate((("Is this a CT image?", "yes" if "CT" in line["captions"][0] else "no"), ("Is there a dog?", "no"))):
                fh.write(json.dumps({"id": f"q{i}-{j}", "image": line["image"], "question": q, "answer": a,
                                     "answer_type": "closed"}) + "\n")
    sft_data = tmp_path / "sft" / "train.json"
    sft_data.parent.mkdir()
    rows = [{"id": f"c{i}", "image": line["image"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": line["captions"][0]}]}
        for i, line in enumerate(map(json.loads, (src / "manifest.jsonl").read_text().splitlines()))]
    sft_data.write_text(json.dumps(rows))
    sft = tmp_path / "sft-adapter"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(tiny_base), "--data", str(sft_data),
                           "--out", str(sft), "--max-steps", "2", *LORA, "--set", "data.template=chat",
                           "--set", f"data.image_folder={src}")
    assert code == 0, err

    out = tmp_path / "dpo"
    pairs_of = list(zip(DPO[::2], DPO[1::2]))  # the recipe sets its own objective and template
    settings = [a for flag, value in pairs_of if value not in ("train.objective=dpo", "data.template=chat") for a in (flag, value)]
    code, stdout, err = run_cli(capsys, "adapt", "--recipe", "medical-dpo", "--from", str(sft), "--data", str(src), "--out", str(out),
                                "--max-steps", "3", *settings, "--set", "eval.held_out=0.25", "--set", "eval.max_new_tokens=4",
                                "--set", "data.image_aspect=pad", "--set", "eval.gate.closed_drop=100")
    assert code == 0, err
    made = next(line for line in err.splitlines() if line.startswith("pairs: "))
    assert "grounded answers" in made
    assert "evaluating the starting adapter on the held-out images" in err
    header = next(line for line in err.splitlines() if line.startswith("metric "))
    assert "start" in header and "after" in header
    pairs = json.loads((src / ".kit" / "medical-dpo" / "pairs.json").read_text())
    held = json.loads((out / "kit.json").read_text())["evaluation"]
    # The held-out images never give a pair.
    assert pairs and not {p["image"] for p in pairs} & {json.loads(line)["image"] for line in open(held["data"])}
    card = json.loads((out / "kit.json").read_text())
    assert card["preference"]["from"] == str(sft) and sum(card["preference"]["pairs"]["by_edit"].values()) == len(pairs)
    assert card["evaluation"]["before"] == str(sft) and card["evaluation"]["gate"]["passed"]
