"""`kit chat`: talk to a model or adapter in the terminal, offline.

With a prompt it prints one answer, token by token as it is generated. Without one it reads stdin
line by line and keeps the conversation (the model sees every earlier turn, in its trained
template); `/image PATH` attaches an image to the next message, `/reset` starts over, `/exit` (or
end of input) quits. Answers go to stdout, everything else to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from kit.core import options
from kit.core.errors import KitError
from kit.core.network import go_offline
from kit.infer.generation import Generation, Sampling
from kit.infer.images import load_image_file
from kit.infer.load import Loaded, load_for_inference
from kit.infer.prompts import prepare

HELP = "/image PATH attaches an image to your next message, /reset forgets the conversation, /exit quits"


class Conversation:
    """The turns so far and the images they carry, answered by one loaded model."""

    def __init__(self, loaded: Loaded, sampling: Sampling, system: str | None = None):
        self.loaded, self.sampling = loaded, sampling
        # A system message of the user's own replaces the one the model was trained with.
        self.start = [{"role": "system", "content": system}] if system else []
        self.reset()

    def reset(self) -> None:
        self.messages, self.images = list(self.start), []

    def ask(self, text: str, image=None, out: TextIO = sys.stdout) -> str:
        """Stream the answer to `text` (with `image`, a PIL image, if given) to `out`; returns it.

        The turn joins the history only once answered, so a failed turn leaves no trace.
        """
        content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": text})
        messages = self.messages + [{"role": "user", "content": content}]
        images = self.images + ([image] if image is not None else [])
        processor = self.loaded.processor
        gen = Generation(self.loaded.model, processor.tokenizer, prepare(processor, self.loaded.spec, messages, images=images), sampling=self.sampling)
        for piece in gen:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        self.messages = messages + [{"role": "assistant", "content": gen.text}]
        self.images = images
        return gen.text


def chat(model: Path, image: Path | None = None, prompt: str | None = None, max_new_tokens: int = options.CHAT_MAX_NEW_TOKENS,
         temperature: float = options.CHAT_TEMPERATURE, echo: Callable[[str], None] = print, stdin: TextIO | None = None,
         stdout: TextIO | None = None, *, system: str | None = None, seed: int | None = None) -> None:
    """One answer to `prompt`, or a conversation read from `stdin`. Raises KitError for bad options,
    a bad image or model folder (before loading the model where it can)."""
    go_offline()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if max_new_tokens < 1:
        raise KitError(f"--max-new-tokens {max_new_tokens}: give at least 1")
    if not 0 <= temperature <= 2:
        raise KitError(f"--temperature {temperature}: give a value from 0 (greedy) to 2")
    if system is not None and not system.strip():
        raise KitError("--system is empty; give a system message, or leave --system out to use the one the model was trained with")
    if prompt is not None and not prompt.strip():
        raise KitError("--prompt is empty; give a question, or leave --prompt out to chat")
    picture = load_image_file(image) if image is not None else None
    loaded = load_for_inference(Path(model))
    for note in loaded.notes:
        echo(f"note: {note}")
    if loaded.spec.template == "plain":
        echo("note: this model was trained with the 'plain' (caption-only) template: it captions the image and ignores the text")
    conv = Conversation(loaded, Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
                        system=system)
    if prompt is not None:
        conv.ask(prompt, picture, stdout)
        return
    _repl(conv, picture, stdin, stdout=stdout, echo=echo, name=Path(model).name)


def _repl(conv: Conversation, picture, stdin: TextIO, stdout: TextIO, echo, name: str) -> None:
    echo(f"chatting with {name}; {HELP}")
    while True:
        if stdin.isatty():
            echo_prompt = "> " if picture is None else "> [image] "
            sys.stderr.write(echo_prompt)
            sys.stderr.flush()
        line = stdin.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                conv.reset()
                picture = None
                echo("conversation reset")
            elif cmd == "/image":
                try:
                    picture = load_image_file(Path(arg.strip())) if arg.strip() else None
                except KitError as e:
                    echo(f"error: {e}")
                    continue
                echo(f"image {arg.strip()} attached to your next message" if picture is not None else "give a path: /image PATH")
            else:
                echo(f"unknown command {cmd}; {HELP}")
            continue
        try:
            conv.ask(line, picture, stdout)
        except KitError as e:
            echo(f"error: {e}")
            continue
        picture = None
