"""Chat templates as hub checkpoints ship them: content as lists of parts, and the template in the
processor's `chat_template.json` / `chat_template.jinja` rather than the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kit.data.dataset import IGNORE, build_dataset

# Written for these tests in the style llava-hf checkpoints use: it reads only lists of parts
# (a plain-string content renders nothing), images first, then text; `{% generation %}` marks
# what an assistant turn supervises.
HUB_STYLE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'][0]['text'] + ' ' -}}"
    "{%- else -%}{{- m['role'] | upper + ': ' -}}"
    "{%- for p in m['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for p in m['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{%- if m['role'] == 'assistant' -%}{%- generation -%}{{- p['text'] + eos_token -}}{%- endgeneration -%}{{- ' ' -}}"
    "{%- else -%}{{- p['text'] + ' ' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def _hub_folder(tiny_base: Path, dest: Path, layout: str) -> Path:
    """The tiny base with its template moved where hub checkpoints keep it."""
    shutil.copytree(tiny_base, dest)
    for name in ("chat_template.jinja", "chat_template.json"):
        (dest / name).unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        f = dest / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            f.write_text(json.dumps(cfg))
    if layout == "json":
        (dest / "chat_template.json").write_text(json.dumps({"chat_template": HUB_STYLE}))
    else:
        (dest / "chat_template.jinja").write_text(HUB_STYLE)
    return dest


@pytest.fixture(scope="module", params=["json", "jinja"])
def hub_base(request, tiny_base, tmp_path_factory):
    return _hub_folder(tiny_base, tmp_path_factory.mktemp("hub") / "base", request.param)


def test_fixture_is_valid_in_plain_transformers(hub_base):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hub_base)
    if (hub_base / "chat_template.json").is_file():  # the older layout: the tokenizer does not read it
        assert not proc.tokenizer.chat_template and proc.chat_template == HUB_STYLE
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nWhat colour? ASSISTANT:"
    out = proc(text=[text], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"] == image_id).sum()) == 16
    as_string = [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert "<image>" not in proc.apply_chat_template(as_string, add_generation_prompt=True, tokenize=False)


def _data(tmp_path: Path) -> Path:
    Image.new("RGB", (20, 10), (200, 0, 0)).save(tmp_path / "img.png")
    rows = [{"id": "s1", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "3 circles."}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there."}]}]
    f = tmp_path / "data.json"
    f.write_text(json.dumps(rows))
    return f


def test_hub_template_renders_image_tokens_and_exact_masks(hub_base, tmp_path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hub_base)
    ds, report = build_dataset(_data(tmp_path), proc, "chat", 512, "pad")
    assert not report.problems, report.problem_lines()
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    item = ds.items[0]
    assert int((item.input_ids == image_id).sum()) == 16
    runs, cur = [], []
    for t, l in zip(item.input_ids, item.labels):
        if l != IGNORE:
            cur.append(int(t))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    eos = tok.eos_token
    assert runs == [f" Red.{eos}", f" 3 circles.{eos}"]
    text = tok.decode(item.input_ids)
    assert text.startswith("USER: <image><image>") and "<image>\nWhat colour is it? ASSISTANT: Red." in text
    assert "\n\n" not in text, "the template's own newline after the image, not the data's as well"
    # The text-only sample, against the assistant mask transformers derives from {% generation %}.
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}, {"role": "assistant", "content": [{"type": "text", "text": "Hi there."}]}]
    ref = tok.apply_chat_template(msgs, chat_template=proc.chat_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    t1 = ds.items[1]
    assert list(t1.input_ids) == list(ref["input_ids"])
    ours = [int(l != IGNORE) for l in t1.labels]
    # kit also supervises the separator the answer's first token carries (" Hi"): the same tokens.
    assert ours == list(ref["assistant_masks"])


def test_a_template_that_breaks_is_a_per_sample_diagnostic(tiny_base, tmp_path):
    from transformers import AutoProcessor

    folder = _hub_folder(tiny_base, tmp_path / "broken", "jinja")
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'][5]['text'] }}{{ raise_exception('no system turns') if messages[1] is defined }}")
    proc = AutoProcessor.from_pretrained(folder)
    ds_err = None
    from kit.core.errors import KitError

    with pytest.raises(KitError, match=r"data\.json\[0\]: sample 's1': the chat template failed"):
        ds_err = build_dataset(_data(tmp_path), proc, "chat", 512, "pad")
    assert ds_err is None


def test_medical_recipe_adapts_a_hub_layout_folder(tiny_base, tmp_path, capsys):
    """`kit adapt --recipe medical` (template chat) on a folder laid out as downloaded: no kit card,
    the template only in chat_template.json."""
    from mock_openai import MockOpenAI
    from test_adapt import TINY, _folder
    from helpers import run_cli

    base = _hub_folder(tiny_base, tmp_path / "llava-hf", "json")
    (base / "kit.json").unlink(missing_ok=True)
    data = _folder(tmp_path)
    with MockOpenAI() as server:
        code, out, err = run_cli(capsys, "adapt", "--recipe", "medical", "--base", str(base), "--data", str(data),
                                 "--out", str(tmp_path / "adapter"), "--max-steps", "2", *TINY,
                                 "--set", "generate.backend=openai", "--set", f"generate.base_url={server.base_url}",
                                 "--set", "generate.model=mock", "--set", "eval.held_out=0.3")
    assert code == 0, err
    card = json.loads((tmp_path / "adapter" / "kit.json").read_text())
    assert card["recipe"]["data"]["template"] == "chat" and card["evaluation"]["adapted"]["n_closed"] > 0
    said = out + err
    usable = [line for line in said.splitlines() if line.startswith("data: ")]
    assert usable and "skipped" not in usable[0], usable  # every sample rendered with its image tokens
