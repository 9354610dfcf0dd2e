"""How a model is prompted, decided once per command by one rule (kit.core.templates.template_for)
and handed to training, inference, merge verification, serving and export alike."""

from __future__ import annotations

from dataclasses import dataclass

from kit.base.family import Family
from kit.core.cards import Card
from kit.core.templates import VICUNA_TEMPLATE, template_for
from kit.data.processing import Processing


@dataclass(frozen=True)
class PromptSpec:
    """template: plain | vicuna_v1 | chat | prefix. chat_template: the Jinja template conversations
    are rendered with (None for plain and prefix, which have none). image_aspect: pad | crop, as
    training prepared images. placeholder: what rendered text holds for an image."""

    template: str
    chat_template: str | None
    system_prompt: str | None
    image_aspect: str
    placeholder: str

    @classmethod
    def choose(cls, processor, family: Family | None, template: str | None, system_prompt: str | None,
               image_aspect: str | None) -> PromptSpec:
        """The spec for `processor`'s checkpoint of `family` (None: a chat-style family), from a
        recipe's or card's settings (None where they say nothing)."""
        own = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
        chosen = template_for(template, family.prompt if family is not None else "chat", has_chat_template=bool(own))
        chat = VICUNA_TEMPLATE if chosen == "vicuna_v1" else own if chosen == "chat" else None
        return cls(chosen, chat, system_prompt, image_aspect or "pad", Processing(processor, chosen).placeholder)

    @classmethod
    def of_card(cls, card: Card, processor, family: Family, base_aspect: str) -> PromptSpec:
        """How the model a card describes was trained to be prompted; `base_aspect`: its base's image
        handling, for cards whose recipe does not set one."""
        fmt = card.prompt_format(base_aspect)
        return cls.choose(processor, family, fmt.template, system_prompt=fmt.system_prompt, image_aspect=fmt.image_aspect)
