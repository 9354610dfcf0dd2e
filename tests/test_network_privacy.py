"""Private text goes only to this machine: proxies from the environment never see a request meant
for loopback, and only literal loopback names count as loopback."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kit.core.network import is_loopback_host
from kit.generate.backends import OpenAIBackend
from mock_openai import MockOpenAI

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class RecordingProxy:
    """Answers every request with 502 and keeps what it was sent (the request line and body)."""

    def __init__(self):
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                seen.append((self.command, self.path, self.rfile.read(n)))
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_CONNECT = _any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_proxy_in_the_environment_never_sees_a_loopback_request(monkeypatch, host):
    secret = "patient Jane Roe, MRN 12345"
    with RecordingProxy() as proxy, MockOpenAI() as server:
        for var in PROXY_VARS:
            monkeypatch.setenv(var, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        backend = OpenAIBackend("mock", base_url=server.base_url.replace("127.0.0.1", host))
        reply = asyncio.run(backend.complete([{"role": "user", "content": secret}], max_tokens=8, temperature=0, seed=0))
    assert reply.text
    assert proxy.seen == [], "the loopback request went to the proxy"


def test_a_remote_destination_may_use_the_proxy_the_user_set(monkeypatch):
    """Where the user allowed a remote destination, their proxy is theirs to use."""
    with RecordingProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        backend = OpenAIBackend("m", base_url="http://api.example.invalid/v1")
        assert backend.is_remote
        with pytest.raises(Exception):
            asyncio.run(backend.complete([{"role": "user", "content": "x"}], max_tokens=1, temperature=0, seed=0))
    assert [(m, p) for m, p, _ in proxy.seen] == [("POST", "http://api.example.invalid/v1/chat/completions")]


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True), ("LOCALHOST", True),
    ("localhost.", False), ("LOCALHOST.", False), ("127.0.0.1.", False),
    ("foo.localhost", False), ("localhost.example.com", False), ("0.0.0.0", False), ("10.0.0.1", False), ("", False),
])
def test_only_literal_loopback_names_count_as_loopback(host, loopback):
    assert is_loopback_host(host) is loopback
