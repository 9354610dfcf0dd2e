"""Generation: how tokens are picked, which tokens end an answer, and answers streamed from a
background thread (transformers' TextIteratorStreamer). The text a caller sees is stripped of
leading/trailing whitespace and cut at the first stop string, the same whether it is read piece by
piece or joined. `kit chat`, `kit serve` and `kit eval` all generate through here."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from kit.core.precision import to_model


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


# ---------------------------------------------------------------------------------- stopping


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


# ------------------------------------------------------------------------------------ streaming


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


class Answer:
    """One answer as its caller reads it. Iterate it for text pieces (see TextFilter); afterwards
    `text`, `prompt_tokens`, `completion_tokens` and `finish_reason` ('stop' | 'length') are set.
    Leaving the iteration early (or `cancel()`) stops its generation at the next token. Errors of
    the generating thread are raised from the iteration. Subclasses generate into `_streamer` and
    set `error` / counts before `_done` is set."""

    def __init__(self, tokenizer, inputs: dict[str, Any], sampling: Sampling):
        self.tokenizer, self.sampling, self.inputs = tokenizer, sampling, inputs
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self.text = ""
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._filter = TextFilter(sampling.stop)
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

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
            self._done.wait()
            if self.error is not None:
                raise self.error
            if self._filter.stopped:
                self.finish_reason = "stop"
            if out:
                self.text += out
                yield out
        finally:
            self._cancel.set()
            self._finished()

    def _finished(self) -> None:
        """Called once the reader is done with the answer (read to the end, left early, or failed)."""

    def result(self) -> str:
        """Wait for the whole answer and return it."""
        for _ in self:
            pass
        return self.text


class Generation(Answer):
    """One answer generated alone, in a background thread.

    `lock` serialises generations on one model: the thread waits for it before generating.
    `select` is a context manager entered around generate (e.g. choosing a PEFT adapter).
    """

    def __init__(self, model, tokenizer, inputs: dict[str, Any], sampling: Sampling,
                 lock: threading.Lock | None = None, select=None):
        super().__init__(tokenizer, inputs, sampling)
        self.model = model
        self.lock = lock or threading.Lock()
        self.select = select or contextlib.nullcontext
        # Not a daemon, and joined by the reader: a daemon thread still releasing tensors when the
        # interpreter finalizes is killed inside torch's C++ destructors, which aborts the process
        # ("terminate called without an active exception") after a right answer.
        self._thread = threading.Thread(target=self._run, name="kit-generate")
        self._thread.start()

    def _finished(self) -> None:
        self._thread.join()

    def _run(self) -> None:
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
            self._done.set()
