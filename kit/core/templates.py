"""Conversation templates and the exact character spans that training supervises.

Each renderer turns a conversation into one string plus the character spans that training
supervises: each assistant answer with its end token, from where the inference prompt stops (for
`vicuna_v1` the space after `ASSISTANT:`). Labels come from those spans through the tokenizer's
offset mapping (kit.core.tokens), so masks never depend on counting the tokens of pieces (the
reference code's "tokenization mismatch" failure, which zeroes a sample's labels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The image placeholder in LLaVA data and kit's templates; processors expand it to image tokens.
IMAGE_TOKEN = "<image>"

# The system line LLaVA-1.5 (Vicuna v1) checkpoints were trained with; kept verbatim so that
# finetuning an existing LLaVA-1.5 sees the prompt it knows.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Jinja templates shipped with every base kit builds. `{% generation %}` marks what an assistant
# turn supervises (answer + end token) so TRL's assistant-only loss works on kit's bases too.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for p in parts -%}{%- if p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{%- for p in parts -%}"
    "{%- if p['type'] == 'image' -%}{{- '<image>\n' -}}{%- elif p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

VICUNA_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for p in parts -%}"
    "{%- if p['type'] == 'image' -%}{{- '<image>\n' -}}{%- elif p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- ' ' -}}"
    "{%- else -%}"
    "{{- 'ASSISTANT: ' -}}"
    "{%- generation -%}"
    "{%- for p in parts -%}{%- if p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- eos_token -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

TEMPLATES = ("plain", "vicuna_v1", "chat")
# What `chat` means for a family whose checkpoints have no chat template but a prefix + suffix
# layout (PaliGemma); chosen from the family's description, never named in a recipe.
PREFIX = "prefix"


def template_for(template: str | None, prompt_style: str, has_chat_template: bool = False) -> str:
    """The one rule for the template a model's samples and prompts are rendered with, read by
    training, inference, merge verification, serving and export (kit.data.prompt_spec): a recipe's
    or card's `template` for a family (kit.base.family: `prompt`); where nothing says (a checkpoint
    kit did not train), the model's own chat template when it has one, else LLaVA's vicuna_v1."""
    if template is None:
        template = "chat" if has_chat_template or prompt_style == "prefix" else "vicuna_v1"
    return PREFIX if template == "chat" and prompt_style == "prefix" else template


class TemplateError(ValueError):
    """A conversation that the chosen template cannot render (reported per sample by the caller)."""


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation as (text, supervised) pieces, in order; the text, the supervised
    [start, end) character spans and their text all follow from them."""

    pieces: tuple[tuple[str, bool], ...]
    # Built from the template's generation-prompt renders (its finished turns differ from them).
    from_prompts: bool = False

    @property
    def text(self) -> str:
        return "".join(p for p, _ in self.pieces)

    @property
    def spans(self) -> list[tuple[int, int]]:
        out, pos = [], 0
        for piece, supervised in self.pieces:
            if supervised and piece:
                out.append((pos, pos + len(piece)))
            pos += len(piece)
        return out

    @property
    def answers(self) -> list[str]:
        return [p for p, supervised in self.pieces if supervised and p]

    def expand_each(self, placeholder: str, expansions: list[str]) -> Rendered:
        """Each placeholder, in order, replaced by its image's expansion (processors that expand
        every image differently: tiles, dynamic resolution, markers around the tokens)."""
        todo = list(expansions)
        pieces = []
        for text, sup in self.pieces:
            chunks = text.split(placeholder)
            if len(chunks) - 1 > len(todo):
                raise TemplateError(f"the template wrote more image placeholders than the sample has images ({len(expansions)})")
            out = chunks[0]
            for chunk in chunks[1:]:
                out += todo.pop(0) + chunk
            pieces.append((out, sup))
        if todo:
            raise TemplateError(f"the template wrote {len(expansions) - len(todo)} image placeholders for {len(expansions)} images")
        return Rendered(tuple(pieces), self.from_prompts)


def render_plain(turns: list[tuple[str, str]], image_token: str) -> Rendered:
    """Stage 1, as LLaVA's `preprocess_plain`: the image, the caption as written and a newline; the
    instruction is dropped. Only caption pairs (one human turn, one answer) have a caption."""
    roles = [r for r, _ in turns]
    if roles != ["user", "assistant"]:
        raise TemplateError(
            f"template plain takes caption pairs (one human turn, then the caption); this sample has {len(turns)} turns"
        )
    return Rendered(((image_token, False), (turns[1][1] + "\n", True)))


def render_vicuna(turns: list[tuple[str, str]], eos_token: str, system: str | None = None) -> Rendered:
    pieces: list[tuple[str, bool]] = [((system or VICUNA_SYSTEM) + " ", False)]
    for role, text in turns:
        if role == "user":
            pieces.append(("USER: " + text + " ", False))
        else:
            # Inference prompts end at "ASSISTANT:", so the separator space belongs to the answer.
            pieces.append(("ASSISTANT:", False))
            pieces.append((" " + text + eos_token, True))
    return Rendered(tuple(pieces))


def render_prefix(turns: list[tuple[str, str]], tokenizer, image_token: str, placeholder: str | None = None) -> Rendered:
    """PaliGemma's layout, as its processor builds it from `text` + `suffix`: the images, BOS, the
    question and a newline are the prefix; the answer and EOS the suffix, the only supervised part.
    One question and one answer per sample: the format has no turns."""
    roles = [r for r, _ in turns]
    if roles != ["user", "assistant"]:
        raise TemplateError(f"this model's prompt format takes one question and its answer; this sample has {len(turns)} turns")
    question = turns[0][1]
    images = (placeholder or image_token) * question.count(image_token)
    return Rendered((
        (images, False), (tokenizer.bos_token or "", False), (question.replace(image_token, "").strip(), False), ("\n", False),
        (turns[1][1].strip(), True), (tokenizer.eos_token or "", True),
    ))


def prefix_parts(rendered: Rendered) -> tuple[str, str]:
    """(text, suffix) of a render_prefix result, as the processor takes them (it adds BOS, the
    newline and EOS itself)."""
    p = [text for text, _ in rendered.pieces]
    return p[0] + p[2], p[4]


def prefix_prompt(question: str, n_images: int, placeholder: str) -> str:
    """The processor's `text` for a question in the prefix layout (it adds BOS and the newline)."""
    return placeholder * n_images + question.strip()


def _parts(role: str, text: str, image_token: str) -> list[dict]:
    """Hub chat templates read content as parts: images where the placeholders were, then text."""
    if role == "assistant":
        return [{"type": "text", "text": text}]
    parts: list[dict] = []
    for k, chunk in enumerate(text.split(image_token)):
        if k:
            parts.append({"type": "image"})
            # LLaVA data writes "<image>\n"; with parts, the template puts its own separator there.
            chunk = chunk[1:] if chunk.startswith("\n") else chunk
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _apply(tokenizer, chat_template: str, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises its own errors and whatever the template's code does
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise TemplateError(f"the chat template failed ({type(e).__name__}: {first})") from None


def render_chat(turns: list[tuple[str, str]], tokenizer, system: str | None = None, chat_template: str | None = None,
                image_token: str = IMAGE_TOKEN, placeholder: str | None = None) -> Rendered:
    """Use the model's own chat template (`chat_template`: the processor's, else the tokenizer's);
    each assistant turn is found by rendering the prefix.

    Content goes in as lists of parts (`{"type": "image"}` where `<image>` was, then text), as hub
    templates expect; a template that renders no placeholder from parts but one from plain strings
    (an older text-only style) gets strings. The text the template adds for an assistant turn (minus
    trailing whitespace) is supervised: the answer and its end-of-turn marker, whatever the syntax.
    `image_token` marks images in `turns`; `placeholder` is what the template writes for one (the
    processor's image token, which it expands; default `image_token`).
    """
    placeholder = placeholder or image_token
    template = chat_template or tokenizer.chat_template
    if not template:
        raise TemplateError("the model has no chat template (processor, tokenizer, chat_template.json/.jinja); use template plain or vicuna_v1")
    n_images = sum(t.count(image_token) for _, t in turns)
    as_parts = _render_chat(turns, tokenizer, system, template=template, image_token=image_token, parts=True)
    if as_parts.text.count(placeholder) == n_images:
        return as_parts
    if placeholder == image_token:
        as_strings = _render_chat(turns, tokenizer, system, template=template, image_token=image_token, parts=False)
        if as_strings.text.count(image_token) == n_images:
            return as_strings
    raise TemplateError(
        f"the chat template renders {as_parts.text.count(placeholder)} image placeholders ({placeholder}) for {n_images} images"
    )


class _NotPrefixes(TemplateError):
    """A finished turn does not extend the generation prompt (tried again from the prompts)."""


def _render_chat(turns, tokenizer, system, template, image_token, parts: bool) -> Rendered:
    try:
        return _render_chat_turns(turns, tokenizer, system, template=template, image_token=image_token, parts=parts)
    except _NotPrefixes:
        return _render_chat_prompts(turns, tokenizer, system, template=template, image_token=image_token, parts=parts)


def _messages(system, image_token, parts: bool):
    def content(role: str, text: str):
        return _parts(role, text, image_token) if parts else text

    return content, ([{"role": "system", "content": content("system", system)}] if system else [])


def _render_chat_turns(turns, tokenizer, system, template, image_token, parts: bool) -> Rendered:
    """Each answer is what the full render adds after the generation prompt."""
    content, messages = _messages(system, image_token, parts)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for role, text in turns:
        if role == "assistant":
            prompt = _apply(tokenizer, template, messages, generation_prompt=True)
            messages.append({"role": role, "content": content(role, text)})
            full = _apply(tokenizer, template, messages, generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise _NotPrefixes("the chat template does not render turns as prefixes of each other")
            turn = full[len(prompt):]
            body = turn.rstrip()
            pieces += [(prompt[len(done):], False), (body + _end_if_open(body, tokenizer), True), (turn[len(body):], False)]
            done = full
        else:
            messages.append({"role": role, "content": content(role, text)})
    full = _apply(tokenizer, template, messages, generation_prompt=False) if messages else ""
    if full[len(done):]:
        pieces.append((full[len(done):], False))
    return Rendered(tuple(pieces))


def _render_chat_prompts(turns, tokenizer, system, template, image_token, parts: bool) -> Rendered:
    """For templates whose finished assistant turn is not the generation prompt plus the answer
    (llava-hf's LLaVA-OneVision writes `<|im_start|>assistant \n` + answer for a finished turn but
    `<|im_start|>assistant\n` as the prompt): each answer follows the generation prompt's header,
    as inference will show it, and ends with the end marker the finished turn writes after it.
    Everything else (system, user turns) is the template's own text."""
    content, messages = _messages(system, image_token, parts)
    pieces: list[tuple[str, bool]] = []
    done = ""  # the template's render of the messages so far (no generation prompt)
    for role, text in turns:
        if role == "assistant":
            prompt = _apply(tokenizer, template, messages, generation_prompt=True)
            messages.append({"role": role, "content": content(role, text)})
            full = _apply(tokenizer, template, messages, generation_prompt=False)
            answer = text.strip()
            turn = full[len(done):]
            # Search after what the finished turn shares with the prompt's header: a short answer
            # ("A") can also occur inside the role name or the end marker.
            start = len(os.path.commonprefix([turn, prompt[len(done):]]))
            if not prompt.startswith(done) or not full.startswith(done) or answer not in turn[start:]:
                raise TemplateError("the chat template does not render turns as prefixes of each other, nor each answer "
                                    "verbatim after its generation prompt; use template vicuna_v1 or fix the template")
            after = turn[turn.index(answer, start) + len(answer):]
            end = after.rstrip()
            body = answer + end
            pieces += [(prompt[len(done):], False), (body + _end_if_open(body, tokenizer), True), (after[len(end):], False)]
        else:
            messages.append({"role": role, "content": content(role, text)})
            full = _apply(tokenizer, template, messages, generation_prompt=False)
            if not full.startswith(done):
                raise TemplateError("the chat template does not render turns as prefixes of each other")
            pieces.append((full[len(done):], False))
        done = full
    return Rendered(tuple(pieces), from_prompts=True)


def _end_if_open(body: str, tokenizer) -> str:
    """EOS for an answer the template leaves open (llava-hf's LLaVA-1.5 template ends an assistant
    turn with a space): as in LLaVA's own training, the model must learn where an answer stops."""
    ends = [t for t in tokenizer.all_special_tokens if t]
    if any(body.endswith(t) for t in ends) or not tokenizer.eos_token:
        return ""
    return tokenizer.eos_token


def render(template: str, turns: list[tuple[str, str]], tokenizer, image_token: str, system: str | None = None,
           chat_template: str | None = None, placeholder: str | None = None) -> Rendered:
    """`turns` hold one `image_token` per image; the caller expands each (Rendered.expand_each)
    where its tokenization needs the processor's expansion."""
    if template == "plain":
        return render_plain(turns, image_token)
    if template == "vicuna_v1":
        return render_vicuna(turns, tokenizer.eos_token or "</s>", system)
    if template == "chat":
        return render_chat(turns, tokenizer, system, chat_template=chat_template, image_token=image_token, placeholder=placeholder)
    if template == PREFIX:
        return render_prefix(turns, tokenizer, image_token, placeholder=placeholder)
    raise TemplateError(f"unknown template '{template}'; choose one of {', '.join(TEMPLATES)}")
