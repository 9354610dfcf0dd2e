"""An Ollama Modelfile for an exported model: both GGUF files, the prompt format it was trained
with as a Go template, its system prompt and stop tokens.

The template is not hand-written per family: kit renders a conversation with marker contents
through the same prompt builder training and `kit chat` use, cuts it at the markers, and writes
each piece as what Ollama emits between two messages (by the roles before and after it). A format
whose pieces depend on more than that is refused rather than approximated.
"""

from __future__ import annotations

import json
from dataclasses import replace

from kit.core.errors import KitError
from kit.data.prompt_spec import PromptSpec
from kit.infer.prompts import build_prompt

MARKS = {"system": "\u27e6S\u27e7", "user1": "\u27e6U1\u27e7", "assistant": "\u27e6A\u27e7", "user2": "\u27e6U2\u27e7"}


def _cut(text: str, marks: list[str]) -> list[str]:
    pieces = []
    for mark in marks:
        head, found, text = text.partition(mark)
        if not found:
            raise KitError("the model's chat template drops or rewrites message text; it cannot be written as an Ollama template")
        pieces.append(head)
    return pieces + [text]


def turn_pieces(processor, spec: PromptSpec) -> dict[str, str]:
    """What the prompt holds between messages: before a first system message (`system`), before a
    first user message without one (`first_user`), system->user, user->assistant,
    assistant->user, and after the last user message (`answer`: where generation starts)."""
    spec = replace(spec, system_prompt=None)
    s, u1, a, u2 = (MARKS[k] for k in ("system", "user1", "assistant", "user2"))
    turns = [{"role": "user", "content": u1}, {"role": "assistant", "content": a}, {"role": "user", "content": u2}]
    with_system = _cut(build_prompt(processor, [{"role": "system", "content": s}, *turns], spec), [s, u1, a, u2])
    alone = _cut(build_prompt(processor, turns, spec), [u1, a, u2])
    if alone[1:] != with_system[2:]:
        raise KitError("the model's chat template writes turns differently with and without a system message; "
                       "it cannot be written as an Ollama template")
    return {"system": with_system[0], "first_user": alone[0], "system_user": with_system[1],
            "user_assistant": with_system[2], "assistant_user": with_system[3], "answer": with_system[4]}


def _lit(text: str) -> str:
    """A Go template action printing `text` verbatim (a Go string literal; JSON's escapes are Go's)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(p: dict[str, str]) -> str:
    return (
        '{{ $prev := "" }}{{ range .Messages }}'
        '{{ if eq .Role "system" }}' + _lit(p["system"]) + "{{ .Content }}"
        '{{ else if eq .Role "user" }}'
        '{{ if eq $prev "" }}' + _lit(p["first_user"])
        + '{{ else if eq $prev "system" }}' + _lit(p["system_user"])
        + "{{ else }}" + _lit(p["assistant_user"]) + "{{ end }}{{ .Content }}"
        '{{ else if eq .Role "assistant" }}' + _lit(p["user_assistant"]) + "{{ .Content }}"
        "{{ end }}{{ $prev = .Role }}{{ end }}"
        '{{ if eq $prev "user" }}' + _lit(p["answer"]) + "{{ end }}"
    )


def stop_strings(pieces: dict[str, str], tokenizer) -> list[str]:
    """The end-of-sequence token, the special tokens that close an answer, and the next turn's
    opening text (so a model that runs on does not write the user's turn)."""
    closing = pieces["assistant_user"]
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in closing]
    rest = closing
    for t in specials:
        rest = rest.replace(t, "")
    stops = [tokenizer.eos_token, *specials, rest.strip()]
    return list(dict.fromkeys(s for s in stops if s))


def modelfile(model_file: str, mmproj_file: str | None, processor, spec: PromptSpec) -> str:
    pieces = turn_pieces(processor, spec)
    lines = [f"FROM ./{model_file}"]
    if mmproj_file:
        lines.append(f"FROM ./{mmproj_file}")
    lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    if spec.system_prompt:
        if '"""' in spec.system_prompt:
            raise KitError('the recipe\'s data.system_prompt holds """, which an Ollama Modelfile cannot quote; remove it')
        lines.append(f'SYSTEM """{spec.system_prompt}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stop_strings(pieces, processor.tokenizer)]
    return "\n".join(lines) + "\n"
