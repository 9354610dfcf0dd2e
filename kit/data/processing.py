"""The checkpoint's own processor, driving text and images into model inputs.

Each family expands an image placeholder its own way: a fixed run of tokens (LLaVA-1.5), a count
that depends on the image (anyres tiles, dynamic resolution, image splitting), markers around it
(Gemma 3, InternVL, Idefics3, Pixtral). kit never re-implements that: it asks the processor what
one image of a given size becomes (cached per size, from a blank image of that size), so labels can
come from character offsets on the expanded text, and feeds the processor at training and inference
so every tensor it returns (image_sizes, image_grid_thw, token_type_ids, ...) reaches the model.
"""

from __future__ import annotations

import weakref

import torch
from PIL import Image

from kit.base.family import token_keys
from kit.core.errors import KitError
from kit.core.templates import IMAGE_TOKEN, PREFIX
from kit.core.tokens import CHUNKED_TEMPLATES, tokenize_chunked
from kit.data.images import mean_colour, pad_to_square

# Per-token tensors (families.yaml's token inputs): padded along the sequence, cut with it;
# everything else is per image. Padding is 0 except for the ids and the labels (collate).
TOKEN_KEYS = token_keys()


class _Recorder:
    """Stands in for the processor's tokenizer to see the text the processor built."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.texts: list = []

    def __call__(self, text=None, *args, **kwargs):
        self.texts.append(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class Processing:
    """How one checkpoint's processor turns text with image placeholders, and images, into inputs.

    template: plain / vicuna_v1 (LLaVA's tokenization: kit tokenizes, the image processor makes the
    pixels) or chat (the processor does both). aspect: pad (LLaVA-1.5's square padding first), crop
    (the processor's own resizing), or None for images already fitted by the caller."""

    def __init__(self, processor, template: str, aspect: str | None = "pad"):
        self.processor = processor
        self.template = template
        self.aspect = aspect
        self.chunked = template in CHUNKED_TEMPLATES
        # PaliGemma: token_type_ids mark the answer (1) apart from the prefix it may attend to both ways.
        self.prefix_lm = template == PREFIX
        image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
        if self.chunked and image_token != IMAGE_TOKEN:
            # kit writes LLaVA's <image> ids itself; such a model would find no image where it looks.
            raise KitError(f"template {template} (LLaVA's) writes every image as {IMAGE_TOKEN} tokens, and this model's processor "
                           f"marks images with {image_token} (with its own markers around them): use template chat "
                           "(--set data.template=chat)")
        # The text a chat template writes for an image, which the processor expands.
        self.placeholder = IMAGE_TOKEN if self.chunked else image_token
        self.image_token = image_token
        self._expansions: dict[tuple[int, int], str] = {}
        self._counts: dict[tuple[int, int], int] = {}

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def fit(self, img: Image.Image) -> Image.Image:
        """The image as training shows it to the processor."""
        return pad_to_square(img, mean_colour(self.processor.image_processor)) if self.aspect == "pad" else img

    def fitted_size(self, size: tuple[int, int]) -> tuple[int, int]:
        w, h = size
        return (max(w, h), max(w, h)) if self.aspect == "pad" else (w, h)

    def expansion(self, size: tuple[int, int]) -> str:
        """The text one image of `size` (width, height, as stored) becomes in the processor's hands."""
        size = self.fitted_size(size)
        if size not in self._expansions:
            blank = Image.new("RGB", size, (127, 127, 127))
            recorder = _Recorder(self.processor.tokenizer)
            self.processor.tokenizer = recorder
            try:
                self.processor(text=[self.image_token], images=[blank], add_special_tokens=False)
            except Exception as e:  # noqa: BLE001 - processors raise what their image code raises
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise KitError(f"the processor cannot expand an image of {size[0]}x{size[1]} px ({type(e).__name__}: {first})") from None
            finally:
                self.processor.tokenizer = recorder._tokenizer
            text = recorder.texts[-1]
            text = text[0] if isinstance(text, list) else text
            if self.prefix_lm:  # the processor also wrote its BOS and newline after the image
                text = text[: text.rfind(self.image_token) + len(self.image_token)]
            self._expansions[size] = text
        return self._expansions[size]

    def image_tokens(self, size: tuple[int, int]) -> int:
        """How many positions of the sequence one image of `size` takes."""
        key = self.fitted_size(size)
        if key not in self._counts:
            text = self.expansion(size)
            self._counts[key] = self._chunked_count(text) if self.chunked else len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._counts[key]

    def _chunked_count(self, text: str) -> int:
        n = text.count(self.image_token)
        if text != self.image_token * n:
            raise KitError(
                f"template {self.template} (LLaVA's) needs a processor that expands an image into {self.image_token} tokens only; "
                f"this one writes markers around them ({text[:60]!r}...): use template chat"
            )
        return n

    def expansions(self, sizes: list[tuple[int, int]]) -> list:
        """Per image: its token count (chunked templates) or its expanded text (chat)."""
        return [self.image_tokens(s) if self.chunked else self.expansion(s) for s in sizes]

    # ------------------------------------------------------------------ model inputs

    def sample_inputs(self, text: str, ids, images: list[Image.Image], suffix: str | None = None) -> dict[str, torch.Tensor]:
        """One sample's inputs: token keys 1-D over the sequence, image keys as the processor gives them.
        `ids`: the ids kit tokenized (and labelled; the processor must agree with them, and they may
        be a truncated prefix of its ids), or None for a prompt (chat: the processor's ids). suffix:
        the answer, for the prefix layout (the processor marks it in token_type_ids)."""
        if self.chunked:
            ids = torch.as_tensor(ids, dtype=torch.long)
            out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if images:
                out.update(dict(self.processor.image_processor(images=[self.fit(im) for im in images], return_tensors="pt")))
            return out
        extra = {"suffix": [suffix]} if suffix is not None else {}
        got = self.processor(text=[text], images=[self.fit(im) for im in images] or None, add_special_tokens=False,
                             return_tensors="pt", **extra)
        got = {k: v for k, v in got.items() if k != "labels" and isinstance(v, torch.Tensor)}
        proc_ids = got["input_ids"][0]
        ids = proc_ids if ids is None else torch.as_tensor(ids, dtype=torch.long)
        n = len(ids)
        if len(proc_ids) < n or not torch.equal(proc_ids[:n], ids):
            raise KitError(
                "the processor tokenized a sample differently from kit's expansion of it (its image placeholders or the "
                "text around them); report this with the model family and the sample"
            )
        for k in TOKEN_KEYS:
            if k in got:
                got[k] = got[k][0, :n]
        return got

    def prompt_inputs(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """A left-padded batch of prompts for generation; `images` in the order of the placeholders."""
        placeholders = [p.count(self.placeholder) for p in prompts]
        if sum(placeholders) != len(images):
            raise KitError(f"the prompts hold {sum(placeholders)} image placeholders but {len(images)} images were given")
        rows, k = [], 0
        for prompt, n in zip(prompts, placeholders):
            own = images[k:k + n]
            k += n
            ids = tokenize_chunked(self.tokenizer, prompt, [self.image_tokens(im.size) for im in own]).ids if self.chunked else None
            rows.append(self.sample_inputs(prompt, ids, own))
        return collate(rows, self.pad_id, padding_side="left")

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def processing_for(processor, template: str) -> Processing:
    """One Processing per loaded processor and template, for inference on images the caller has
    already fitted: its per-size expansions are asked of the processor once, not per request."""
    per_template = _SHARED.setdefault(processor, {})
    if template not in per_template:
        per_template[template] = Processing(processor, template, aspect=None)
    return per_template[template]


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape[1:]) == shape:
        return t
    out = t.new_zeros((t.shape[0], *shape))
    out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
    return out


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Batch per-sample inputs of any family: token keys padded along the sequence; image keys
    (pixels, sizes, grids, masks) joined along their first axis, zero-padded where images differ
    in tiles or size (the processors' own batching does the same, and the models skip the padding)."""
    longest = max(len(r["input_ids"]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    token_keys = [k for k in TOKEN_KEYS if any(k in r for r in rows)]
    for key in token_keys:
        fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
        batch = torch.full((len(rows), longest), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            if key not in r:
                continue
            v = r[key]
            if padding_side == "left":
                batch[i, longest - len(v):] = v
            else:
                batch[i, :len(v)] = v
        out[key] = batch
    others = [k for r in rows for k in r if k not in TOKEN_KEYS]
    for key in dict.fromkeys(others):
        parts = [r[key] for r in rows if key in r]
        if parts[0].dim() == 0:
            out[key] = torch.stack(parts)
            continue
        shape = tuple(max(p.shape[d] for p in parts) for d in range(1, parts[0].dim()))
        out[key] = torch.cat([_pad_to(p, shape) for p in parts])
    return out
