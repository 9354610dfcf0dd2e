"""Build and load LLaVA-family models: from parts, the embedded mini base, and any HF checkpoint.

Every model kit writes is HF-native (`AutoModelForImageTextToText` / `AutoProcessor` load it with
no kit installed) and carries a `kit.json` card saying what made it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from kit.core import cards
from kit.core.errors import KitError
from kit.core.templates import CHATML_TEMPLATE, VICUNA_TEMPLATE

IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Parameter-name prefixes of the parts a recipe can train or freeze.
PART_PREFIXES = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}


def part_of(name: str) -> str | None:
    """Which part ('vision', 'projector', 'llm') a parameter name belongs to; PEFT prefixes allowed."""
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    for part, prefixes in PART_PREFIXES.items():
        if any(name.startswith(p) for p in prefixes):
            return part
    return None


# ----------------------------------------------------------------------------------------- parts


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KitError(f"{folder}: no *.safetensors weights found; kit loads weights only from safetensors (convert .bin with transformers first)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def _load_config(folder: Path, what: str):
    if not (folder / "config.json").is_file():
        raise KitError(f"--{what} {folder}: no config.json; give a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise KitError(f"--{what} {folder}/config.json cannot be read by transformers ({str(e).splitlines()[0]})") from None


def _vision_part(vision_dir: Path):
    cfg = _load_config(vision_dir, "vision")
    vision_cfg = getattr(cfg, "vision_config", None) or cfg
    if not hasattr(vision_cfg, "patch_size") or not hasattr(vision_cfg, "image_size"):
        raise KitError(f"--vision {vision_dir}: model_type '{cfg.model_type}' is not a ViT-style vision tower (CLIP, SigLIP); use a CLIP/SigLIP folder")
    raw = _read_safetensors(vision_dir)
    # A full CLIP/SigLIP checkpoint nests the tower under `vision_model.`; a vision-only one saved by
    # recent transformers does not. Either way the tower's own keys are what LLaVA expects.
    if any(k.startswith("vision_model.") for k in raw):
        weights = {k.removeprefix("vision_model."): v for k, v in raw.items() if k.startswith("vision_model.")}
    else:
        weights = {k: v for k, v in raw.items() if not k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias"))}
    if not weights:
        raise KitError(f"--vision {vision_dir}: no vision tower weights in its safetensors files")
    return vision_cfg, weights


def _llm_part(llm_dir: Path):
    cfg = _load_config(llm_dir, "llm")
    if getattr(cfg, "vision_config", None) is not None:
        raise KitError(f"--llm {llm_dir}: this is already a vision-language model; give a text-only causal LM")
    weights = _read_safetensors(llm_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    except (OSError, ValueError) as e:
        raise KitError(f"--llm {llm_dir}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    return cfg, weights, tokenizer


def chat_template_for(tokenizer) -> str:
    """ChatML models keep their turn markers; everything else gets LLaVA-1.5's Vicuna-style turns."""
    own = tokenizer.chat_template or ""
    if "<|im_start|>" in own or "<|im_start|>" in tokenizer.get_vocab():
        return CHATML_TEMPLATE
    return VICUNA_TEMPLATE


def add_image_token(tokenizer) -> int:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _grow_embeddings(weights: dict[str, torch.Tensor], key: str, rows: int) -> None:
    """Append rows initialised to the mean embedding, as transformers' resize does."""
    w = weights[key]
    if w.shape[0] >= rows:
        return
    extra = w.float().mean(0, keepdim=True).expand(rows - w.shape[0], -1).to(w.dtype)
    weights[key] = torch.cat([w, extra], 0)


def _projector_weights(d_in: int, d_out: int, kind: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin1 = torch.nn.Linear(d_in, d_out)
    lin2 = torch.nn.Linear(d_out, d_out)
    for lin in (lin1, lin2):
        bound = 1 / math.sqrt(lin.in_features)
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
    if kind == "linear":
        # HF's projector is always two layers; with an identity second layer and no activation it is
        # exactly LLaVA-1's single linear map, and still loads in plain transformers.
        with torch.no_grad():
            lin2.weight.copy_(torch.eye(d_out))
            lin2.bias.zero_()
    p = "model.multi_modal_projector."
    return {
        p + "linear_1.weight": lin1.weight.detach().to(dtype),
        p + "linear_1.bias": lin1.bias.detach().to(dtype),
        p + "linear_2.weight": lin2.weight.detach().to(dtype),
        p + "linear_2.bias": lin2.bias.detach().to(dtype),
    }


def _assemble(config, model_cls, weights: dict[str, torch.Tensor], out: Path, processor, card: dict[str, Any]) -> None:
    # Built on the meta device so a 7B model never exists twice in memory; non-persistent buffers
    # stay on meta, which is why the result is saved and reloaded, never used directly.
    with torch.device("meta"):
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise KitError(
            f"parts do not fit the LLaVA layout: missing {missing[:3]}, unexpected {unexpected[:3]}; check --vision/--llm folders"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    cards.write_card(out, card)


def build_from_parts(
    vision_dir: Path,
    llm_dir: Path,
    out: Path,
    projector: str = "mlp2x_gelu",
    vision_layer: int = -2,
    image_aspect: str = "pad",
    seed: int = 0,
) -> Path:
    """Assemble CLIP/SigLIP tower + causal LM + fresh projector into an HF-native LLaVA at `out`.

    Raises KitError for folders that are not a vision tower / causal LM, or weights that don't fit.
    """
    if projector not in ("linear", "mlp2x_gelu"):
        raise KitError(f"--projector {projector}: choose linear or mlp2x_gelu")
    if image_aspect not in ("pad", "crop"):
        raise KitError(f"--image-aspect {image_aspect}: choose pad or crop")
    vision_cfg, vision_w = _vision_part(Path(vision_dir))
    text_cfg, llm_w, tokenizer = _llm_part(Path(llm_dir))
    image_token_id = add_image_token(tokenizer)
    if not -vision_cfg.num_hidden_layers <= vision_layer < vision_cfg.num_hidden_layers:
        raise KitError(f"--vision-layer {vision_layer}: the tower has {vision_cfg.num_hidden_layers} layers")

    vocab = max(text_cfg.vocab_size, len(tokenizer))
    text_cfg.vocab_size = vocab
    dtype = next(iter(llm_w.values())).dtype
    weights = {"model.vision_tower." + k: v.to(dtype) for k, v in vision_w.items()}
    for k, v in llm_w.items():
        if k.startswith("lm_head."):
            weights[k] = v.to(dtype)
        else:
            weights["model.language_model." + k.removeprefix("model.")] = v.to(dtype)
    _grow_embeddings(weights, "model.language_model.embed_tokens.weight", vocab)
    if "lm_head.weight" in weights:
        _grow_embeddings(weights, "lm_head.weight", vocab)
    weights.update(_projector_weights(vision_cfg.hidden_size, text_cfg.hidden_size, projector, dtype, seed))

    is_siglip = "siglip" in vision_cfg.model_type
    config = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=image_token_id,
        vision_feature_layer=vision_layer,
        vision_feature_select_strategy="full" if is_siglip else "default",
        projector_hidden_act="linear" if projector == "linear" else "gelu",
        image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
        tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
    )
    config.dtype = dtype
    if (Path(vision_dir) / "preprocessor_config.json").is_file():
        image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    else:
        size = vision_cfg.image_size
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
        )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=0 if is_siglip else 1,
        chat_template=chat_template_for(tokenizer),
    )
    card = cards.new_card(
        "base",
        made_by="kit base build",
        sources={"vision": cards.describe_source(Path(vision_dir)), "llm": cards.describe_source(Path(llm_dir))},
        settings={"projector": projector, "vision_layer": vision_layer, "image_aspect": image_aspect, "seed": seed},
    )
    _assemble(config, LlavaForConditionalGeneration, weights, Path(out), processor, card)
    return Path(out)


# ------------------------------------------------------------------------------------ loading


def check_llava_family(path: Path) -> dict[str, Any]:
    """Raise KitError unless `path` holds a LLaVA-family model (vision tower + projector + LLM)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise KitError(f"base {path}: no config.json; give a folder made by `kit base build` or a llava-hf checkpoint")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise KitError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise KitError(
            f"base {path} is not a LLaVA-family model (model_type '{cfg.get('model_type')}' has no vision tower); "
            "build one with `kit base build` or use a llava-hf checkpoint"
        )
    return cfg


def image_aspect_of(path: Path) -> str:
    card = cards.read_card(path)
    return ((card or {}).get("settings") or {}).get("image_aspect", "pad")


def load_processor(path: Path):
    proc = AutoProcessor.from_pretrained(path)
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise KitError(f"base {path}: no image+text processor found (processor_config.json); rebuild with `kit base build`")
    return proc


def load_model(path: Path, dtype: torch.dtype = torch.float32, quantization_config=None, device_map=None):
    """Load any LLaVA-family checkpoint with plain transformers. Raises KitError for non-LLaVA folders."""
    check_llava_family(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    for attr in ("vision_tower", "multi_modal_projector", "language_model"):
        if not hasattr(model.model, attr):
            raise KitError(f"base {path}: {type(model).__name__} lacks model.{attr}; kit supports LLaVA-family models")
    return model


def image_token_count(processor) -> int:
    """How many tokens one `<image>` becomes, as the processor expands it."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or ip.size
    h = crop.get("height") or crop.get("shortest_edge")
    w = crop.get("width") or crop.get("shortest_edge")
    n = (h // processor.patch_size) * (w // processor.patch_size) + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n
