"""Text -> token ids with character offsets, the way each template's reference code tokenizes.

LLaVA's `plain` and `vicuna_v1` code (`tokenizer_image_token`) splits a prompt at every `<image>`
and tokenizes the pieces separately: each piece starts fresh, so a SentencePiece tokenizer adds
its word-start marker after the image even when it would not inside one string (`legacy=False`).
Checkpoints trained that way expect those ids, at training and at inference, so kit tokenizes
those templates the same way. Chat templates are tokenized whole, as their processors do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kit.core.templates import IMAGE_TOKEN

# Templates whose reference code tokenizes the text between image placeholders piece by piece.
CHUNKED_TEMPLATES = ("plain", "vicuna_v1")


@dataclass
class Tokens:
    ids: np.ndarray  # [T] int64
    starts: np.ndarray  # [T] first character of each token in the text
    ends: np.ndarray  # [T] one past its last character (== start for added markers such as BOS)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def tokenize_whole(tokenizer, text: str, add_special_tokens: bool) -> Tokens:
    ids, offsets = _encode(tokenizer, text, add_special_tokens)
    return _tokens(ids, offsets)


def tokenize_chunked(tokenizer, text: str, n_image_tokens: int | list[int], image_token: str = IMAGE_TOKEN) -> Tokens:
    """LLaVA's rule: every piece between placeholders is tokenized on its own (special tokens
    added); the first piece's BOS is kept once and the first id of every later piece dropped; each
    placeholder becomes its image's image ids (`n_image_tokens`: the processor's count, one for
    every image or one per placeholder in order)."""
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    pieces = text.split(image_token)
    counts = n_image_tokens if isinstance(n_image_tokens, list) else [n_image_tokens] * (len(pieces) - 1)
    if len(counts) != len(pieces) - 1:
        raise ValueError(f"{len(pieces) - 1} image placeholders but {len(counts)} image token counts")
    encoded = [_encode(tokenizer, p, True) for p in pieces]
    bos = tokenizer.bos_token_id
    skip = 1 if encoded[0][0] and bos is not None and encoded[0][0][0] == bos else 0
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    if skip:
        ids.append(encoded[0][0][0])
        offsets.append((0, 0))
    pos = 0
    for k, (piece_ids, piece_offsets) in enumerate(encoded):
        if k:
            ids += [image_id] * counts[k - 1]
            offsets += [(pos, pos + len(image_token))] * counts[k - 1]
            pos += len(image_token)
        ids += piece_ids[skip:]
        offsets += [(pos + a, pos + b) for a, b in piece_offsets[skip:]]
        pos += len(pieces[k])
    return _tokens(ids, offsets)


def tokenize(tokenizer, text: str, template: str, n_image_tokens: int | list[int]) -> Tokens:
    """Ids for a rendered text. Chunked templates take one placeholder per image and expand it;
    chat templates take the text with placeholders already expanded (their processors' layout)."""
    if template in CHUNKED_TEMPLATES:
        return tokenize_chunked(tokenizer, text, n_image_tokens)
    return tokenize_whole(tokenizer, text, add_special_tokens=False)


def _tokens(ids: list[int], offsets: list[tuple[int, int]]) -> Tokens:
    return Tokens(
        np.asarray(ids, dtype=np.int64),
        np.asarray([a for a, _ in offsets], dtype=np.int64),
        np.asarray([b for _, b in offsets], dtype=np.int64),
    )


def supervised_mask(tokens: Tokens, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for every token that carries characters of a supervised span. A span starts where the
    inference prompt ends, so a separator space the tokenizer makes a token of its own (before a
    digit, a CJK character or a newline) is supervised: the model has to produce it."""
    mask = np.zeros(len(tokens.ids), dtype=bool)
    has_text = tokens.ends > tokens.starts
    for a, b in spans:
        mask |= has_text & (tokens.ends > a) & (tokens.starts < b)
    return mask


def special_texts(tokenizer) -> tuple[str, ...]:
    """Texts that the tokenizer turns into special tokens (end of sequence, turn markers, ...)."""
    found = set(tokenizer.all_special_tokens)
    found.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    found.discard(IMAGE_TOKEN)
    return tuple(sorted(t for t in found if t))
