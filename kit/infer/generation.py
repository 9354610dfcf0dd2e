"""The one way kit talks to a trained model: `kit chat`, `kit serve` and `kit eval` all come here.

- Prompts are built in the format the model was trained with: the recipe's template from its card
  (vicuna_v1 / plain) else the processor's own chat template, from OpenAI-style conversations
  (several turns, system message, images as `{"type": "image"}` parts in order).
- Images are padded or cropped as in training (the card's `image_aspect`).
- Answers stream from a background generation thread (transformers' TextIteratorStreamer); the text
  a caller sees is stripped of leading/trailing whitespace and cut at the first stop string, the
  same whether it is read piece by piece or joined.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kit.core.errors import KitError

IMAGE_TOKEN = "<image>"
# Larger images are refused rather than decoded (a small PNG can unpack to gigabytes).
MAX_IMAGE_PIXELS = 40_000_000


def go_offline() -> None:
    """Make the Hugging Face libraries refuse network access (kit only loads local folders).

    Respects an HF_HUB_OFFLINE the user set. Must run before transformers is imported to take full
    effect; when huggingface_hub is already imported its module constant is set too.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE"):
        constants.HF_HUB_OFFLINE = True


@dataclass
class Sampling:
    """How to pick tokens. temperature 0 is greedy (and then top_p and seed do not matter)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "num_beams": 1}
        # top_k=0: no top-k cut beyond what the caller asked for (OpenAI has none).
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0, "num_beams": 1}


# --------------------------------------------------------------------------------------- prompts


def _is_vicuna(processor, info: dict[str, Any]) -> bool:
    if info.get("template") == "vicuna_v1":
        return True
    return not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None)


def build_prompt(processor, messages: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The prompt text for a conversation, ending where the assistant's next answer starts.

    messages: [{"role": "system" | "user" | "assistant", "content": str | [{"type": "text", "text": ...},
    {"type": "image"}]}]. info: template / system_prompt as kit.infer.load.load_for_inference gives them;
    the card's system prompt is used unless the conversation starts with its own. A 'plain'
    (stage-1, caption-only) model sees only one image token: it was never shown questions.
    """
    from kit.core.templates import VICUNA_TEMPLATE

    if info.get("template") == "plain":
        return getattr(processor, "image_token", None) or IMAGE_TOKEN
    messages = list(messages)
    if info.get("system_prompt") and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": info["system_prompt"]})
    chat_template = VICUNA_TEMPLATE if _is_vicuna(processor, info) else None
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=chat_template)


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(
        1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p.get("type") == "image"
    )


# ---------------------------------------------------------------------------------------- images


def decode_image(data: bytes):
    """An RGB PIL image from encoded bytes (PNG, JPEG, ...). Raises ImageProblem if undecodable."""
    from PIL import Image, UnidentifiedImageError

    from kit.data.images import ImageProblem

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageProblem(f"image is {im.width}x{im.height} pixels; at most {MAX_IMAGE_PIXELS:,} are accepted")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageProblem):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageProblem(f"the image cannot be decoded ({first})") from None


def load_image_file(path) -> Any:
    """An RGB PIL image from a file. Raises KitError naming the file if it is missing or not an image."""
    from pathlib import Path

    from kit.data.images import ImageProblem, check_image, open_rgb

    path = Path(path)
    try:
        check_image(path)
        return open_rgb(path)
    except ImageProblem as e:
        raise KitError(f"{e}; give a PNG or JPEG file") from None


def fit_image(img, aspect: str, image_processor):
    """As training showed images: 'pad' centres on a square of the mean colour, 'crop' leaves it to the processor."""
    from kit.data.images import mean_colour, pad_to_square

    return pad_to_square(img, mean_colour(image_processor)) if aspect == "pad" else img


# ----------------------------------------------------------------------------------- model input


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the generation config's eos plus the template end markers."""
    ids: list[int] = []
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    for tok in (tokenizer.eos_token, "<|im_end|>", "</s>"):
        if tok and tok in tokenizer.get_vocab():
            ids.append(tokenizer.convert_tokens_to_ids(tok))
    return sorted({i for i in ids if i is not None})


def pad_id(tokenizer, stops: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]


def encode(processor, prompts: list[str], images: list) -> dict[str, Any]:
    """Tokenized, left-padded batch (pixel values included when there are images)."""
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        return dict(processor(text=prompts, images=images or None, padding=True, return_tensors="pt"))
    finally:
        tok.padding_side = old_side


def to_model(inputs: dict[str, Any], model) -> dict[str, Any]:
    """Inputs on the model's device; pixel values in its floating dtype."""
    import torch

    device = next(p.device for p in model.parameters())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.uint8), torch.float32)
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}


def prepare(processor, info: dict[str, Any], messages: list[dict[str, Any]], images: list) -> dict[str, Any]:
    """Model inputs (on CPU) for one conversation; `images` are PIL images in the order of the image parts.

    Raises KitError when the image parts and images disagree, or a 'plain' model gets no image.
    """
    if count_images(messages) != len(images):
        raise KitError(f"the conversation has {count_images(messages)} image parts but {len(images)} images were given")
    if info.get("template") == "plain":
        if not images:
            raise KitError("this model was trained with the 'plain' (caption-only) template: send an image to caption")
        images = images[-1:]
    aspect = info.get("image_aspect") or "pad"
    fitted = [fit_image(im, aspect, processor.image_processor) for im in images]
    return encode(processor, [build_prompt(processor, messages, info)], fitted)


# ------------------------------------------------------------------------------------ generation


class TextFilter:
    """Streamed pieces -> the answer the caller sees: leading and trailing whitespace dropped, cut at
    the first stop string (which is not included). Joining what `feed` and `finish` return gives the
    same text however the pieces were split."""

    def __init__(self, stop: tuple[str, ...] | list[str] = ()):
        self.stop = [s for s in stop if s]
        # Text that could still turn out to be the start of a stop string is held back.
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.buf = ""
        self.started = False
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        self.buf += piece
        hits = [i for i in (self.buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buf = self.buf[: min(hits)].rstrip(), ""
            return out
        # What is let out never ends in whitespace: it may turn out to precede a stop string or the end.
        safe = len(self.buf[: max(0, len(self.buf) - self.hold)].rstrip())
        if safe <= 0:
            return ""
        out, self.buf = self.buf[:safe], self.buf[safe:]
        return out

    def finish(self) -> str:
        out, self.buf = self.buf.rstrip(), ""
        return out


class Generation:
    """One answer generated in a background thread. Iterate it for text pieces (see TextFilter);
    afterwards `text`, `prompt_tokens`, `completion_tokens` and `finish_reason` ('stop' | 'length')
    are set. Leaving the iteration early (or `cancel()`) stops the generation at the next token.

    `lock` serialises generations on one model: the thread waits for it before generating.
    `select` is a context manager entered around generate (e.g. choosing a PEFT adapter).
    Errors in the thread are raised from the iteration.
    """

    def __init__(self, model, tokenizer, inputs: dict[str, Any], sampling: Sampling,
                 lock: threading.Lock | None = None, select=None):
        from transformers import TextIteratorStreamer

        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.inputs = inputs
        self.lock = lock or threading.Lock()
        self.select = select or contextlib.nullcontext
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self.text = ""
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._filter = TextFilter(sampling.stop)
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._thread = threading.Thread(target=self._run, name="kit-generate", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def _run(self) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancel = self._cancel

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        ended = False
        try:
            with self.lock:
                if cancel.is_set():
                    return
                stops = stop_ids(self.model, self.tokenizer)
                with self.select(), torch.no_grad():
                    if self.sampling.seed is not None:
                        torch.manual_seed(self.sampling.seed)
                    out = self.model.generate(
                        **to_model(self.inputs, self.model), max_new_tokens=self.sampling.max_new_tokens,
                        eos_token_id=stops or None, pad_token_id=pad_id(self.tokenizer, stops),
                        streamer=self._streamer, stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        **self.sampling.generate_kwargs(),
                    )
                ended = True  # generate ends the streamer itself
                new = out[0, self.prompt_tokens:]
                self.completion_tokens = int(new.shape[0])
                if self.completion_tokens >= self.sampling.max_new_tokens and int(new[-1]) not in stops:
                    self.finish_reason = "length"
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread, which raises it
            self.error = e
        finally:
            if not ended:
                self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._streamer:
                out = self._filter.feed(piece)
                if out:
                    self.text += out
                    yield out
                if self._filter.stopped:
                    self._cancel.set()
                    break
            out = self._filter.finish()
            self._thread.join()
            if self.error is not None:
                raise self.error
            if self._filter.stopped:
                self.finish_reason = "stop"
            if out:
                self.text += out
                yield out
        finally:
            self._cancel.set()

    def result(self) -> str:
        """Wait for the whole answer and return it."""
        for _ in self:
            pass
        return self.text
