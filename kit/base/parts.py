"""The parts a LLaVA is assembled from: a vision tower, a causal LM with its tokenizer, a fresh
projector, and the assembly itself (meta device, strict key check, HF-native save)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.templates import CHATML_TEMPLATE, IMAGE_TOKEN, VICUNA_TEMPLATE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------------------- parts


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KitError(f"{folder}: no *.safetensors weights found; kit loads weights only from safetensors (convert .bin with transformers first)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def load_config(folder: Path, what: str):
    if not (folder / "config.json").is_file():
        raise KitError(f"--{what} {folder}: no config.json; give a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise KitError(f"--{what} {folder}/config.json cannot be read by transformers ({str(e).splitlines()[0]})") from None


def vision_part(vision_dir: Path):
    cfg = load_config(vision_dir, "vision")
    vision_cfg = getattr(cfg, "vision_config", None) or cfg
    if not hasattr(vision_cfg, "patch_size") or not hasattr(vision_cfg, "image_size"):
        raise KitError(f"--vision {vision_dir}: model_type '{cfg.model_type}' is not a ViT-style vision tower (CLIP, SigLIP); use a CLIP/SigLIP folder")
    raw = read_safetensors(vision_dir)
    # A full CLIP/SigLIP checkpoint nests the tower under `vision_model.`; a vision-only one saved by
    # recent transformers does not. Either way the tower's own keys are what LLaVA expects.
    if any(k.startswith("vision_model.") for k in raw):
        weights = {k.removeprefix("vision_model."): v for k, v in raw.items() if k.startswith("vision_model.")}
    else:
        weights = {k: v for k, v in raw.items() if not k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias"))}
    if not weights:
        raise KitError(f"--vision {vision_dir}: no vision tower weights in its safetensors files")
    return vision_cfg, weights


def llm_part(llm_dir: Path):
    cfg = load_config(llm_dir, "llm")
    if getattr(cfg, "vision_config", None) is not None:
        raise KitError(f"--llm {llm_dir}: this is already a vision-language model; give a text-only causal LM")
    weights = read_safetensors(llm_dir)
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


def grow_embeddings(weights: dict[str, torch.Tensor], key: str, rows: int) -> None:
    """Append rows initialised to the mean embedding, as transformers' resize does."""
    w = weights[key]
    if w.shape[0] >= rows:
        return
    extra = w.float().mean(0, keepdim=True).expand(rows - w.shape[0], -1).to(w.dtype)
    weights[key] = torch.cat([w, extra], 0)


def fresh_projector(d_in: int, d_out: int, kind: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
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


def assemble(config, model_cls, weights: dict[str, torch.Tensor], out: Path, processor, card: Card) -> None:
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
    card.write(out)
