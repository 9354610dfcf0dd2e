"""Exact label masks per template, and per-sample diagnostics instead of silent failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kit.data.dataset import IGNORE, SampleProblem, build_dataset, encode_sample
from kit.data.collator import Collator
from kit.data.formats import Sample, load_samples
from kit.data.sampler import modality_length_order
from kit.core.errors import KitError


@pytest.fixture(scope="module")
def processor(tiny_base):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_base)


def _sample(image="img.png"):
    convs = [
        {"from": "human", "value": "What colour is it?\n<image>" if image else "What colour is it?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the shape?"},
        {"from": "gpt", "value": "A circle."},
    ]
    return {"id": "s1", "image": image, "conversations": convs} if image else {"id": "s1", "conversations": convs}


def _write(tmp_path: Path, records, name="data.json", image=True) -> Path:
    if image:
        Image.new("RGB", (20, 10), (200, 0, 0)).save(tmp_path / "img.png")
    f = tmp_path / name
    if name.endswith(".jsonl"):
        f.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        f.write_text(json.dumps(records))
    return f


def _runs(tokenizer, ids, labels) -> list[str]:
    """Decode each contiguous supervised run."""
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r).strip() for r in runs]


def test_image_placeholder_moves_to_the_start_of_the_first_human_turn(tmp_path):
    s = load_samples(_write(tmp_path, [_sample()]))[0]
    assert s.turns[0] == ("user", "<image>\nWhat colour is it?")
    assert [r for r, _ in s.turns] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    "template, expected",
    [
        ("plain", ["Red."]),  # stage 1: the answer is the caption, instruction dropped
        ("vicuna_v1", ["Red.<|im_end|>", "A circle.<|im_end|>"]),
        ("chat", ["Red.<|im_end|>", "A circle.<|im_end|>"]),
    ],
)
def test_label_masks_are_exact(processor, tmp_path, template, expected):
    record = _sample()
    if template == "plain":  # stage 1 takes caption pairs
        record["conversations"] = record["conversations"][:2]
    ds, report = build_dataset(_write(tmp_path, [record]), processor, template, 512, "pad")
    it = ds.items[0]
    assert _runs(processor.tokenizer, it.input_ids, it.labels) == expected
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((it.input_ids == image_id).sum()) == 16
    assert not np.any(it.labels == image_id)
    if template == "plain":
        text = processor.tokenizer.decode(it.input_ids)
        assert "What colour" not in text and text.endswith("Red.\n")
    if template == "vicuna_v1":
        text = processor.tokenizer.decode(it.input_ids)
        assert text.startswith("A chat between a curious user") and "USER: <image>" in text and "ASSISTANT: Red." in text


def test_chat_mask_agrees_with_the_templates_generation_markers(processor, tmp_path):
    """kit's prefix-rendering mask equals the mask transformers derives from {% generation %}."""
    ds, _ = build_dataset(_write(tmp_path, [_sample(image=None)]), processor, "chat", 512, "pad")
    it = ds.items[0]
    msgs = [{"role": r, "content": t} for r, t in load_samples(tmp_path / "data.json")[0].turns]
    ref = processor.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(it.input_ids) == list(ref["input_ids"])
    assert [int(l != IGNORE) for l in it.labels] == list(ref["assistant_masks"])


def test_text_only_samples_have_no_image_and_no_pixels(processor, tmp_path):
    ds, _ = build_dataset(_write(tmp_path, [_sample(image=None)], image=False), processor, "chat", 512, "pad")
    item = ds[0]
    assert "pixel_values" not in item
    batch = Collator(processor.tokenizer.pad_token_id)([item])
    assert "pixel_values" not in batch


def test_truncation_that_would_cut_image_tokens_is_reported(processor, tmp_path):
    f = _write(tmp_path, [_sample()])
    with pytest.raises(KitError, match=r"data\.json\[0\]: sample 's1': image tokens would be truncated"):
        build_dataset(f, processor, "chat", 12, "pad")
    ds_skip = None
    with pytest.raises(KitError, match="no usable samples"):
        ds_skip = build_dataset(f, processor, "chat", 12, "pad", on_bad_sample="skip")
    assert ds_skip is None


def test_text_truncation_keeps_supervision_or_reports(processor, tmp_path):
    f = _write(tmp_path, [_sample()])
    ds, report = build_dataset(f, processor, "chat", 40, "pad")
    assert len(ds.items[0].input_ids) == 40 and report.truncated_text == 1
    assert (ds.items[0].labels != IGNORE).any()


def test_mask_that_disagrees_with_the_answers_is_caught(processor, monkeypatch):
    import kit.data.dataset as dataset

    real = dataset.supervised_mask

    def short_mask(tokens, spans):
        mask = real(tokens, spans)
        mask[int(np.argmax(mask))] = False  # the first supervised token goes missing
        return mask

    monkeypatch.setattr(dataset, "supervised_mask", short_mask)
    s = Sample("x", [], [("user", "hi"), ("assistant", "hello there")], "f[0]")
    with pytest.raises(SampleProblem, match="do not spell the answers"):
        encode_sample(s, processor.tokenizer, "vicuna_v1", 16, 512)


def test_bad_samples_are_skipped_with_reasons_when_the_recipe_says_so(processor, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records = [
        _sample(),
        {**_sample("missing.png"), "id": "s2"},
        {**_sample("corrupt.png"), "id": "s3"},
        {**_sample("../outside.png"), "id": "s4"},
        {"id": "s5", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]},
        {"id": "s6", "conversations": [{"from": "human", "value": "only a question"}]},
    ]
    f = _write(tmp_path, records, image=False)
    ds, report = build_dataset(f, processor, "chat", 512, "pad", on_bad_sample="skip")
    assert len(ds) == 1
    reasons = {sid: reason for sid, _, reason in report.problems}
    assert "missing" in reasons["s2"]
    assert "corrupt" in reasons["s3"]
    assert "escapes the image folder" in reasons["s4"]
    assert "no 'image' field" in reasons["s5"]
    assert "no assistant turn" in reasons["s6"]
    assert report.summary() == "1/6 samples usable, 5 skipped"
    with pytest.raises(KitError, match=r"sample 's2': image file .*missing.png is missing .*\+4 more"):
        build_dataset(f, processor, "chat", 512, "pad", on_bad_sample="error")


def test_broken_jsonl_line_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(_sample()) + "\n{not json\n")
    with pytest.raises(KitError, match=r"d\.jsonl:2: invalid JSON"):
        load_samples(f)


def test_modality_grouping_never_mixes_full_batches():
    lengths = [10 + i for i in range(37)] + [-(5 + i) for i in range(29)]
    order = modality_length_order(lengths, batch_size=4, megabatch_batches=2, seed=0)
    assert sorted(order) == list(range(len(lengths)))
    full = len(order) - (37 % 4 + 29 % 4)
    for b in range(0, full, 4):
        signs = {lengths[i] > 0 for i in order[b : b + 4]}
        assert len(signs) == 1
    assert order == modality_length_order(lengths, 4, 2, seed=0)
    assert order != modality_length_order(lengths, 4, 2, seed=1)


def test_supervised_logits_loss_equals_the_full_loss(processor, tmp_path):
    """Logits only where the next token is supervised give exactly the model's full-sequence loss."""
    import torch
    from transformers import AutoModelForImageTextToText

    from kit.data.collator import supervised_loss

    ds, _ = build_dataset(_write(tmp_path, [_sample(), {**_sample(), "id": "s2"}]), processor, "chat", 512, "pad")
    full = Collator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    part = Collator(processor.tokenizer.pad_token_id, supervised_logits_only=True)([ds[0], ds[1]])
    model = AutoModelForImageTextToText.from_pretrained(processor.tokenizer.name_or_path).eval()
    with torch.no_grad():
        ref = model(**full).loss
        labels = part.pop("labels")
        out = model(**part)
    assert out.logits.shape[1] == len(part["logits_to_keep"]) < full["input_ids"].shape[1] / 2
    assert torch.allclose(supervised_loss(out, labels), ref, atol=1e-5)
