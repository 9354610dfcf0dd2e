"""Prompt sets follow the paper's context format; replies are parsed strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kit.core.errors import KitError
from kit.generate.parse import Rejected, fingerprint, parse_reply, to_sample
from kit.generate.prompts import HERE, available_domains, build_context, build_messages
from kit.ingest.records import TYPES, Box, Record


def _record(**kw) -> Record:
    base = dict(id="r1", image="img/a.png", root=Path("/data"), captions=["A dog on grass.", "A brown dog lying on a lawn."],
                boxes=[Box("dog", (0.1, 0.25, 0.5, 0.75))])
    return Record(**{**base, **kw})


def test_general_and_medical_domains_ship():
    assert {"general", "medical"} <= set(available_domains())


@pytest.mark.parametrize("domain", sorted(f.stem for f in HERE.glob("*.yaml")))
def test_every_few_shot_reply_passes_kits_own_validation(domain):
    spec = yaml.safe_load((HERE / f"{domain}.yaml").read_text())
    for rtype in TYPES:
        assert spec["system"][rtype].strip()
        for ex in spec["examples"][rtype]:
            parse_reply(rtype, ex["reply"])  # raises Rejected if kit's examples break kit's rules


def test_context_has_boxes_only_for_detail_and_reasoning():
    r = _record()
    assert "dog: [0.100, 0.250, 0.500, 0.750]" in build_context(r, "detail")
    assert "dog: [0.100, 0.250, 0.500, 0.750]" in build_context(r, "complex")
    assert "[0.100" not in build_context(r, "conversation")
    assert "A brown dog lying on a lawn." in build_context(r, "conversation")


def test_messages_are_system_few_shot_then_the_record():
    msgs = build_messages(_record(), "conversation", "general")
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * ((len(msgs) - 2) // 2)
    assert "A dog on grass." in msgs[-1]["content"]
    with pytest.raises(KitError, match="unknown prompt domain 'legal'"):
        build_messages(_record(), "conversation", "legal")


def test_medical_context_carries_acquisition_and_findings():
    r = _record(captions=[], boxes=[], metadata={"modality": "CT", "body_part": "abdomen"}, findings=["Liver lesion."])
    ctx = build_context(r, "conversation")
    assert ctx.startswith("Acquisition: CT, abdomen") and "Findings:\nLiver lesion." in ctx


@pytest.mark.parametrize(
    "rtype, text, reason",
    [
        ("conversation", "", "empty reply"),
        ("conversation", "I'm sorry, but I cannot see the image.", "refusal"),
        ("conversation", "Question: Where is the dog?\nAnswer: The caption says it is on grass.", "leaks its source ('caption')"),
        ("conversation", "Question: Where?\nAnswer: At [0.1, 0.25, 0.5, 0.75].", "raw number list"),
        ("conversation", "Question: A?\nQuestion: B?\nAnswer: C.", "do not alternate"),
        ("conversation", "Some preamble.\nQuestion: A?\nAnswer: B.", "text before the first Question"),
        ("detail", "Too short.", "length"),
        ("conversation", "Question: What is it?\nAnswer: A dog.\nQuestion: What is it?\nAnswer: A dog again.", "repeated question"),
        ("complex", "Question: Why?\nAnswer: Because.", "length"),
        ("detail", "Question: What?\nAnswer: " + "word " * 30, "a question where a description"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(rtype, text, reason):
    with pytest.raises(Rejected) as e:
        parse_reply(rtype, text)
    assert reason in e.value.reason


def test_good_replies_become_llava_samples():
    turns = parse_reply("conversation", "**Question:** What animal is it?\n**Answer:** A dog.\nQuestion: Where?\nAnswer: On grass,\nnear a fence.")
    assert turns == [("human", "What animal is it?"), ("gpt", "A dog."), ("human", "Where?"), ("gpt", "On grass,\nnear a fence.")]
    s = to_sample(_record(), "conversation", turns)
    assert s["id"] == "r1-conversation" and s["image"] == "img/a.png"
    assert s["conversations"][0]["value"].startswith("<image>\nWhat animal")
    detail = parse_reply("detail", "A brown dog lies on a green lawn in the sun, resting its head on its paws while a fence runs along the back of the garden.", pick=1)
    assert detail[0][0] == "human" and detail[1][1].startswith("A brown dog")
    assert fingerprint(turns) == fingerprint([(r, t.upper() + " ") for r, t in turns])


def test_a_cut_off_conversation_keeps_its_whole_rounds():
    from kit.generate.parse import complete_rounds

    cut = "Question: What is it?\nAnswer: A dog.\nQuestion: Where?\nAnswer: On the gr"
    assert parse_reply("conversation", complete_rounds(cut)) == [("human", "What is it?"), ("gpt", "A dog.")]
    assert complete_rounds("Question: What is it?\nAnswer: A d") == ""
