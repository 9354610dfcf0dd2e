"""kit's `plain` / `vicuna_v1` data path against LLaVA's reference rules, on three tokenizers.

Tokenizers: a Llama-style SentencePiece tokenizer (byte fallback, split digits, dummy prefix, BOS)
trained here on a few sentences, loaded with `legacy=True` and `legacy=False`, and SmolLM2's BPE.
The reference behaviour written out below, as the oracle (LLaVA `llava/train/train.py` and
`llava/mm_utils.py`):
- `tokenizer_image_token`: the prompt is split at `<image>`; every piece is tokenized on its own;
  the first piece's BOS is kept and the first id of every later piece dropped.
- `preprocess_multimodal`: the turn that holds `<image>` gets it at its start plus a newline and is
  stripped; other turns are left as written.
- `preprocess_plain`: `<image>` + caption as written + newline; everything after the image is supervised.
- `preprocess_v1`: the answer tokens after `ASSISTANT:` and the `</s>` are supervised; the mask
  check here is stronger than the reference's length arithmetic: the inference prompt's ids must be
  exactly the training ids before the supervised run.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from kit.core.errors import KitError
from kit.core.templates import IMAGE_TOKEN
from kit.core.tokens import tokenize_chunked, tokenize_whole
from kit.data.dataset import IGNORE, SampleProblem, build_dataset, encode_sample
from kit.data.formats import Sample, load_samples, place_image

N_IMAGE = 4  # image tokens per image in these tests (a 32 px tower with 16 px patches)
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: What is shown in the chest X-ray? ASSISTANT: 3 nodules, 12 mm each, in the left lung.",
    "Is there a fracture? No, there is none. The scan shows a small lesion near the spine.",
    "How many vertebrae are visible? Answer with a number: 7 or 12 or 24.",
    "左肺 右肺 肺结节 The heart is normal in size.",
]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 40), model_writer=out, vocab_size=420, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("llama-tok")
    (folder / "tokenizer.model").write_bytes(out.getvalue())
    return folder


def _llama(sp_model, legacy: bool):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(sp_model, legacy=legacy, add_bos_token=True)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.pad_token = tok.unk_token
    assert tok("x").input_ids[0] == tok.bos_token_id, "fixture: a Llama tokenizer adds BOS"
    return tok


@pytest.fixture(scope="module", params=["llama-legacy", "llama-nonlegacy", "smollm2"])
def tokenizer(request, sp_model, tiny_base):
    if request.param == "smollm2":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tiny_base)
    return _llama(sp_model, legacy=request.param == "llama-legacy")


def _processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=None)


def _oracle_chunked(tok, text: str) -> list[int]:
    before, after = text.split(IMAGE_TOKEN)
    a, b = tok(before).input_ids, tok(after).input_ids
    skip = 1 if a and a[0] == tok.bos_token_id else 0
    return a + [tok.convert_tokens_to_ids(IMAGE_TOKEN)] * N_IMAGE + b[skip:]


def test_vicuna_ids_are_the_references_chunked_ids(tokenizer):
    turns = place_image([("user", "What is shown?\n<image>"), ("assistant", "3 nodules.")], "reference")
    enc = encode_sample(Sample("s", ["a.png"], turns, "f[0]"), tokenizer, "vicuna_v1", N_IMAGE, 2048)
    text = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions. USER: <image>\nWhat is shown? ASSISTANT: 3 nodules." + tokenizer.eos_token)
    assert list(enc.input_ids) == _oracle_chunked(tokenizer, text)


def test_non_legacy_llama_tokenizes_differently_whole_and_chunked(sp_model):
    """Why chunking matters: without the legacy prefix rule, one-string tokenization gives other ids."""
    tok = _llama(sp_model, legacy=False)
    text = "USER: <image>\nWhat is shown? ASSISTANT:"
    whole = tokenize_whole(tok, text.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMAGE), True).ids
    chunked = tokenize_chunked(tok, text, N_IMAGE).ids
    assert list(chunked) == _oracle_chunked(tok, text) and list(whole) != list(chunked)


ANSWERS = ["3 nodules, 12 mm each.", "左肺", "\nThe heart is normal in size.", "No, there is none."]


@pytest.mark.parametrize("answer", ANSWERS)
def test_inference_prompt_plus_supervised_run_is_the_training_sequence(tokenizer, answer):
    """(a): the model must produce every token after the prompt it is given at inference, including a
    separator space that the tokenizer makes a token of its own before a digit, CJK or newline."""
    from kit.base.family import families
    from kit.data.prompt_spec import PromptSpec
    from kit.infer.prompts import prepare

    proc = _processor(tokenizer)
    question = "What is shown in the chest X-ray?"
    turns = [("user", f"{IMAGE_TOKEN}\n{question}"), ("assistant", answer), ("user", "Is there a fracture?"), ("assistant", "No.")]
    enc = encode_sample(Sample("s", ["a.png"], turns, "f[0]"), tokenizer, "vicuna_v1", N_IMAGE, 2048)
    ids, labels = list(enc.input_ids), list(enc.labels)
    image = Image.new("RGB", (32, 32), (90, 20, 20))
    info = PromptSpec.choose(proc, families()["llava"], "vicuna_v1", None, "pad")
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    first = prepare(proc, info, history, [image])["input_ids"][0].tolist()
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Is there a fracture?"}]
    second = prepare(proc, info, history, [image])["input_ids"][0].tolist()
    eos = tokenizer.eos_token_id
    for prompt in (first, second):
        k = len(prompt)
        assert ids[:k] == prompt, "the inference prompt is a prefix of the training ids"
        assert labels[k - 1] == IGNORE and labels[k] == ids[k], "supervision starts right after the prompt"
        end = ids.index(eos, k)
        assert labels[k:end + 1] == ids[k:end + 1], "the whole answer and its end token are supervised"
    supervised = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    eos_text = tokenizer.eos_token
    assert "".join(supervised.split()) == "".join(f"{answer}{eos_text}No.{eos_text}".split())


def test_end_of_sequence_text_inside_an_answer_is_refused(tokenizer, tmp_path):
    """(b): a literal end token in the data would end the answer mid-way; the sample is named."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    eos = tokenizer.eos_token
    records = [{"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "Fine."}]},
               {"id": "leaky", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                                 {"from": "gpt", "value": f"First part.{eos} Second part."}]}]
    f = tmp_path / "data.json"
    f.write_text(json.dumps(records))
    proc = _processor(tokenizer)
    with pytest.raises(KitError, match=rf"data\.json\[1\]: sample 'leaky': turn 2 \(assistant\) holds the text '{eos}'"):
        build_dataset(f, proc, "vicuna_v1", 2048, "pad")
    ds, report = build_dataset(f, proc, "vicuna_v1", 2048, "pad", on_bad_sample="skip")
    assert [it.id for it in ds.items] == ["ok"] and len(report.problems) == 1
    labels = ds.items[0].labels
    assert int((labels == tokenizer.eos_token_id).sum()) == 1


def test_text_only_sample_under_plain_is_refused(tokenizer):
    """(c): stage 1 trains captions of images; a text-only sample must not get image tokens."""
    s = Sample("t", [], [("user", "Describe."), ("assistant", "A cat.")], "f[0]")
    with pytest.raises(SampleProblem, match="has no image"):
        encode_sample(s, tokenizer, "plain", N_IMAGE, 2048)


def test_plain_keeps_the_caption_as_written_and_supervises_all_after_the_image(tokenizer):
    s = Sample("p", ["a.png"], [("user", "<image>\nDescribe it."), ("assistant", " A cat on a mat. ")], "f[0]")
    enc = encode_sample(s, tokenizer, "plain", N_IMAGE, 2048)
    ids, labels = list(enc.input_ids), list(enc.labels)
    assert ids == _oracle_chunked(tokenizer, IMAGE_TOKEN + " A cat on a mat. \n")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    after = max(i for i, t in enumerate(ids) if t == image_id) + 1
    assert all(l == IGNORE for l in labels[:after]) and labels[after:] == ids[after:]


def test_image_placement_and_whitespace_follow_the_reference(tmp_path):
    rec = {"id": "m", "image": "a.png", "conversations": [
        {"from": "human", "value": "  Hello there.  "}, {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": "Now look: <image>  "}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": " Colour? "}, {"from": "gpt", "value": "Grey."}]}
    f = tmp_path / "d.json"
    f.write_text(json.dumps([rec]))
    ref = load_samples(f, "reference")[0].turns
    assert ref[0] == ("user", "  Hello there.  ") and ref[4] == ("user", " Colour? ")
    assert ref[2] == ("user", "<image>\nNow look:")
    kit_rule = load_samples(f, "first_turn")[0].turns
    assert kit_rule[0] == ("user", "<image>\nHello there.") and kit_rule[2] == ("user", "Now look:")
    assert place_image([("user", " <image> "), ("assistant", "x")], "reference")[0] == ("user", "<image>")


def test_image_placement_is_a_recipe_option():
    from kit.core.recipes import load_recipe

    assert load_recipe("llava15-finetune").data.image_placement == "auto"
    r = load_recipe("medical", overrides=["data.image_placement=reference"])
    assert r.data.image_placement == "reference"
    with pytest.raises(KitError, match="image_placement"):
        load_recipe("medical", overrides=["data.image_placement=middle"])


def test_placeholder_in_an_answer_is_refused(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image> here"}]}]))
    assert "belongs in a human turn" in load_samples(f)[0].problem


def test_chunked_batch_is_left_padded(sp_model):
    from kit.infer.prompts import encode

    proc = _processor(_llama(sp_model, legacy=False))
    img = Image.new("RGB", (32, 32))
    out = encode(proc, ["USER: <image>\nHi ASSISTANT:", "USER: <image>\nA longer question here ASSISTANT:"], [img, img], "vicuna_v1")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and out["pixel_values"].shape[0] == 2
    assert mask[0, 0] == 0 and mask[1].all() and np.all(mask[0].numpy()[np.argmax(mask[0].numpy()):] == 1)
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ((ids == image_id).sum(1) == N_IMAGE).all()
