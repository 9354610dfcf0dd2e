"""Tiny checkpoints of the model families users download, built offline from their transformers
config and processor classes, saved in the hub's layout (processor files, a chat template that
reads content as lists of parts). Sizes are the smallest each family's code accepts.

The chat templates are written here in each family's prompt format (turn markers, where the image
placeholder goes); they are not copies of the hub files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm",
    "paligemma", "internvl", "mistral3",
)
# Families whose processor expands one image into a number of tokens that depends on the image.
VARIABLE_COUNT = {"llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "internvl", "mistral3"}


def _parts_loop(open_turn: str, close_turn: str, image: str, bos: str = "", assistant_open: str | None = None,
                gen_prompt: str | None = None, upper: bool = False, system_open: str | None = None) -> str:
    """A hub-style template: messages with content as parts; images where the parts put them."""
    assistant_open = assistant_open if assistant_open is not None else open_turn.replace("ROLE", "assistant")
    gen_prompt = gen_prompt if gen_prompt is not None else assistant_open
    return (
        bos
        + "{%- for m in messages -%}"
        + "{%- set role = m['role'] | upper if " + str(upper).lower() + " else m['role'] -%}"
        + "{%- if m['role'] == 'assistant' -%}{{- '" + assistant_open + "' -}}"
        + ("{%- elif m['role'] == 'system' -%}{{- '" + system_open + "' -}}" if system_open is not None else "")
        + "{%- else -%}{{- '" + open_turn + "' | replace('ROLE', role) -}}{%- endif -%}"
        + "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}"
        + "{%- for p in m['content'] -%}"
        + "{%- if p['type'] == 'image' -%}{{- '" + image + "' -}}"
        + "{%- elif p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}"
        + "{%- endfor -%}{%- endif -%}"
        + "{{- '" + close_turn + "' -}}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{- '" + gen_prompt + "' -}}{%- endif -%}"
    )


CHATML = dict(open_turn="<|im_start|>ROLE\\n", close_turn="<|im_end|>\\n")
# The quirk of the template llava-hf ships with LLaVA-OneVision, in kit's own words: a turn opens
# with the role and a space, its images come next, then each text part after a newline. A finished
# assistant turn is therefore "<|im_start|>assistant \n" + text, while the generation prompt is
# "<|im_start|>assistant\n": no rendered conversation extends the inference prompt.
ONEVISION_HUB = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + ' ' -}}"
    "{%- if m['content'] is string -%}{{- '\\n' + m['content'] -}}{%- else -%}"
    "{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}{{- '<image>' -}}{%- endif -%}{%- endfor -%}"
    "{%- for p in m['content'] -%}{%- if p['type'] == 'text' -%}{{- '\\n' + p['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TEMPLATES = {
    # llava-hf's LLaVA-1.5 format: "USER: <image>\n... ASSISTANT: ...</s>"
    "llava": _parts_loop("ROLE: ", " ", "<image>\\n", assistant_open="ASSISTANT: ", gen_prompt="ASSISTANT:", upper=True,
                         system_open=""),
    "llava_next": _parts_loop(**CHATML, image="<image>\\n"),
    "llava_onevision": ONEVISION_HUB,
    "qwen2_vl": _parts_loop(**CHATML, image="<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen2_5_vl": _parts_loop(**CHATML, image="<|vision_start|><|image_pad|><|vision_end|>"),
    "gemma3": _parts_loop("<start_of_turn>ROLE\\n", "<end_of_turn>\\n", "<start_of_image>", bos="<bos>",
                          assistant_open="<start_of_turn>model\\n"),
    "idefics3": _parts_loop("ROLE:", "<end_of_utterance>\\n", "<image>", bos="<|im_start|>",
                            assistant_open="Assistant:"),
    "smolvlm": _parts_loop("ROLE:", "<end_of_utterance>\\n", "<image>", bos="<|im_start|>", assistant_open="Assistant:"),
    "internvl": _parts_loop(**CHATML, image="<IMG_CONTEXT>\\n"),
    "mistral3": _parts_loop("[INST]", "", "[IMG]", bos="<s>", assistant_open="[/INST]", gen_prompt="[/INST]"),
}
# The end-of-turn token each family's template closes an assistant turn with.
END_OF_TURN = {"llava": None, "gemma3": "<end_of_turn>", "idefics3": "<end_of_utterance>", "smolvlm": "<end_of_utterance>",
               "mistral3": "</s>", "paligemma": None}
EXTRA_TOKENS = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "qwen2_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
                 "vision_eos_token": "<|vision_end|>"},
    "gemma3": {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>",
               "sot_token": "<start_of_turn>", "eot_token": "<end_of_turn>", "bos_token_": "<bos>"},
    "idefics3": {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                 "end_of_utterance_token": "<end_of_utterance>"},
    "paligemma": {"image_token": "<image>"},
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
    "mistral3": {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
                 "inst_token": "[INST]", "inst_end_token": "[/INST]"},
}
EXTRA_TOKENS["qwen2_5_vl"] = EXTRA_TOKENS["qwen2_vl"]
EXTRA_TOKENS["smolvlm"] = EXTRA_TOKENS["idefics3"]
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


def tokenizer_for(family: str, smol_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    extra = {k.rstrip("_"): v for k, v in EXTRA_TOKENS[family].items() if not k.endswith("_")}
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir, extra_special_tokens=extra)
    plain = [v for k, v in EXTRA_TOKENS[family].items() if k.endswith("_")]
    if family in ("idefics3", "smolvlm"):
        plain += ROW_COL
    if plain:
        tok.add_special_tokens({"additional_special_tokens": plain}, replace_extra_special_tokens=False)
    if family == "mistral3":
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    if family == "gemma3":
        tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<end_of_turn>"})
    if family in ("idefics3", "smolvlm"):
        tok.add_special_tokens({"eos_token": "<end_of_utterance>"})
    if family == "llava":
        tok.add_special_tokens({"eos_token": "</s>"})
    if family == "paligemma":
        tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>"})
    tok.pad_token = tok.pad_token or tok.eos_token
    if family == "paligemma":
        tok.chat_template = None  # PaliGemma checkpoints ship none: prefix + suffix instead
    return tok


def _llama(vocab: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048, **kw)


def _siglip(**kw):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **kw)


def _clip(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32, **kw)


def build(family: str, smol_tokenizer_dir: Path):
    """(model, processor) of one family, random weights, tiny sizes."""
    import transformers as tf

    tok = tokenizer_for(family, smol_tokenizer_dir)
    V = len(tok)
    template = TEMPLATES.get(family)
    if family == "llava":
        cfg = tf.LlavaConfig(vision_config=_clip(image_size=32, patch_size=8), text_config=_llama(V),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
        ip = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=template)
    elif family == "llava_next":
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        cfg = tf.LlavaNextConfig(vision_config=_clip(image_size=32, patch_size=8), text_config=_llama(V),
                                 image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                                 vision_feature_layer=-2)
        ip = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
        proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=template)
    elif family == "llava_onevision":
        pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
        cfg = tf.LlavaOnevisionConfig(vision_config=_siglip(image_size=32, patch_size=8), text_config=tf.Qwen2Config(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
            image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
        ip = tf.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
        vp = tf.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
        proc = tf.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=16,
                                          vision_feature_select_strategy="full", chat_template=template)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(vocab_size=V, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
        ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                   vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                   vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        pixels = dict(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
        ip, vp = tf.Qwen2VLImageProcessor(**pixels), tf.Qwen2VLVideoProcessor(**pixels)
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
            cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
            proc = tf.Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template)
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                          temporal_patch_size=2, out_hidden_size=32, window_size=32, fullatt_block_indexes=[1])
            cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            proc = tf.Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template)
    elif family == "gemma3":
        text = tf.Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, sliding_window=64, max_position_embeddings=2048)
        cfg = tf.Gemma3Config(text_config=text, vision_config=_siglip(image_size=32, patch_size=8), mm_tokens_per_image=4,
                              boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                              eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                              image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
        ip = tf.Gemma3ImageProcessor(size={"height": 32, "width": 32})
        proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=template, image_seq_length=4)
    elif family in ("idefics3", "smolvlm"):
        image_token = tok.convert_tokens_to_ids("<image>")
        if family == "idefics3":
            cfg = tf.Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       image_size=32, patch_size=8), text_config=_llama(V),
                                    image_token_id=image_token, scale_factor=2)
            ip = tf.Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
            proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
        else:
            cfg = tf.SmolVLMConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      image_size=32, patch_size=8), text_config=_llama(V),
                                   image_token_id=image_token, scale_factor=2)
            ip = tf.SmolVLMImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
            vp = tf.SmolVLMVideoProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
            proc = tf.SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=4, chat_template=template)
    elif family == "paligemma":
        text = tf.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=8)
        cfg = tf.PaliGemmaConfig(vision_config=_siglip(image_size=32, patch_size=8, projection_dim=32), text_config=text,
                                 image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=V, projection_dim=32, hidden_size=32)
        ip = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
        ip.image_seq_length = 16
        proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    elif family == "internvl":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=[32, 32],
                      patch_size=[8, 8])
        text = tf.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2)
        cfg = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                                image_seq_length=4, downsample_ratio=0.5)
        ip = tf.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
        vp = tf.InternVLVideoProcessor(size={"height": 32, "width": 32})
        proc = tf.InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=4, chat_template=template)
    elif family == "mistral3":
        text = tf.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8)
        vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                                        image_size=64, patch_size=8)
        cfg = tf.Mistral3Config(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                                spatial_merge_size=2, vision_feature_layer=-1)
        ip = tf.PixtralImageProcessor(size={"longest_edge": 64}, patch_size=16)
        proc = tf.PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=8, spatial_merge_size=2, chat_template=template)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(cfg)
    # At the default init (std 0.02, hidden 32) the logits span well under one unit, so no adapter on
    # the LLM's layers could make an answer likely; a trained model's head is far sharper.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    eot = END_OF_TURN.get(family)
    eos_ids = [tok.eos_token_id] + ([tok.convert_tokens_to_ids(eot)] if eot else [])
    model.generation_config.eos_token_id = sorted(set(eos_ids))
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, proc


def save(family: str, smol_tokenizer_dir: Path, out: Path) -> Path:
    """The family's tiny checkpoint in the hub's layout, as a user's download looks."""
    model, proc = build(family, smol_tokenizer_dir)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def messages(n_images: int = 1, question: str = "What is shown?", answer: str | None = None) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    out = [{"role": "user", "content": content}]
    if answer is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


def json_dump(obj) -> str:
    return json.dumps(obj)
