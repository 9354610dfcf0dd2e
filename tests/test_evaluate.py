"""Inference loading (model or adapter folder, from the path alone) and LLaVA-Med-style VQA scores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny
from kit.core.errors import KitError
from kit.eval.metrics import strict_closed, strict_open_recall
from kit.eval.vqa import before_after_table, evaluate, load_items, write_predictions
from kit.infer.load import describe_folder, load_for_inference

TINY = tiny()


@pytest.fixture(scope="module")
def adapter(tiny_base, shapes, tmp_path_factory) -> Path:
    from kit.core.recipes import load_recipe
    from kit.train.run import train

    recipe = load_recipe("llava15-lora", TINY + ["train.max_steps=3", "lora.r=4", "lora.alpha=8", "train.lr=1e-2", "train.projector_lr=1e-3"])
    return train(recipe, base=str(tiny_base), data=shapes["instruct"], out=str(tmp_path_factory.mktemp("ad") / "lora"), echo=lambda m: None)


@pytest.fixture(scope="module")
def eval_file(shapes, tmp_path_factory) -> Path:
    """Closed 'Is the shape red?' and open 'What colour is the shape?' questions on 5 drawn images."""
    root = tmp_path_factory.mktemp("vqa")
    attrs = json.loads(Path(shapes["attributes"]).read_text())
    lines = []
    for name in sorted(attrs)[:5]:
        (root / "images").mkdir(exist_ok=True)
        shutil.copy(Path(shapes["root"]) / "images" / f"{name}.png", root / "images" / f"{name}.png")
        colour = attrs[name]["colour"]
        lines.append({"id": f"{name}-c", "image": f"images/{name}.png", "question": "Is the shape red?",
                      "answer": "yes" if colour == "red" else "no", "answer_type": "closed"})
        lines.append({"id": f"{name}-o", "image": f"images/{name}.png", "question": "What colour is the shape?",
                      "answer": colour, "answer_type": "open"})
    path = root / "vqa.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _edit_card(folder: Path, **changes) -> None:
    card = json.loads((folder / "kit.json").read_text())
    for dotted, value in changes.items():
        node = card
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (folder / "kit.json").write_text(json.dumps(card))


# ---------------------------------------------------------------------------------- metrics


def test_strict_closed_accuracy_uses_the_first_yes_no_word():
    assert strict_closed("Yes, it is.", "yes")
    assert not strict_closed("No.", "yes")
    assert strict_closed("NO! it is not", "No")
    assert not strict_closed("It is red.", "yes")  # no yes/no word: wrong
    assert not strict_closed("no, yes", "yes")  # the first one counts
    assert not strict_closed("Nothing, yesterday.", "no")  # whole words only


def test_strict_closed_options_other_than_yes_no():
    assert strict_closed("Left.", "left") and strict_closed("CT scan", "CT")
    assert not strict_closed("The left side", "left")  # the answer must come first
    assert not strict_closed("right", "left")


def test_strict_open_recall_counts_ground_truth_words_in_the_prediction():
    assert strict_open_recall("a red square", "red") == 1.0
    assert strict_open_recall("blue", "red") == 0.0
    assert strict_open_recall("The LEFT lung.", "left lung") == 1.0
    assert strict_open_recall("the left kidney", "left lung") == 0.5
    assert strict_open_recall("right upper lobe", "Right-lower lobe!") == pytest.approx(2 / 3)
    assert strict_open_recall("", "red") == 0.0
    assert strict_open_recall("left left left", "left lung") == 0.5  # a repeated word counts once


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "a", "image": "x.png", "question": "q?", "answer": "yes"', "invalid JSON"),
        ('{"id": "a", "image": "images/shape_00000.png", "answer": "yes", "answer_type": "closed"}', "missing field 'question'"),
        ('{"id": "a", "image": "images/shape_00000.png", "question": "q?", "answer": "yes", "answer_type": "yesno"}', "unknown answer_type 'yesno'"),
        ('{"id": "a", "image": "images/nope.png", "question": "q?", "answer": "yes", "answer_type": "closed"}', "is missing"),
        ('{"id": "a", "image": "../outside.png", "question": "q?", "answer": "yes", "answer_type": "closed"}', "escapes"),
        ('{"id": "a", "image": "images/shape_00000.png", "question": "q?", "answer": "?!", "answer_type": "closed"}', "has no words"),
    ],
)
def test_bad_eval_lines_name_file_and_line(eval_file, request, line, message):
    bad = eval_file.parent / f"bad-{request.node.callspec.indices['line']}.jsonl"  # beside the images
    good = eval_file.read_text().splitlines()[0]
    bad.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(KitError) as e:
        load_items(bad)
    assert f"{bad}:3:" in str(e.value) and message in str(e.value), str(e.value)


def test_missing_eval_file_and_empty_file(tmp_path):
    with pytest.raises(KitError, match="does not exist"):
        load_items(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(KitError, match="no questions"):
        load_items(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------------------------- loading


def test_loads_base_folder_and_adapter_folder_from_the_path_alone(tiny_base, adapter):
    from peft import PeftModel

    loaded = load_for_inference(tiny_base)
    assert loaded.kind == "model" and not isinstance(loaded.model, PeftModel) and not loaded.model.training
    assert hasattr(loaded.processor, "tokenizer") and hasattr(loaded.processor, "image_processor")
    loaded = load_for_inference(adapter)
    assert isinstance(loaded.model, PeftModel) and loaded.kind == "adapter"
    assert loaded.base.path.resolve() == tiny_base.resolve() and loaded.quantization == "none" and loaded.notes == []
    assert loaded.spec.template == "vicuna_v1" and loaded.spec.image_aspect == "pad"
    d = describe_folder(adapter)
    assert d["kind"] == "adapter" and d["recipe"] == "llava15-lora" and d["steps"] == 3 and "train_loss" in d["metrics"]
    assert describe_folder(tiny_base)["kind"] == "base"


def test_neither_model_nor_adapter_is_refused(tmp_path):
    with pytest.raises(KitError, match="neither a model folder"):
        load_for_inference(tmp_path)
    with pytest.raises(KitError, match="does not exist"):
        load_for_inference(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(KitError, match="without a vision tower"):
        load_for_inference(tmp_path)


def test_adapter_refuses_a_moved_or_changed_base(tiny_base, adapter, tmp_path):
    ad, base = tmp_path / "adapter", tmp_path / "base"
    shutil.copytree(adapter, ad)
    shutil.copytree(tiny_base, base)
    _edit_card(ad, base__path=str(base))
    assert load_for_inference(ad).base.path == base  # an identical copy is accepted

    base.rename(tmp_path / "moved")
    with pytest.raises(KitError) as e:
        load_for_inference(ad)
    msg = str(e.value)
    assert str(base) in msg and "does not exist" in msg and "kit.json" in msg and "--base" not in msg

    (tmp_path / "moved").rename(base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-3
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KitError, match="trained on a different base"):
        load_for_inference(ad)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU fallback of an nf4 adapter")
def test_nf4_adapter_loads_unquantized_on_cpu_with_a_note(adapter, tmp_path):
    ad = tmp_path / "qlora"
    shutil.copytree(adapter, ad)
    _edit_card(ad, recipe__quantization="nf4")
    loaded = load_for_inference(ad)
    assert loaded.quantization == "nf4" and loaded.device == "cpu"
    assert any("unquantized" in n for n in loaded.notes)


def test_adapter_loads_with_plain_transformers_and_peft_without_kit(tiny_base, adapter):
    code = f"""
import sys
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(tiny_base)!r})
model = PeftModel.from_pretrained(model, {str(adapter)!r})
processor = AutoProcessor.from_pretrained({str(adapter)!r})
assert not any(k == "kit" or k.startswith("kit.") for k in sys.modules)
print(type(model).__name__, type(processor).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd="/",
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["PeftModelForCausalLM", "LlavaProcessor"]
    import kit.infer.load

    assert "PeftModel.from_pretrained(model, \"path/to/adapter\")" in kit.infer.load.__doc__


# ------------------------------------------------------------------------------- evaluation


def test_evaluate_scores_base_and_adapter(tiny_base, adapter, eval_file, tmp_path):
    lines = []
    base = evaluate(tiny_base, eval_file, batch_size=4, max_new_tokens=8, echo=lines.append)
    after = evaluate(adapter, eval_file, batch_size=3, max_new_tokens=8, echo=lines.append)
    for r in (base, after):
        assert (r["n_closed"], r["n_open"]) == (5, 5) and len(r["predictions"]) == 10
        for key in ("closed_accuracy", "open_recall", "overall"):
            assert 0.0 <= r[key] <= 1.0
        assert all(isinstance(p["prediction"], str) and 0 <= p["score"] <= 1 for p in r["predictions"])
    assert any("10 questions (5 closed, 5 open)" in m for m in lines)
    # Left-padded batches answer exactly as one question at a time does.
    single = evaluate(adapter, eval_file, limit=4, batch_size=1, max_new_tokens=8, echo=lambda m: None)
    assert [p["prediction"] for p in single["predictions"]] == [p["prediction"] for p in after["predictions"][:4]]
    assert single["n_closed"] + single["n_open"] == 4

    table = before_after_table(base, after)
    assert table.splitlines()[0].split("|")[1:] and "adapted" in table and "change" in table
    assert "closed accuracy" in table and "open recall" in table and "95% interval" in table
    assert "metric: llava-med (questions as-written)" in table
    assert "too few questions to tell this change from noise" in table or "larger than the noise" in table
    for r in (base, after):
        assert r["metric"] == "llava-med" and r["prompts"] == "as-written"
        lo, hi = r["overall_ci"]
        assert lo <= r["overall"] <= hi

    out = write_predictions(after, tmp_path / "preds" / "p.jsonl")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in after["predictions"]]
    assert not list(out.parent.glob(".*.tmp"))


def test_eval_command_prints_a_table_and_writes_predictions(adapter, tiny_base, eval_file, tmp_path):
    from kit.eval.command import eval_command

    lines = []
    r = eval_command(adapter, eval_file, limit=2, out=tmp_path / "p.jsonl", echo=lines.append, baseline=tiny_base, max_new_tokens=4)
    assert r["n_closed"] + r["n_open"] == 2 and r["baseline"]["n_closed"] + r["baseline"]["n_open"] == 2
    assert any("base" in m and "adapted" in m and "change" in m for m in lines)
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
    with pytest.raises(KitError, match="--limit"):
        eval_command(adapter, eval_file, limit=0, echo=lines.append)
