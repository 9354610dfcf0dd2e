"""Text-only LLM backends for `kit generate`: the OpenAI API or any OpenAI-compatible server, and an
in-process transformers model.

Heavy or network-capable libraries (openai, torch, transformers) are imported only when a backend
is first used, so building a backend, a privacy check and a dry run never open a connection or
load a model.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kit.core import options
from kit.core.errors import KitError
from kit.core.network import is_loopback_host, redact_url
from kit.generate.parse import repeat_start

BACKENDS = options.GENERATE_BACKENDS
OPENAI_HOST = "api.openai.com"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | whatever the server says


class BackendError(Exception):
    """One request failed. `category` is the kind of failure the run's summary counts ("timeout",
    "connection error", "HTTP 429", "malformed response", "generation failed"): data, never read
    back out of `reason`, which says the rest. `retryable` says whether trying again may help (429,
    5xx, timeouts, connection drops, malformed bodies); `retry_after` is the server's requested wait."""

    def __init__(self, category: str, reason: str | None = None, *, retryable: bool, retry_after: float | None = None):
        reason = reason or category
        super().__init__(reason)
        self.category = category
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class Backend:
    """What the runner needs from a text generator.

    `complete` raises `BackendError` for a failed request and `KitError` for problems no retry can
    fix (bad key, unknown model). `complete_batch` is the batched form; backends without real
    batching inherit one that runs the requests concurrently.
    """

    is_remote: bool = False
    batch_size: int = 1
    model: str = ""
    servers: int = 1  # servers behind it (kit.generate.replicas); --concurrency is per server

    @classmethod
    def request_kind(cls) -> str:
        """What a request to it means, for the ledger's request key (kit.generate.ledger): backends
        that send the same requests to the same kind of server share it."""
        return cls.__name__

    def describe(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        """Raise KitError if the backend cannot run at all (e.g. no API key). Never touches the network."""

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int) -> Completion:
        raise NotImplementedError

    async def complete_batch(
        self, batch: list[list[dict]], *, max_tokens: int, temperature: float, seed: int
    ) -> list[Completion]:
        return list(
            await asyncio.gather(
                *(self.complete(m, max_tokens=max_tokens, temperature=temperature, seed=seed + i) for i, m in enumerate(batch))
            )
        )

    async def aclose(self) -> None:
        """Release per-event-loop resources; the backend stays usable from a later event loop."""


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent or unreadable."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@functools.lru_cache(maxsize=1)
def _tls_context() -> Any:
    """The HTTP library's default verifying TLS context, built once per process: loading the CA
    bundle takes ~30 ms, which every run (and every test) would otherwise pay again."""
    try:
        import httpx2 as httpx  # what openai>=3 is built on
    except ImportError:
        import httpx
    return httpx.create_ssl_context()


class OpenAIBackend(Backend):
    """The OpenAI chat completions API, or any server that speaks it (vLLM, llama.cpp, Ollama) via `base_url`."""

    batch_size = 1

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 60):
        self.model = model
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout = timeout
        self.host = urlsplit(self.base_url).hostname if self.base_url else OPENAI_HOST
        if self.base_url and not self.host:
            raise KitError(f"--base-url '{base_url}' has no host; use a URL like http://127.0.0.1:8000/v1")
        self.is_remote = not is_loopback_host(self.host)
        # As the SDK does: OPENAI_API_KEY for the API and for servers started with a key (vLLM
        # --api-key); servers without auth accept any placeholder.
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> str:
        return f"openai:{self.model}@{redact_url(self.base_url) or 'https://' + OPENAI_HOST + '/v1'}"

    def check(self) -> None:
        """Raises KitError when the OpenAI API is the target and no key is set."""
        if self.base_url is None and not self.api_key:
            raise KitError("set OPENAI_API_KEY to use the OpenAI API (or pass --base-url for a local OpenAI-compatible server)")

    def _get_client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self.check()
            import openai

            # follow_redirects=False: a redirect would re-send the request body (the records' text)
            # to a host the privacy check never saw. trust_env=False for this machine: HTTP(S)_PROXY /
            # ALL_PROXY would otherwise carry a request meant for loopback to the proxy, private
            # text included. max_retries=0: kit retries itself, with its own backoff, ledger and
            # failure accounting.
            http_client = openai.DefaultAsyncHttpxClient(verify=_tls_context(), follow_redirects=False,
                                                         trust_env=self.is_remote)
            self._client = openai.AsyncOpenAI(
                api_key=self.api_key or "local", base_url=self.base_url, timeout=self.timeout, max_retries=0,
                http_client=http_client,
            )
            self._loop = loop
        return self._client

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int) -> Completion:
        """Raises BackendError (retryable or not) for a failed request, KitError for a bad key or model."""
        import openai
        from openai.types.chat import ChatCompletion

        client = self._get_client()
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        try:
            # The SDK's documented raw call: same errors and response model as chat.completions.create,
            # without its per-request parameter transform (~3 ms of CPU on the event loop per request,
            # which at high concurrency delays every other in-flight request).
            resp = await client.post("/chat/completions", body=body, cast_to=ChatCompletion)
        except openai.APITimeoutError:
            raise BackendError("timeout", f"timeout: no reply within {self.timeout:g}s", retryable=True) from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise BackendError("connection error", f"connection error: {str(cause) or type(cause).__name__}", retryable=True) from None
        except openai.AuthenticationError:
            raise KitError(f"{self.host} rejected the API key (401); set OPENAI_API_KEY to the key it expects") from None
        except (openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise KitError(f"{self.host} refused model '{self.model}' ({e.status_code}); check --model") from None
        except openai.APIStatusError as e:
            code = e.status_code
            retry = code in (408, 409, 429) or code >= 500
            if code == 429:
                label = "rate limited"
            elif code >= 500:
                label = "server error"
            elif 300 <= code < 400:
                label = "redirect not followed (the request body would go to another URL)"
            else:  # e.g. a prompt longer than the model's context: say what the server said
                label = " ".join(str(getattr(e, "message", "") or "request error").split())[:200]
            raise BackendError(
                f"HTTP {code}", f"HTTP {code}: {label}", retryable=retry, retry_after=parse_retry_after(e.response.headers)
            ) from None
        except ValueError as e:  # JSONDecodeError: a malformed or cut-off body
            raise BackendError("malformed response", f"malformed response: {type(e).__name__}", retryable=True) from None
        return _completion_from(resp)

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            finally:
                self._client = None
                self._loop = None


def _completion_from(resp: Any) -> Completion:
    if isinstance(resp, str):  # the client hands back raw text when the body is not JSON
        raise BackendError("malformed response", "malformed response: not JSON", retryable=True)
    choices = getattr(resp, "choices", None) or []
    if not choices or getattr(choices[0], "message", None) is None:
        raise BackendError("malformed response", "malformed response: no choices", retryable=True)
    msg = choices[0].message
    text = msg.content if msg.content is not None else (getattr(msg, "refusal", None) or "")
    usage = getattr(resp, "usage", None)
    return Completion(
        text=text,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        finish_reason=str(choices[0].finish_reason or "stop"),
    )


class StopOnRepeat:
    """Stops a row of a batched generate as soon as its reply asks a question it already asked:
    what follows is the model looping (a 135M model does, often after two rounds) and would only
    burn time until max_tokens before the reply is rejected."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(input_ids[:, self.prompt_length:].tolist()):
            # Only a finished line can complete a repeated question.
            if row and "\n" in self.tokenizer.decode(row[-1:]):
                done[i] = repeat_start(self.tokenizer.decode(row, skip_special_tokens=True)) is not None
        return done


class HFBackend(Backend):
    """An in-process transformers causal LM, batched (left padding, the tokenizer's chat template).

    `model_path=None` is the packaged SmolLM2-135M-Instruct. The model loads on first use, in a
    worker thread, as does every generation: the event loop stays free for the ledger and progress.
    """

    is_remote = False

    def __init__(self, model_path: str | None = None, batch_size: int = 8):
        self.model_path = model_path
        self.model = "hf"
        self.batch_size = max(1, batch_size)
        self._llm: Any = None
        self._tok: Any = None
        self._lock = threading.Lock()  # one generation at a time: torch's global RNG is seeded per batch
        self.batches_run = 0
        self.largest_batch = 0

    def describe(self) -> str:
        return f"hf:{self.model_path or 'SmolLM2-135M-Instruct (packaged)'}"

    def check(self) -> None:
        """Nothing to check cheaply: loading happens on first use (and raises KitError there)."""

    def _load(self) -> None:
        if self._llm is not None:
            return
        if self.model_path is None:
            from kit.base.mini import load_smollm2  # torch loads only when generation starts (module docstring)

            llm, tok = load_smollm2()
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # local_files_only: a hub id loads from the local cache or fails; generation never downloads.
            try:
                tok = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
                llm = AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise KitError(
                    f"--model '{self.model_path}': cannot load a causal LM from a local folder or the HF cache "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                ) from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # generation continues from the right edge of every row
        if getattr(tok, "chat_template", None) is None:
            raise KitError(f"{self.describe()}: the tokenizer has no chat template; use an instruction-tuned model")
        self._llm, self._tok = llm.eval(), tok

    def _generate(self, batch: list[list[dict]], max_tokens: int, temperature: float, seed: int) -> list[Completion]:
        import torch

        with self._lock:
            self._load()
            tok, llm = self._tok, self._llm
            texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed)
            sample = temperature > 0
            with torch.inference_mode():
                out = llm.generate(
                    **enc,
                    max_new_tokens=max_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                    stopping_criteria=[StopOnRepeat(tok, enc["input_ids"].shape[1])],
                )
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            new = out[:, enc["input_ids"].shape[1]:]
            eos = llm.generation_config.eos_token_id
            stops = {*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id}
            stops.discard(None)
            results = []
            for row, mask in zip(new.tolist(), enc["attention_mask"]):
                n = next((i for i, t in enumerate(row) if t in stops), None)
                kept = row if n is None else row[:n]
                text = tok.decode(kept, skip_special_tokens=True)
                cut = repeat_start(text)
                results.append(
                    Completion(
                        # A reply that began asking its questions again ends where the loop began.
                        text=(text if cut is None else text[:cut]).strip(),
                        prompt_tokens=int(mask.sum()),
                        completion_tokens=len(kept) + (0 if n is None else 1),
                        finish_reason="length" if n is None and cut is None else "stop",
                    )
                )
            return results

    async def complete_batch(
        self, batch: list[list[dict]], *, max_tokens: int, temperature: float, seed: int
    ) -> list[Completion]:
        """Raises KitError if the model cannot be loaded; BackendError (not retryable) if generation fails."""
        try:
            return await asyncio.to_thread(self._generate, batch, max_tokens, temperature, seed)
        except KitError:
            raise
        except (RuntimeError, ValueError) as e:
            raise BackendError("generation failed", f"generation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", retryable=False) from None

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int) -> Completion:
        return (await self.complete_batch([messages], max_tokens=max_tokens, temperature=temperature, seed=seed))[0]


def make_backend(name: str, model: str | None, base_url: str | None, *, timeout: float = 60, batch_size: int = 8) -> Backend:
    """Build a backend by name. Raises KitError for an unknown name or a flag that does not fit it."""
    if name == "openai":
        if base_url is not None and not model:
            raise KitError("--base-url needs --model: the model name the server serves (e.g. the vLLM/Ollama model id)")
        return OpenAIBackend(model or DEFAULT_OPENAI_MODEL, base_url=base_url, timeout=timeout)
    if name == "hf":
        if base_url is not None:
            raise KitError("--base-url applies only to --backend openai (any OpenAI-compatible server)")
        return HFBackend(model, batch_size=batch_size)
    raise KitError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
