"""Model families as data (families.yaml): where each keeps its vision tower, projector and LLM,
how many images a sample may hold, and how its prompts are built. Every stage asks here."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kit.core.errors import KitError
from kit.core.files import read_json

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Blocks:
    """Module lists of repeated blocks: the LLM's, and the tower's (alternative paths)."""

    llm: str
    vision: tuple[str, ...]


@dataclass(frozen=True)
class Inputs:
    """What a family's processor returns besides input_ids / attention_mask: per-image tensors and
    per-token ones (padded and cut along the sequence)."""

    image: tuple[str, ...]
    token: tuple[str, ...]


@dataclass(frozen=True)
class GgufTower:
    class_token: bool  # LLaVA's "default" feature strategy drops it, and so does llama.cpp


@dataclass(frozen=True)
class Gguf:
    """How `kit export --format gguf` writes a family for llama.cpp's multimodal runtime."""

    projector: str  # llama.cpp's projector type
    towers: dict[str, GgufTower]  # vision model_type -> what llama.cpp's encoder for it expects
    no_encoder: dict[str, str]  # vision model_type -> a word on what it is, for the refusal
    text: dict[str, str]  # LLM model_type -> llama.cpp architecture


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    model_types: tuple[str, ...]
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    llm: str
    head: str
    images: str  # "one" | "many"
    inputs: Inputs
    prompt: str  # "chat" | "prefix"
    hub_example: str
    blocks: Blocks
    gguf: Gguf | None = field(default=None, hash=False, compare=False)

    @cached_property
    def prefixes(self) -> list[tuple[str, str]]:
        """(module path, part), most specific first: a projector inside the tower wins there."""
        pairs = [(p, "vision") for p in self.vision] + [(p, "projector") for p in self.projector]
        pairs += [(self.llm, "llm"), (self.head, "llm")]
        return sorted(pairs, key=lambda pp: -len(pp[0]))

    def part_of(self, name: str) -> str | None:
        """Which part ('vision', 'projector', 'llm') a parameter or module belongs to; PEFT names allowed."""
        name = name.removeprefix(PEFT_PREFIX)
        for path, part in self.prefixes:
            if name == path or name.startswith(path + "."):
                return part
        return None

    def in_llm_body(self, name: str) -> bool:
        """Inside the language model proper (not its head): where LoRA may go."""
        name = name.removeprefix(PEFT_PREFIX)
        return name.startswith(self.llm + ".") and self.part_of(name) == "llm"

    def full_precision_modules(self) -> list[str]:
        """Never 4-bit: the tower, the projector and the head (full names: transformers matches
        skip names by prefix/suffix, so short ones would miss or over-match)."""
        return list(dict.fromkeys([*self.vision, *self.projector, self.head]))

    def projector_modules(self, model) -> list[str]:
        """The projector's modules (bare parameters such as LLaVA-NeXT's image_newline are not
        modules and so cannot travel in an adapter's modules_to_save)."""
        names = dict(model.named_modules())
        return [p for p in self.projector if p in names]

    def block_lists(self, model) -> dict:
        """{path: module list} of the family's repeated blocks this model has (a timm tower has none)."""
        names = dict(model.named_modules())
        return {p: names[p] for p in (self.blocks.llm, *self.blocks.vision) if p in names}

    def check_layout(self, model, where: str) -> None:
        """KitError naming what is missing when a checkpoint does not have the family's modules."""
        names = dict(model.named_modules())
        missing = [p for p in (*self.vision, self.llm) if p not in names]
        missing += [] if any(p in names or _is_param(model, p) for p in self.projector) else list(self.projector)
        if missing:
            raise KitError(
                f"{where}: {type(model).__name__} has no {', '.join(missing)} where kit's '{self.name}' family description "
                "puts them; kit cannot tell its vision tower, projector and LLM apart"
            )


def _is_param(model, path: str) -> bool:
    try:
        model.get_parameter(path)
        return True
    except AttributeError:
        return False


@cache
def families() -> dict[str, Family]:
    raw = yaml.safe_load(resources.files("kit.base").joinpath("families.yaml").read_text())
    out = {}
    for name, d in raw.items():
        out[name] = Family(
            name=name, label=d["label"], model_types=tuple(d["model_types"]), vision=tuple(d["vision"]),
            projector=tuple(d["projector"]), llm=d["llm"], head=d["head"], images=d["images"],
            inputs=Inputs(image=tuple(d["inputs"]["image"]), token=tuple(d["inputs"]["token"])),
            prompt=d.get("prompt", "chat"), hub_example=d["hub_example"],
            blocks=Blocks(llm=d["blocks"]["llm"], vision=tuple(d["blocks"]["vision"])), gguf=_gguf(d.get("gguf")),
        )
    return out


def _gguf(d: dict | None) -> Gguf | None:
    if d is None:
        return None
    return Gguf(projector=d["projector"], towers={k: GgufTower(**v) for k, v in d["towers"].items()},
                no_encoder=dict(d.get("no_encoder", {})), text=dict(d["text"]))


def token_keys() -> tuple[str, ...]:
    """Per-token tensors of every family, the ids, mask and labels first: padded along the
    sequence and cut with it; everything else a processor returns is per image."""
    extra = sorted({k for f in families().values() for k in f.inputs.token})
    return ("input_ids", "attention_mask", "labels", *extra)


def family_for_type(model_type: str | None, where: str = "base") -> Family:
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in families().values() for t in f.model_types)
    raise KitError(
        f"{where}: model_type '{model_type}' is not a family kit knows (it cannot tell where its vision tower, projector "
        f"and LLM are); supported: {', '.join(known)}"
    )


def config_file(path: Path) -> Path:
    """A checkpoint's config.json; KitError when the folder has none."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise KitError(f"base {path}: no config.json; give a folder made by `kit base build` or a downloaded hub checkpoint")
    return cfg_file


def read_config(path: Path) -> dict[str, Any]:
    return read_json(config_file(path), "model config", fix="restore the file")


def family_of(path: Path) -> Family:
    """The family of the checkpoint in `path` (from config.json); KitError for a folder kit cannot adapt."""
    return family_of_config(read_config(path), path)


def family_of_config(cfg: dict[str, Any], path: Path) -> Family:
    """The family a checkpoint's config.json (read from `path`) names; KitError for one kit cannot adapt."""
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise KitError(
            f"base {path} is not a vision-language model (model_type '{cfg.get('model_type')}', a model without a vision tower); "
            "give a LLaVA-family checkpoint: build one with `kit base build` or download a supported one (kit's README lists the families)"
        )
    return family_for_type(cfg.get("model_type"), f"base {path}")


def family_of_model(model) -> Family:
    """The family of a loaded model (PEFT-wrapped or not)."""
    cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return family_for_type(cfg.model_type, type(model).__name__)
