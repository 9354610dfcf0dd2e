"""`kit export --format gguf`: what the files hold, read back with the gguf library (no llama.cpp
needed; tests/test_llama_cpp.py runs them in llama.cpp itself), the Ollama Modelfile's template
against kit's own prompts, adapters merged first, and bad input in one line with nothing left."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader

from tests import families
from helpers import run_cli
from test_cli_errors import assert_clean_failure
from helpers import kit_process, make_adapter


def _field(reader: GGUFReader, key: str):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i].tobytes().decode() if f.types[1] == gguf.GGUFValueType.STRING else f.parts[i][0].item() for i in f.data]
    part = f.parts[f.data[0]]
    return part.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else part[0].item()


def _tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        data = np.array(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = data.astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
    return out


@pytest.fixture(scope="module")
def exported(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "gguf"
    code, stdout, err = kit_process("export", str(tiny_base), "--out", str(out))
    assert code == 0, err
    assert stdout.strip() == str(out)
    return out


def test_llm_file_holds_the_llm_as_llama_cpp_reads_it(tiny_base, exported):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny_base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    cfg = model.config.text_config
    r = GGUFReader(exported / f"{tiny_base.name}-f16.gguf")
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == cfg.num_hidden_layers
    assert _field(r, "llama.embedding_length") == cfg.hidden_size
    assert _field(r, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"  # the fixture's tokenizer.json splits with ByteLevel's own regex
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == model.get_input_embeddings().weight.shape[0]
    types = _field(r, "tokenizer.ggml.token_type")
    for special in ("<|im_end|>", "<image>"):
        assert types[tok.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL, special
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert "{%" in _field(r, "tokenizer.chat_template")

    t = _tensors(r)
    lm = model.model.language_model
    expect = {"token_embd.weight": lm.embed_tokens.weight, "output.weight": model.lm_head.weight,
              "output_norm.weight": lm.norm.weight, "blk.1.ffn_down.weight": lm.layers[1].mlp.down_proj.weight,
              "blk.0.attn_v.weight": lm.layers[0].self_attn.v_proj.weight}
    assert len(t) == 3 + 9 * cfg.num_hidden_layers
    for name, w in expect.items():
        np.testing.assert_allclose(t[name], w.detach().numpy(), atol=2e-3, rtol=1e-2, err_msg=name)
    # q/k rows are reordered for llama.cpp's rope: same rows, per-head interleaved
    q = lm.layers[0].self_attn.q_proj.weight.detach().numpy()
    got = t["blk.0.attn_q.weight"]
    assert not np.allclose(got, q, atol=2e-3)
    hd = cfg.hidden_size // cfg.num_attention_heads
    back = got.reshape(cfg.num_attention_heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_allclose(back, q, atol=2e-3, rtol=1e-2)


def test_mmproj_file_holds_the_blocks_llava_uses(tiny_base, exported):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_base, dtype=torch.float32)
    r = GGUFReader(exported / f"mmproj-{tiny_base.name}-f16.gguf")
    assert _field(r, "general.architecture") == "clip"
    assert _field(r, "clip.projector_type") == "mlp"
    assert _field(r, "clip.has_vision_encoder") is True
    assert _field(r, "clip.use_gelu") is False  # CLIP's quick-GELU
    # vision_feature_layer -2 of 2 layers: the first block's output, then no post-layernorm
    assert _field(r, "clip.vision.feature_layer") == [1]
    assert _field(r, "clip.vision.block_count") == 1
    assert _field(r, "clip.vision.projection_dim") == model.config.text_config.hidden_size
    from kit.base.load import load_processor

    np.testing.assert_allclose(_field(r, "clip.vision.image_mean"), load_processor(tiny_base).image_processor.image_mean, rtol=1e-6)
    t = _tensors(r)
    assert not any(n.startswith(("v.blk.1.", "v.post_ln")) for n in t), sorted(t)
    proj = model.model.multi_modal_projector
    np.testing.assert_allclose(t["mm.0.weight"], proj.linear_1.weight.detach().numpy(), atol=1e-3)
    np.testing.assert_allclose(t["mm.2.bias"], proj.linear_2.bias.detach().numpy(), atol=1e-6)
    assert "v.class_embd" in t and "v.pre_ln.weight" in t


def test_q8_0_quantizes_the_matrices_and_keeps_vectors(tiny_base, tmp_path):
    code, _, err = kit_process("export", str(tiny_base), "--out", str(tmp_path / "q"), "--quant", "q8_0")
    assert code == 0, err
    r = GGUFReader(tmp_path / "q" / f"{tiny_base.name}-q8_0.gguf")
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    f16 = _tensors(GGUFReader(next((tmp_path / "q").glob("mmproj-*"))))
    assert f16  # the tower stays f16 at every --quant
    assert {t.tensor_type for t in GGUFReader(next((tmp_path / "q").glob("mmproj-*"))).tensors} <= {
        gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}


def _ollama_render(p: dict[str, str], messages: list[dict]) -> str:
    """What the Modelfile's Go template prints for `messages` (its logic, step by step)."""
    out, prev = "", ""
    for m in messages:
        if m["role"] == "system":
            out += p["system"] + m["content"]
        elif m["role"] == "user":
            out += (p["first_user"] if prev == "" else p["system_user"] if prev == "system" else p["assistant_user"]) + m["content"]
        else:
            out += p["user_assistant"] + m["content"]
        prev = m["role"]
    return out + (p["answer"] if prev == "user" else "")


CONVERSATIONS = [
    [{"role": "user", "content": "What is shown?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is shown?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Left."},
     {"role": "user", "content": "And the colour?"}],
    [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Left."}, {"role": "user", "content": "Sure?"}],
]


@pytest.mark.parametrize("family", ["kit-vicuna", "llava", "llava_next", "gemma3"])
def test_modelfile_template_prints_what_kit_prompts(family, tiny_base, smol_tokenizer_dir, tmp_path):
    from kit.base.family import family_for_type
    from kit.data.prompt_spec import PromptSpec
    from kit.export.ollama import go_template, stop_strings, turn_pieces
    from kit.infer.load import load_processor
    from kit.infer.prompts import build_prompt

    if family == "kit-vicuna":
        processor = load_processor(tiny_base)
        info = PromptSpec.choose(processor, family_for_type("llava"), "vicuna_v1", None, "pad")
    else:
        _, processor = families.build(family, smol_tokenizer_dir)
        info = PromptSpec.choose(processor, family_for_type(family), None, None, "pad")
    pieces = turn_pieces(processor, info)
    for conv in CONVERSATIONS:
        assert _ollama_render(pieces, conv) == build_prompt(processor, conv, info), conv
    template = go_template(pieces)
    assert template.count("{{ if") == template.count("{{ end }}") - 1  # range closes with one more end
    stops = stop_strings(pieces, processor.tokenizer)
    assert processor.tokenizer.eos_token in stops
    if family == "gemma3":
        assert "<end_of_turn>" in stops


def test_modelfile_and_card(tiny_base, exported):
    text = (exported / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == f"FROM ./{tiny_base.name}-f16.gguf" and lines[1] == f"FROM ./mmproj-{tiny_base.name}-f16.gguf"
    assert re.search(r'^TEMPLATE """\{\{ \$prev := "" \}\}.*"""$', text, re.M)
    from kit.base.load import load_processor

    eos = load_processor(tiny_base).tokenizer.eos_token
    assert f"PARAMETER stop {json.dumps(eos)}" in text
    card = json.loads((exported / "kit.json").read_text())
    assert card["kind"] == "export" and card["export"]["quant"] == "f16"
    assert set(card["export"]["files"]) == {f"{tiny_base.name}-f16.gguf", f"mmproj-{tiny_base.name}-f16.gguf"}
    readme = (exported / "README.md").read_text()
    assert "llama-mtmd-cli" in readme and "ollama create" in readme
    assert not list(exported.parent.glob(".*kit-tmp*")) and not (exported / "merged").exists()


def test_adapter_is_merged_verified_then_exported(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=3)
    code, _, err = kit_process("export", str(adapter), "--out", str(tmp_path / "from-adapter"))
    assert code == 0, err
    assert "verify:" in err
    code, _, err = kit_process("merge", str(adapter), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    code, _, err = kit_process("export", str(tmp_path / "merged"), "--out", str(tmp_path / "from-merged"))
    assert code == 0, err
    a = _tensors(GGUFReader(tmp_path / "from-adapter" / "adapter-f16.gguf"))
    b = _tensors(GGUFReader(tmp_path / "from-merged" / "merged-f16.gguf"))
    base = _tensors(GGUFReader(_export_base(tiny_base, tmp_path)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.allclose(a[k], base[k]) for k in a if k.startswith("blk."))  # the adapter's ΔW is in the file
    card = json.loads((tmp_path / "from-adapter" / "kit.json").read_text())
    assert card["verification"]["max_abs_logit_diff"] <= card["verification"]["tolerance"]
    assert card["merge"]["adapters"][0]["path"].endswith("adapter")
    assert not (tmp_path / "from-adapter" / "merged").exists()


def _export_base(tiny_base: Path, tmp_path: Path) -> Path:
    code, _, err = kit_process("export", str(tiny_base), "--out", str(tmp_path / "base-export"), "--text-only")
    assert code == 0, err
    return tmp_path / "base-export" / f"{tiny_base.name}-f16.gguf"


def test_hub_layout_llava_exports_with_its_own_chat_template(smol_tokenizer_dir, tmp_path):
    """A llava-hf-layout download (template in chat_template.jinja, content as parts): the GGUF
    carries that template, and the Modelfile speaks its USER: / ASSISTANT: format."""
    folder = families.save("llava", smol_tokenizer_dir, tmp_path / "llava-hf")
    code, _, err = kit_process("export", str(folder), "--out", str(tmp_path / "out"))
    assert code == 0, err
    r = GGUFReader(tmp_path / "out" / "llava-hf-f16.gguf")
    assert _field(r, "tokenizer.chat_template") == (folder / "chat_template.jinja").read_text()
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert '{{ "USER: " }}' in modelfile and '{{ " ASSISTANT:" }}' in modelfile


def test_the_embedded_mini_base_exports_its_llm_alone(capsys, tmp_path):
    """The real mini base: its EfficientNet tower is refused in one line (nothing written), and
    --text-only writes SmolLM2 as llama.cpp reads it (tied embeddings: no output tensor)."""
    from kit.base.mini import mini_base

    base = mini_base()
    assert_clean_failure(run_cli(capsys, "export", str(base), "--out", str(tmp_path / "sub" / "out")),
                         r"its vision tower is a timm CNN \(kit's embedded mini base: EfficientNet-Lite0\), which llama.cpp's "
                         r"multimodal runtime has no encoder for.*--text-only writes the LLM alone", tmp_path / "sub" / "out")
    code, _, err = run_cli(capsys, "export", str(base), "--out", str(tmp_path / "text"), "--text-only")
    assert code == 0, err
    r = GGUFReader(next((tmp_path / "text").glob("*-f16.gguf")))
    names = {t.name for t in r.tensors}
    assert _field(r, "llama.block_count") == 30 and "output.weight" not in names and "token_embd.weight" in names
    assert "FROM ./" in (tmp_path / "text" / "Modelfile").read_text() and not list((tmp_path / "text").glob("mmproj-*"))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unsupported_family", r"Gemma 3 checkpoints are not exported to GGUF by kit; llama.cpp export covers the llava family"),
        ("base_gone", r"was trained on base .*, which does not exist \(moved or deleted\)"),
        ("out_not_empty", r"--out .* already exists and is not empty"),
        ("bad_quant", r"--quant q3: choose f16, q8_0, q4_k_m"),
        ("bad_format", r"--format onnx: kit exports gguf"),
        ("not_a_model", r"nope does not exist or is not a folder"),
        ("clip_full_strategy", r"vision_feature_select_strategy 'full' with a clip_vision_model tower"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(capsys, case, expected, tiny_base, smol_tokenizer_dir, tmp_path):
    out = tmp_path / "sub" / "out"
    source = tiny_base
    extra: list[str] = []
    if case == "unsupported_family":
        source = families.save("gemma3", smol_tokenizer_dir, tmp_path / "gemma3")
    elif case == "base_gone":
        base_copy = shutil.copytree(tiny_base, tmp_path / "base-copy")
        source = make_adapter(base_copy, tmp_path / "adapter", seed=1)
        shutil.rmtree(base_copy)
    elif case == "out_not_empty":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    elif case == "bad_quant":
        extra = ["--quant", "q3"]
    elif case == "bad_format":
        extra = ["--format", "onnx"]
    elif case == "not_a_model":
        source = tmp_path / "nope"
    elif case == "clip_full_strategy":
        source = shutil.copytree(tiny_base, tmp_path / "full")
        cfg = json.loads((source / "config.json").read_text())
        cfg["vision_feature_select_strategy"] = "full"
        (source / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(run_cli(capsys, "export", str(source), "--out", str(out), *extra), expected, out,
                         kept=["keep.txt"] if case == "out_not_empty" else None)
