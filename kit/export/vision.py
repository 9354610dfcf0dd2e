"""The vision tower + projector of a merged LLaVA as llama.cpp's mmproj GGUF (clip.cpp reads it).

LLaVA takes the tower's hidden state at `vision_feature_layer` (-2: one before the last) without
the final layernorm, drops CLIP's class token ("default" strategy) and projects with
Linear-GELU-Linear. clip.cpp runs the blocks up to the feature layer it is told and drops the class
token itself, so the file holds exactly the blocks LLaVA uses, no post-layernorm, and the
projector's two linears at LLaVA's `mm_projector` positions 0 and 2.
"""

from __future__ import annotations

from typing import Any

import gguf

from kit.base.family import Family
from kit.core.errors import KitError
from kit.export.tensors import FILE_TYPES, add_tensor, finish, map_name

# clip.cpp's FFN: use_gelu picks GELU, otherwise it runs CLIP's quick-GELU.
GELU_ACTS = {"gelu": True, "gelu_pytorch_tanh": True, "gelu_new": True, "quick_gelu": False}
FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # clip.cpp's key; the gguf library has no constant for it
PROJECTOR_POSITIONS = {"linear_1": 0, "linear_2": 2}  # LLaVA's nn.Sequential(Linear, GELU, Linear)


def feature_layer(cfg, n_layers: int) -> int:
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise KitError(f"vision_feature_layer {layer}: features stacked from several layers are not exported; "
                       "kit exports one feature layer (LLaVA-1.5: -2)")
    layer = layer if layer >= 0 else n_layers + layer + 1
    if not 1 <= layer <= n_layers:
        raise KitError(f"vision_feature_layer {cfg.vision_feature_layer} is outside the tower's {n_layers} layers")
    return layer


def check_exportable(cfg, family: Family) -> None:
    """KitError naming what llama.cpp cannot run, from the model's config (before any merge or write)."""
    vcfg = cfg.vision_config
    towers = family.gguf.towers
    if vcfg.model_type not in towers:
        what = family.gguf.no_encoder.get(vcfg.model_type, f"a '{vcfg.model_type}'")
        raise KitError(f"its vision tower is {what}, which llama.cpp's multimodal runtime has no encoder for; kit exports "
                       f"LLaVA models with {' or '.join(towers)} towers (or --text-only writes the LLM alone)")
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if (strategy == "default") != towers[vcfg.model_type].class_token:
        raise KitError(f"vision_feature_select_strategy '{strategy}' with a {vcfg.model_type} tower: llama.cpp drops "
                       "the class token exactly when the tower has one")
    act = getattr(cfg, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise KitError(f"projector_hidden_act '{act}': llama.cpp's LLaVA projector applies GELU")
    if vcfg.hidden_act not in GELU_ACTS:
        raise KitError(f"vision tower activation '{vcfg.hidden_act}' is not one llama.cpp's CLIP encoder has")
    feature_layer(cfg, vcfg.num_hidden_layers)


def write_mmproj(model, family: Family, image_processor, path, name: str) -> dict[str, Any]:
    cfg, vcfg = model.config, model.config.vision_config
    n_layers = feature_layer(cfg, vcfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    # The tower and projector stay f16 at every --quant (small, and what quality depends on).
    w.add_file_type(FILE_TYPES["f16"])
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(family.gguf.projector)
    w.add_vision_projection_dim(cfg.text_config.hidden_size)
    w.add_vision_image_size(vcfg.image_size)
    w.add_vision_patch_size(vcfg.patch_size)
    w.add_vision_embedding_length(vcfg.hidden_size)
    w.add_vision_feed_forward_length(vcfg.intermediate_size)
    w.add_vision_block_count(n_layers)
    w.add_vision_head_count(vcfg.num_attention_heads)
    w.add_vision_attention_layernorm_eps(vcfg.layer_norm_eps)
    w.add_vision_image_mean([float(x) for x in image_processor.image_mean])
    w.add_vision_image_std([float(x) for x in image_processor.image_std])
    w.add_vision_use_gelu(GELU_ACTS[vcfg.hidden_act])
    w.add_array(FEATURE_LAYER_KEY, [n_layers])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_layers)
    state = model.get_submodule(family.vision[0]).state_dict()
    # transformers keeps CLIP/SigLIP either wrapped (vision_model.*) or bare; the name map wants the wrapped form
    if not any(k.startswith("vision_model.") for k in state):
        state = {f"vision_model.{k}": v for k, v in state.items()}
    for key, tensor in state.items():
        if key.startswith(("vision_model.post_layernorm.", "vision_model.head.")):
            continue  # LLaVA reads hidden states before them
        if key.startswith("vision_model.encoder.layers.") and int(key.split(".")[3]) >= n_layers:
            continue  # past the feature layer: LLaVA never runs them
        add_tensor(w, map_name(names, f"vision_tower.{key}", "vision tower"), tensor, quant="f16")
    projector = model.get_submodule(family.projector[0])
    for key, tensor in projector.state_dict().items():
        module, _, kind = key.partition(".")
        if module not in PROJECTOR_POSITIONS:
            raise KitError(f"projector tensor '{key}': llama.cpp's LLaVA projector has two linears (linear_1, linear_2) only")
        mm = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=PROJECTOR_POSITIONS[module])
        add_tensor(w, f"{mm}.{kind}", tensor, quant="f16")
    finish(w)
    return {"projector": family.gguf.projector, "tower": vcfg.model_type, "blocks": n_layers,
            "image_size": vcfg.image_size, "patch_size": vcfg.patch_size}
