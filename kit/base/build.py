"""`kit base build`: a LLaVA from parts (CLIP/SigLIP tower + causal LM + fresh projector) or the
embedded mini preset, written through a staged folder (no half-built base on failure).

Every base kit writes is HF-native (`AutoModelForImageTextToText` / `AutoProcessor` load it with no
kit installed) and carries a `kit.json` card saying what made it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoImageProcessor, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from kit.base.mini import ALIGNED_PROJECTOR, build_mini
from kit.base.parts import (
    CLIP_MEAN,
    CLIP_STD,
    add_image_token,
    assemble,
    chat_template_for,
    grow_embeddings,
    llm_part,
    fresh_projector,
    vision_part,
)
from kit.core.cards import Card, describe_source
from kit.core.errors import KitError
from kit.core.files import staged_folder


def build(out: Path, vision: Path | None, llm: Path | None, preset: str | None, projector: str = "mlp2x_gelu",
          vision_layer: int = -2, image_aspect: str = "pad", aligned: bool = True) -> Path:
    """What `kit base build` does. KitError for a non-empty `out` or options that do not fit."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KitError(f"--out {out} already exists and is not empty; choose a new folder")
    if preset is None and (vision is None or llm is None):
        raise KitError("give --vision DIR and --llm DIR, or --preset mini")
    if preset is not None and preset != "mini":
        raise KitError(f"--preset {preset}: the only preset is 'mini'")
    if preset == "mini" and aligned and not ALIGNED_PROJECTOR.is_file():
        raise KitError(f"{ALIGNED_PROJECTOR} is missing; reproduce it with `kit base align-mini` or pass --no-aligned")
    with staged_folder(out) as tmp:
        if preset == "mini":
            build_mini(tmp, ALIGNED_PROJECTOR if aligned else None)
        else:
            build_from_parts(vision, llm, tmp, projector=projector, vision_layer=vision_layer, image_aspect=image_aspect)
    return out


def llava_weights(vision_w: dict, llm_w: dict, *, vocab: int, dtype) -> dict:
    """The tower's and the LLM's weights under LLaVA's names, in the LLM's dtype, the embeddings
    (and an untied head) grown to `vocab` rows for the image token."""
    weights = {"model.vision_tower." + k: v.to(dtype) for k, v in vision_w.items()}
    for k, v in llm_w.items():
        if k.startswith("lm_head."):
            weights[k] = v.to(dtype)
        else:
            weights["model.language_model." + k.removeprefix("model.")] = v.to(dtype)
    grow_embeddings(weights, "model.language_model.embed_tokens.weight", vocab)
    if "lm_head.weight" in weights:
        grow_embeddings(weights, "lm_head.weight", vocab)
    return weights


def tower_image_processor(vision_dir: Path, size: int):
    """The tower's own image processor, else CLIP's preprocessing at its image size."""
    if (vision_dir / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(vision_dir)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN,
                              image_std=CLIP_STD)


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
    vision_cfg, vision_w = vision_part(Path(vision_dir))
    text_cfg, llm_w, tokenizer = llm_part(Path(llm_dir))
    image_token_id = add_image_token(tokenizer)
    if not -vision_cfg.num_hidden_layers <= vision_layer < vision_cfg.num_hidden_layers:
        raise KitError(f"--vision-layer {vision_layer}: the tower has {vision_cfg.num_hidden_layers} layers")

    text_cfg.vocab_size = max(text_cfg.vocab_size, len(tokenizer))
    dtype = next(iter(llm_w.values())).dtype
    weights = llava_weights(vision_w, llm_w, vocab=text_cfg.vocab_size, dtype=dtype)
    weights.update(fresh_projector(vision_cfg.hidden_size, text_cfg.hidden_size, projector, dtype=dtype, seed=seed))

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
    processor = LlavaProcessor(
        image_processor=tower_image_processor(Path(vision_dir), vision_cfg.image_size),
        tokenizer=tokenizer,
        patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=0 if is_siglip else 1,
        chat_template=chat_template_for(tokenizer),
    )
    card = Card.new(
        "base",
        made_by="kit base build",
        sources={"vision": describe_source(Path(vision_dir)), "llm": describe_source(Path(llm_dir))},
        settings={"projector": projector, "vision_layer": vision_layer, "image_aspect": image_aspect, "seed": seed},
    )
    assemble(config, LlavaForConditionalGeneration, weights, out=Path(out), processor=processor, card=card)
    return Path(out)
