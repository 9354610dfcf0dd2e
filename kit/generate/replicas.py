"""Several OpenAI-compatible servers of one model (vLLM or llama.cpp replicas) as one backend.

Each request goes to the replica with the fewest requests in flight (ties in turn), so a faster
replica takes more of the work. A replica that fails to connect is rested for a while (longer each
time in a row) and its request is retried on another by the runner's usual retry; the run fails
only when every replica keeps failing. One ledger, one model name, one request identity: which
replica answered does not change what was asked, so a rerun with other servers resumes.
"""

from __future__ import annotations

import itertools
import time

from kit.core.errors import KitError
from kit.core.network import redact_url
from kit.generate.backends import Backend, BackendError, Completion, OpenAIBackend, make_backend

REST_S = 2.0  # first rest after a connection failure; doubles per failure in a row, capped
REST_CAP_S = 60.0


class ReplicaBackend(Backend):
    """Several OpenAI-compatible servers of one model, least-loaded first."""

    @classmethod
    def request_kind(cls) -> str:
        return OpenAIBackend.request_kind()  # each request is one server's: a resumed run on one server keeps them

    def __init__(self, replicas: list[OpenAIBackend]):
        self.replicas = replicas
        self.model = replicas[0].model
        self.is_remote = any(r.is_remote for r in replicas)
        self.host = next((r.host for r in replicas if r.is_remote), replicas[0].host)
        self.in_flight = [0] * len(replicas)
        self.answered = [0] * len(replicas)
        self._failures = [0] * len(replicas)
        self._rest_until = [0.0] * len(replicas)
        self._turn = itertools.count()

    @property
    def servers(self) -> int:
        """The runner keeps --concurrency requests in flight per server."""
        return len(self.replicas)

    def describe(self) -> str:
        return f"openai:{self.model}@" + ",".join(redact_url(r.base_url) or "" for r in self.replicas)

    def check(self) -> None:
        for r in self.replicas:
            r.check()

    def _pick(self) -> int:
        now = time.monotonic()
        ready = [i for i in range(len(self.replicas)) if self._rest_until[i] <= now]
        if not ready:  # all resting: the one back soonest
            return min(range(len(self.replicas)), key=lambda i: self._rest_until[i])
        turn = next(self._turn)
        return min(ready, key=lambda i: (self.in_flight[i], (i - turn) % len(self.replicas)))

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int) -> Completion:
        i = self._pick()
        self.in_flight[i] += 1
        try:
            c = await self.replicas[i].complete(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)
        except BackendError as e:
            if e.category in ("connection error", "timeout"):
                self._failures[i] += 1
                self._rest_until[i] = time.monotonic() + min(REST_CAP_S, REST_S * 2 ** (self._failures[i] - 1))
            raise BackendError(e.category, f"{redact_url(self.replicas[i].base_url)}: {e.reason}", retryable=e.retryable,
                               retry_after=e.retry_after) from None
        finally:
            self.in_flight[i] -= 1
        self._failures[i] = 0
        self.answered[i] += 1
        return c

    async def aclose(self) -> None:
        for r in self.replicas:
            await r.aclose()


def backend_for(name: str, model: str | None, base_urls: list[str] | str | None, *, timeout: float = 60) -> Backend:
    """kit.generate.backends.make_backend, with several --base-url values served as replicas."""
    urls = [base_urls] if isinstance(base_urls, str) else list(base_urls or [])
    if len(urls) <= 1:
        return make_backend(name, model, urls[0] if urls else None, timeout=timeout)
    if len(set(urls)) != len(urls):
        raise KitError("--base-url: the same server is given twice; give each replica once")
    replicas = [make_backend(name, model, u, timeout=timeout) for u in urls]
    return ReplicaBackend(replicas)  # type: ignore[arg-type]
