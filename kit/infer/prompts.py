"""Model inputs in the format a model was trained with: the recipe's template from its card
(vicuna_v1 / plain) else the processor's own chat template, from OpenAI-style conversations
(several turns, system message, images as `{"type": "image"}` parts in order); images padded or
cropped as in training."""

from __future__ import annotations

from typing import Any

from kit.core.errors import KitError
from kit.core.templates import IMAGE_TOKEN, PREFIX, prefix_prompt
from kit.data.processing import processing_for
from kit.data.prompt_spec import PromptSpec
from kit.infer.images import fit_image


def build_prompt(processor, messages: list[dict[str, Any]], spec: PromptSpec) -> str:
    """The prompt text for a conversation, ending where the assistant's next answer starts.

    messages: [{"role": "system" | "user" | "assistant", "content": str | [{"type": "text", "text": ...},
    {"type": "image"}]}]. The spec's system prompt is used unless the conversation starts with its
    own. A 'plain' (stage-1, caption-only) model sees only one image token: it was never shown questions.
    """
    if spec.template == "plain":
        return getattr(processor, "image_token", None) or IMAGE_TOKEN
    if spec.template == PREFIX:
        return _prefix_prompt(processor, messages)
    messages = list(messages)
    if spec.system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=spec.chat_template)


def _prefix_prompt(processor, messages: list[dict[str, Any]]) -> str:
    """The prefix layout has no turns: the last question, with every image of the conversation."""
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise KitError("the conversation has no user message to answer")
    content = users[-1]["content"]
    question = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    placeholder = getattr(processor, "image_token", None) or IMAGE_TOKEN
    return prefix_prompt(question, count_images(messages), placeholder)


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(
        1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p.get("type") == "image"
    )


def encode(processor, prompts: list[str], images: list, template: str = "chat") -> dict[str, Any]:
    """A left-padded batch for generation, made as training made its samples (kit.data.processing):
    `images` (already fitted as training showed them) in the order of the prompts' placeholders."""
    return processing_for(processor, template).prompt_inputs(prompts, images)


def prepare(processor, spec: PromptSpec, messages: list[dict[str, Any]], images: list) -> dict[str, Any]:
    """Model inputs (on CPU) for one conversation; `images` are PIL images in the order of the image parts.

    Raises KitError when the image parts and images disagree, or a 'plain' model gets no image.
    """
    if count_images(messages) != len(images):
        raise KitError(f"the conversation has {count_images(messages)} image parts but {len(images)} images were given")
    if spec.template == "plain":
        if not images:
            raise KitError("this model was trained with the 'plain' (caption-only) template: send an image to caption")
        images = images[-1:]
    if spec.template == PREFIX and not images:
        raise KitError("this model's prompt format (an image, then a question) needs an image: attach one")
    fitted = [fit_image(im, spec.image_aspect, processor.image_processor) for im in images]
    return encode(processor, [build_prompt(processor, messages, spec)], fitted, template=spec.template)
