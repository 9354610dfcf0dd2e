"""A loopback-only mock of the OpenAI chat completions endpoint, for tests and benchmarks.

Faults are deterministic: a scripted list (request i gets `script[i]`) or a seeded RNG drawing
one fault per request in arrival order. Kinds: "429" (with Retry-After), "500", "hang" (longer
than any sane client timeout), "malformed" (a body that is not JSON), "truncated" (JSON cut in
half) and "refusal" (a valid reply that says it cannot see the image); by script only, "400"
(prompt too long), "401" (bad key) and "redirect" (307 to a non-loopback host).

    with MockOpenAI(latency=0.1, script=["429", None, "500"]) as server:
        OpenAIBackend("mock", base_url=server.base_url)

As a script: `python tests/mock_openai.py --port 8099 --latency 0.1` (GET /stats for counters).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "hang", "malformed", "truncated", "refusal")
# Only by script: problems no retry fixes.
SCRIPT_ONLY = ("400", "401", "redirect")
REDIRECT_TO = "http://10.0.0.1:9/v1/chat/completions"
REFUSAL = "I'm sorry, I cannot see the image, so I can't describe it."

_OBJECTS = ("bicycle", "bench", "umbrella", "kite", "dog", "boat", "train", "clock", "vase", "horse")
_PLACES = ("a park", "a harbour", "a busy street", "a quiet beach", "a kitchen", "a station platform")


def detect_type(messages: list[dict]) -> str:
    """The response type a request asks for, read from the shape of its few-shot replies.

    Few-shot assistant replies show the wanted format: several Question: lines (conversation),
    one (complex reasoning) or none (detailed description). Without examples, the system message's
    wording decides."""
    examples = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
    if examples:
        n = sum(1 for line in examples[0].splitlines() if line.strip().lower().startswith("question:"))
        return "conversation" if n > 1 else "complex" if n == 1 else "detail"
    system = " ".join(m.get("content") or "" for m in messages if m.get("role") == "system").lower()
    if "conversation" in system:
        return "conversation"
    if "reason" in system or "complex" in system:
        return "complex"
    return "detail"


def canned_reply(rtype: str, key: str, vary: bool = True) -> str:
    """A well-formed reply for `rtype` that claims only what its context supports: it names the
    first object of the context's box lines (`label: [x1, y1, x2, y2]`) with that label's box count,
    and otherwise only words no packaged vocabulary knows. `key` (the request's context) also
    varies the wording so that different records never produce duplicate samples."""
    n = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) if vary else 0
    labels = re.findall(r"^\s*([A-Za-z][\w ]*?): \[", key, re.M)
    obj = labels[0] if labels else "object"
    count = NUMBER_WORDS.get(labels.count(obj), str(labels.count(obj))) if labels else "one"
    place, tag = _PLACES[(n // 10) % 6], n % 1_000_003
    if rtype == "conversation":
        return (
            f"Question: What is the main object in the picture?\n"
            f"Answer: The main object is the {obj}, next to a small sign showing the number {tag}.\n"
            f"Question: Where does this seem to be?\n"
            f"Answer: It looks like {place}.\n"
            f"Question: What might happen next?\n"
            f"Answer: Someone will probably come by to look at the {obj} more closely, "
            f"since the sign invites a closer look."
        )
    if rtype == "complex":
        return (
            f"Question: Why might someone stop near the {obj}?\n"
            f"Answer: The {obj} stands out in {place}, and a sign beside it shows the number {tag}. Passers-by often "
            f"pause near something unusual to look at it more closely, so they are probably curious about "
            f"the {obj} or waiting for someone to explain what the sign means."
        )
    return (
        f"The image shows {place} on a bright day. The scene holds {count} {obj} items of note, and a small sign nearby "
        f"shows the number {tag}. The light suggests it is late in the afternoon, and the place looks calm and orderly, "
        f"with nothing hurried about it."
    )


NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs under a burst of parallel connects

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)  # a client that hung up is expected, anything else is news


class MockOpenAI:
    """The mock server. Counters: `requests`, `max_in_flight`, `faults_served`, and `log` (one dict
    per request: index, start, end, fault, type)."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        script: Sequence[str | None] | None = None,
        fault_rate: float = 0.0,
        fault_kinds: Sequence[str] = FAULTS,
        seed: int = 0,
        retry_after: float | None = 1,
        hang: float = 30.0,
        vary: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        fault_for: Callable[[int, dict], str | None] | None = None,
        reply_for: Callable[[str, str], str] | None = None,
    ):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the mock binds loopback only")
        unknown = [f for f in list(script or []) + list(fault_kinds) if f is not None and f not in FAULTS + SCRIPT_ONLY]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {FAULTS + SCRIPT_ONLY}")
        self.latency = latency
        self.script = list(script or [])
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.retry_after = retry_after
        self.hang = hang
        self.vary = vary
        self.fault_for = fault_for
        self.reply_for = reply_for  # (response type, context) -> reply text, instead of canned_reply
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.faults_served: dict[str, int] = {}
        self.log: list[dict[str, Any]] = []
        self._server = _Server((host, port), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> MockOpenAI:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # frees "hang" handlers at once
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MockOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "faults": dict(self.faults_served)}

    def _next_fault(self, index: int, body: dict) -> str | None:
        if self.fault_for is not None:
            return self.fault_for(index, body)
        if index < len(self.script):
            return self.script[index]
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.fault_kinds)
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: Nagle + delayed ACK adds ~40 ms

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/stats":
                    self._send(200, json.dumps(mock.stats()).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, b'{"error": {"message": "request body is not JSON"}}')
                    return
                with mock._lock:
                    index = mock.requests
                    mock.requests += 1
                    mock.in_flight += 1
                    mock.max_in_flight = max(mock.max_in_flight, mock.in_flight)
                    fault = mock._next_fault(index, body)
                    if fault:
                        mock.faults_served[fault] = mock.faults_served.get(fault, 0) + 1
                entry = {"index": index, "start": time.monotonic(), "fault": fault}
                try:
                    self._answer(body, fault, entry)
                finally:
                    entry["end"] = time.monotonic()
                    with mock._lock:
                        mock.in_flight -= 1
                        mock.log.append(entry)

            def _answer(self, body: dict, fault: str | None, entry: dict) -> None:
                messages = body.get("messages") or []
                rtype = detect_type(messages)
                entry["type"] = rtype
                if fault == "hang":
                    mock._stop.wait(mock.hang)
                elif mock.latency:
                    time.sleep(mock.latency)
                if fault == "429":
                    headers = {} if mock.retry_after is None else {"Retry-After": f"{mock.retry_after:g}"}
                    self._send(429, b'{"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}', headers)
                    return
                if fault == "500":
                    self._send(500, b'{"error": {"message": "The server had an error", "type": "server_error"}}')
                    return
                if fault == "400":
                    self._send(400, b'{"error": {"message": "This model\'s maximum context length is 128 tokens.", '
                                    b'"type": "invalid_request_error"}}')
                    return
                if fault == "401":
                    self._send(401, b'{"error": {"message": "Incorrect API key provided", "type": "invalid_api_key"}}')
                    return
                if fault == "redirect":
                    self._send(307, b"{}", {"Location": REDIRECT_TO})
                    return
                if fault == "malformed":
                    self._send(200, b"<html>upstream proxy error</html> {not json")
                    return
                context = messages[-1].get("content", "") if messages else ""
                text = REFUSAL if fault == "refusal" else (mock.reply_for or (lambda t, c: canned_reply(t, c, mock.vary)))(rtype, str(context))
                prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4
                reply = {
                    "id": f"chatcmpl-mock-{entry['index']}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "mock"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4,
                              "total_tokens": prompt_tokens + len(text) // 4},
                }
                data = json.dumps(reply).encode()
                if fault == "truncated":
                    data = data[: len(data) // 2]
                self._send(200, data)

        return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8099)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--faults", default=",".join(FAULTS), help="kinds the RNG draws from")
    ap.add_argument("--script", default="", help="comma-separated faults for the first requests ('-' = none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retry-after", type=float, default=1.0)
    ap.add_argument("--hang", type=float, default=30.0)
    args = ap.parse_args(argv)
    script = [None if s in ("", "-") else s for s in args.script.split(",")] if args.script else None
    server = MockOpenAI(latency=args.latency, script=script, fault_rate=args.fault_rate,
                        fault_kinds=[f for f in args.faults.split(",") if f], seed=args.seed,
                        retry_after=args.retry_after, hang=args.hang, port=args.port)
    print(f"mock OpenAI server on {server.base_url}", flush=True)  # the port is real even with --port 0
    try:
        server._server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server._stop.set()
        server._server.server_close()


if __name__ == "__main__":
    main()
