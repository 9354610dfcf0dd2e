"""Every model family kit adapts, as a user downloads it (tests/families.py builds each offline):
data check -> adapt (LoRA, QLoRA) -> eval -> merge -> chat -> serve, through the CLI.

The fixtures are first shown valid in plain transformers, so a failure here is kit's."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import families
from helpers import as_flags, run_cli, run_cli_captured, tiny

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}
# Two sizes (and, with image_aspect crop, two shapes), so families whose token count depends on
# the image get different counts within one run.
SIZES = [(40, 24), (24, 64)]
LORA = ["--set", "quantization=none", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.dropout=0",
        "--set", "train.batch_size=2", "--set", "train.global_batch_size=2", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.gradient_checkpointing=false", "--set", "data.max_length=1024",
        "--set", "train.save_steps=1000", "--set", "data.image_aspect=crop", "--set", "train.lr=3e-2",
        "--set", "train.projector_lr=1e-2", "--set", "train.warmup_ratio=0", "--set", "data.group_by_modality_length=false",
        "--set", "train.logging_steps=1"]


@pytest.fixture(scope="module", params=families.FAMILIES)
def family_base(request, smol_tokenizer_dir, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, families.save(family, smol_tokenizer_dir, tmp_path_factory.mktemp(family) / "base")


def _data(root: Path, multi: bool, text_only: bool = True) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        name = list(COLOURS)[i % 2]
        size = SIZES[(i // 2) % 2]
        Image.new("RGB", size, COLOURS[name]).save(root / "images" / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": name}]})
    if multi:
        rows.append({"id": "pair", "image": ["images/0.png", "images/1.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat colours are these?"}, {"from": "gpt", "value": "red, then blue"}]})
    if text_only:
        rows.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
    f = root / "train.json"
    f.write_text(json.dumps(rows))
    with open(root / "eval.jsonl", "w") as e:
        for i in range(2):
            e.write(json.dumps({"id": f"q{i}", "image": f"images/{i}.png", "question": "What colour is it?", "answer": list(COLOURS)[i % 2],
                                "answer_type": "open"}) + "\n")
    return f


def test_fixture_is_valid_in_plain_transformers(family_base):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family, base = family_base
    model = AutoModelForImageTextToText.from_pretrained(base)
    proc = AutoProcessor.from_pretrained(base)
    img = Image.new("RGB", SIZES[0], COLOURS["red"])
    if family == "paligemma":
        inputs = proc(text=["What colour is it?"], images=[img], suffix=["red"], return_tensors="pt")
    else:
        text = proc.apply_chat_template(families.messages(1, "What colour is it?", "red"), tokenize=False)
        inputs = proc(text=[text], images=[img], return_tensors="pt")
        inputs["labels"] = inputs["input_ids"].clone()
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)


def fam_type(base: Path) -> str:
    return json.loads((base / "config.json").read_text())["model_type"]


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# The whole command chain, one test per command over one trained adapter per family (module
# scope): a failing command is named by its test, and the others still run.


@pytest.fixture(scope="module")
def family_data(family_base, tmp_path_factory) -> Path:
    from kit.base.family import family_of

    family, base = family_base
    fam = family_of(base)
    # The prefix layout (PaliGemma) has no text-only form: such a sample is a problem kit names.
    return _data(tmp_path_factory.mktemp(f"{family}-data"), fam.images == "many", text_only=fam.prompt == "chat")


@pytest.fixture(scope="module")
def family_adapter(family_base, family_data, tmp_path_factory) -> Path:
    """`kit adapt` (LoRA, 12 steps) on the family's data."""
    family, base = family_base
    adapter = tmp_path_factory.mktemp(f"{family}-adapter") / "adapter"
    code, _, err = run_cli_captured("adapt", "--recipe", "llava15-qlora", "--base", str(base), "--data", str(family_data),
                                    "--out", str(adapter), "--max-steps", "12", *LORA)
    assert code == 0, err
    return adapter


@pytest.fixture(scope="module")
def family_merged(family_adapter, tmp_path_factory) -> Path:
    merged = tmp_path_factory.mktemp("merged") / "merged"
    code, _, err = run_cli_captured("merge", str(family_adapter), "--out", str(merged))
    assert code == 0, err
    return merged


def test_command_data_check(family_base, family_data, capsys):
    """kit data check: every sample usable, every image's own count."""
    from kit.base.family import family_of

    _, base = family_base
    code, out, err = run_cli(capsys, "data", "check", "--recipe", "llava15-qlora", "--base", str(base), "--data", str(family_data), *LORA)
    assert code == 0, err
    said = out + err
    assert "problems: none" in said, said
    assert family_of(base).label in said


def test_command_adapt(family_base, family_adapter):
    """kit adapt, LoRA: it learns, LoRA sits on the LLM's linear layers only, the projector trains, the tower does not."""
    from transformers import AutoModelForImageTextToText

    from kit.base.family import family_of
    from kit.train.logs import read_losses

    _, base = family_base
    fam = family_of(base)
    losses = [loss for _, loss in read_losses(family_adapter / "log.csv")]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    weights = _state(family_adapter)
    lora = [k for k in weights if "lora_" in k]
    assert lora and all(fam.in_llm_body(k.replace(".lora_A.weight", "").replace(".lora_B.weight", "")) for k in lora)
    saved = [k for k in weights if "lora_" not in k]  # modules_to_save, stored under their own names
    assert saved and all(fam.part_of(k) == "projector" for k in saved), saved
    base_state = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    assert all(not torch.equal(weights[k], base_state[k.removeprefix("base_model.model.")]) for k in saved), "the projector did not train"


def test_command_adapt_qlora(family_base, family_data, tmp_path, capsys):
    """QLoRA: exactly the LLM's linear layers are 4-bit; nothing in the tower, projector or head."""
    from kit.base.family import family_of
    from kit.base.load import load_model
    from kit.train.model import llm_linear_names

    _, base = family_base
    fam = family_of(base)
    q = load_model(base, nf4=True)
    four_bit = sorted(n for n, m in q.named_modules() if type(m).__name__ == "Linear4bit")
    assert four_bit == sorted(llm_linear_names(load_model(base), fam))
    assert not any(fam.part_of(n) != "llm" or not fam.in_llm_body(n) for n in four_bit)
    code, out, err = run_cli(capsys, "adapt", "--recipe", "llava15-qlora", "--base", str(base), "--data", str(family_data),
                             "--out", str(tmp_path / "qadapter"), "--max-steps", "2", *LORA, "--set", "quantization=nf4")
    assert code == 0, err


def test_command_merge_two_adapters(family_base, family_data, family_adapter, tmp_path, capsys):
    """kit merge A B: two adapters of one family combine (LoRA ΔW summed, projectors averaged), verified."""
    from transformers import AutoModelForImageTextToText

    _, base = family_base
    second = tmp_path / "second"
    code, out, err = run_cli(capsys, "adapt", "--recipe", "llava15-qlora", "--base", str(base), "--data", str(family_data),
                             "--out", str(second), "--max-steps", "2", *LORA, "--set", "train.seed=1")
    assert code == 0, err
    code, out, err = run_cli(capsys, "merge", str(family_adapter), str(second), "--out", str(tmp_path / "merged2"))
    assert code == 0, err
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "merged2").config.model_type == fam_type(base)


def test_command_eval(family_data, family_adapter, capsys):
    code, out, err = run_cli(capsys, "eval", str(family_adapter), "--data", str(family_data.parent / "eval.jsonl"))
    assert code == 0, err
    assert "open" in out + err


def test_command_merge(family_base, family_merged):
    """kit merge: verified with the family's own prompt; the result loads in plain transformers."""
    from transformers import AutoModelForImageTextToText

    _, base = family_base
    assert AutoModelForImageTextToText.from_pretrained(family_merged).config.model_type == fam_type(base)
    assert not any("lora" in k for k in _state(family_merged))


def test_command_chat(family_data, family_adapter, family_merged, capsys):
    """kit chat on the merged model and on the adapter answer alike (greedy)."""
    image = family_data.parent / "images" / "0.png"
    answers = []
    for model in (family_adapter, family_merged):
        code, out, err = run_cli(capsys, "chat", str(model), "--image", str(image), "--prompt", "What colour is it?",
                                 "--max-new-tokens", "4")
        assert code == 0, err
        answers.append(out.strip())
    assert answers[0] == answers[1]


def test_command_serve(family_data, family_adapter):
    """kit serve: an OpenAI request with an inline image goes through the family's processor."""
    from openai import OpenAI

    from kit.core.http import running
    from kit.serve.app import create_app
    from kit.serve.pool import load_pool

    image = family_data.parent / "images" / "0.png"
    pool = load_pool(family_adapter, echo=lambda m: None)
    with running(create_app(pool)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        name = client.models.list().data[0].id  # the adapter: listed first
        content = [{"type": "image_url", "image_url": {"url": _data_url(Image.open(image))}},
                   {"type": "text", "text": "What colour is it?"}]
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0


def test_samples_carry_the_processors_tensors_and_exact_labels(family_base, tmp_path):
    """Per family: labels are the answer and its end marker and nothing else; every tensor the
    family description lists reaches the batch; counts follow the image where the processor says so."""
    from transformers import AutoProcessor

    from kit.base.family import family_of
    from kit.data.collator import Collator
    from kit.data.dataset import IGNORE, build_dataset

    family, base = family_base
    fam = family_of(base)
    proc = AutoProcessor.from_pretrained(base)
    data = _data(tmp_path / "data", fam.images == "many", text_only=fam.prompt == "chat")
    ds, report = build_dataset(data, proc, "chat", 1024, "crop", family=fam)
    assert not report.problems, report.problem_lines()
    tok = proc.tokenizer
    for item in ds.items:
        supervised = tok.decode([int(t) for t, l in zip(item.input_ids, item.labels) if l != IGNORE])
        answer = json.loads(data.read_text())[[it.id for it in ds.items].index(item.id)]["conversations"][1]["value"]
        assert supervised.strip().startswith(answer), (supervised, answer)
        rest = supervised.strip()[len(answer):].strip()
        assert rest in {t for t in (tok.eos_token, families.END_OF_TURN.get(family)) if t}, rest
    lengths = {it.id: len(it.input_ids) for it in ds.items}
    if family in families.VARIABLE_COUNT:
        assert lengths["s0"] != lengths["s2"], "an image of another shape takes another number of tokens"
    batch = Collator(ds.processing.pad_id)([ds[i] for i in range(len(ds))])
    # families.yaml names every tensor the processor returns, and which are per token.
    assert set(batch) == {"input_ids", "attention_mask", "labels", *fam.inputs.image, *fam.inputs.token}, sorted(batch)
    assert all(batch[k].shape == batch["input_ids"].shape for k in fam.inputs.token)
    if fam.prompt == "prefix":  # PaliGemma: the answer (and only it) is the causal suffix
        assert torch.equal(batch["token_type_ids"].bool() & batch["attention_mask"].bool(), batch["labels"] != IGNORE)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    assert torch.isfinite(model(**batch).loss)


def test_a_family_kit_does_not_know_is_a_one_line_error(tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "blip-2", "vision_config": {}, "text_config": {}}))
    data = _data(tmp_path / "data", False)
    code, out, err = run_cli(capsys, "data", "check", "--recipe", "llava15-qlora", "--base", str(base), "--data", str(data))
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "model_type 'blip-2'" in lines[0] and "supported:" in lines[0] and "qwen2_vl" in lines[0], err


def test_llavas_own_templates_on_a_family_with_other_image_tokens_is_a_one_line_error(smol_tokenizer_dir, tmp_path, capsys):
    """vicuna_v1 / plain write LLaVA's <image> ids; on Qwen2-VL (<|image_pad|> between its own
    markers) the model found no image and failed mid-training with transformers' mismatch error."""
    base = families.save("qwen2_vl", smol_tokenizer_dir, tmp_path / "qwen2_vl")
    data = _data(tmp_path / "data", False)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", "--recipe", "llava15-lora", "--base", str(base), "--data", str(data), "--out", str(out),
                           *as_flags(tiny(lora=True)))
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert code != 0 and len(lines) == 1 and "template vicuna_v1" in lines[0] and "<|image_pad|>" in lines[0], err
    assert "use template chat" in lines[0] and not out.exists()


def test_several_images_where_the_family_takes_one_are_named(smol_tokenizer_dir, tmp_path):
    from transformers import AutoProcessor

    from kit.base.family import family_of
    from kit.data.dataset import build_dataset

    base = families.save("paligemma", smol_tokenizer_dir, tmp_path / "paligemma")
    data = _data(tmp_path / "data", True, text_only=False)
    ds, report = build_dataset(data, AutoProcessor.from_pretrained(base), "chat", 1024, "crop", on_bad_sample="skip",
                               family=family_of(base))
    assert [(sid, reason) for sid, _, reason in report.problems] == [("pair", "2 images; PaliGemma takes one image per sample")]
    assert len(ds) == 6


def test_truncation_that_would_cut_an_image_is_found_before_training(smol_tokenizer_dir, tmp_path):
    """With per-image counts (Qwen2-VL: dynamic resolution), a max_length that ends inside an
    image's tokens or markers is a named problem; one that only cuts the answer's tail is not."""
    from transformers import AutoProcessor

    from kit.base.family import family_of
    from kit.data.dataset import build_dataset
    from kit.data.processing import Processing

    base = families.save("qwen2_vl", smol_tokenizer_dir, tmp_path / "qwen")
    proc = AutoProcessor.from_pretrained(base)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), COLOURS["red"]).save(root / "images" / "big.png")
    long_answer = "red " * 40
    (root / "train.json").write_text(json.dumps([{"id": "big", "image": "images/big.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": long_answer}]}]))
    n_image = Processing(proc, "chat", "crop").image_tokens((64, 64))
    assert n_image > 8  # the vision start/end markers around the image's own tokens
    full, _ = build_dataset(root / "train.json", proc, "chat", 4096, "crop", family=family_of(base))
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_end = int(max(i for i, t in enumerate(full.items[0].input_ids) if t == pad)) + 1
    from kit.core.errors import KitError
    from kit.data.dataset import IGNORE

    first_answer = int(np.argmax(full.items[0].labels != IGNORE))
    ok, _ = build_dataset(root / "train.json", proc, "chat", first_answer + 3, "crop", family=family_of(base))
    assert ok.items[0].truncated and len(ok.items[0].input_ids) == first_answer + 3

    with pytest.raises(KitError, match="image tokens would be truncated"):
        build_dataset(root / "train.json", proc, "chat", image_end - 2, "crop", family=family_of(base))


def test_onevision_hub_template_is_not_prefix_consistent_and_kit_trains_what_inference_sees(smol_tokenizer_dir, tmp_path, capsys):
    """The fixture's template has the quirk of the one llava-hf ships (proved here in plain
    transformers): a finished assistant turn does not extend the generation prompt. kit builds such
    samples from the generation-prompt renders: every answer follows exactly the prompt inference
    uses, its labels are the answer and the end marker, and `kit data check` says so once."""
    from transformers import AutoProcessor

    from kit.data.dataset import IGNORE, build_dataset

    base = families.save("llava_onevision", smol_tokenizer_dir, tmp_path / "ov")
    proc = AutoProcessor.from_pretrained(base)
    convo = families.messages(1, "What colour is it?", "red")
    prompt = proc.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True)
    full = proc.apply_chat_template(convo, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>assistant \nred<|im_end|>" in full
    assert not full.startswith(prompt)

    rows = [{"id": "two-rounds", "image": "images/0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "A square."}]}]
    data = _data(tmp_path / "data", False)
    data.write_text(json.dumps(json.loads(data.read_text()) + rows))
    ds, report = build_dataset(data, proc, "chat", 1024, "crop", family=None)
    assert not report.problems and report.from_prompts == len(ds.items) == 8
    tok = proc.tokenizer
    item = next(it for it in ds.items if it.id == "two-rounds")
    ids, labels = item.input_ids.tolist(), item.labels.tolist()
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["red<|im_end|>", "A square.<|im_end|>"]
    for a, _ in spans:  # what precedes each answer ends exactly as the inference prompt does
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")
    second_prompt = proc.apply_chat_template(
        [*convo, {"role": "user", "content": [{"type": "text", "text": "And its shape?"}]}], tokenize=False, add_generation_prompt=True)
    assert second_prompt.endswith("<|im_end|>\n<|im_start|>user \nAnd its shape?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids[:spans[1][0]]).endswith("<|im_start|>user \nAnd its shape?<|im_end|>\n<|im_start|>assistant\n")

    code, out, err = run_cli(capsys, "data", "check", "--recipe", "llava15-qlora", "--base", str(base), "--data", str(data), *LORA)
    assert code == 0 and "problems: none" in out + err, out + err
    assert (out + err).count("built from the generation-prompt renders") == 1


def test_readme_family_table_is_the_family_data():
    """families.yaml is the one description: the README's table names every family's example
    checkpoint and model types as the data does."""
    from kit.base.family import families as described_families

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| family (`model_type`)"):readme.index("\n\n", readme.index("| family (`model_type`)"))]
    rows = table.splitlines()[2:]
    for fam in described_families().values():
        row = next((r for r in rows if f"`{fam.hub_example}`" in r), None)
        assert row is not None, f"README's family table has no row with {fam.name}'s example {fam.hub_example}"
        assert all(f"`{t}`" in row for t in fam.model_types), (fam.name, fam.model_types, row)
