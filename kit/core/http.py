"""What kit's local web servers (`kit serve`, `kit review`) share: a Host allowlist against DNS
rebinding, binding before loading, serving from a thread (tests), API keys read from a file, and
the rule that an address other machines can reach needs a key."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kit.core.errors import KitError
from kit.core.network import resolves_only_to_loopback

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
SERVER_ERRORS = (500, 503)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape, which both servers answer with: {"error": {message, type, param, code}}."""
    kind = "server_error" if status in SERVER_ERRORS else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class HttpError(Exception):
    """An HTTP error answered with `error_body`'s shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, param=self.param)


def parse_json(raw: bytes) -> Any:
    """The decoded body. Raises HttpError (400) for what is not JSON or what Python's reader will not
    take: nesting deeper than its recursion limit, integers past its digit limit, NaN / Infinity."""

    class NotANumber(ValueError):
        pass

    def constant(name: str):
        raise NotANumber(f"{name} is not a JSON number")

    try:
        return json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise HttpError(400, "the request body is nested too deeply to read", "invalid_json") from None
    except json.JSONDecodeError as e:
        raise HttpError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    except UnicodeDecodeError:
        raise HttpError(400, "the request body is not valid JSON (it is not UTF-8 text)", "invalid_json") from None
    except NotANumber as e:
        raise HttpError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    except ValueError:  # the only other: an integer of more digits than int() converts
        raise HttpError(400, "the request body is not valid JSON (a number in it has too many digits)", "invalid_json") from None


async def read_body(request, limit: int, hint: str = "") -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (`hint`: how to raise it)."""
    too_big = HttpError(413, f"the request body is larger than this server's limit of {limit:,} bytes{hint}", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


def host_name(header: str) -> str:
    """The name in a Host header, without its port ('[::1]:8000' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: requests whose Host is not one this server answers to get 421 (a page on
    another site that points its own name at 127.0.0.1 still sends that name). `*` allows any."""

    def __init__(self, app, allowed: set[str]):
        self.app = app
        self.allowed = {host_name(h) for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            host = host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                body = json.dumps(error_body(421, f"this server does not answer to the host name {host!r}; "
                                                  "use the address it listens on", "invalid_host")).encode()
                await send({"type": "http.response.start", "status": 421,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def allowed_hosts(host: str) -> set[str]:
    """The Host names a server listening on `host` answers to: loopback names and that address; a
    wildcard address answers to whatever name clients reach it by (its key guards it)."""
    if host in ("0.0.0.0", "::", ""):
        return {"*"}
    return {*LOOPBACK_NAMES, host.lower()}


def bind(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (uvicorn serves on it). KitError if the address cannot be used."""
    if not 0 <= port <= 65535:
        raise KitError(f"--port {port}: give a port between 1 and 65535 (0 picks a free one)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise KitError(f"--host {host}: cannot be resolved ({e.strerror}); use an IP address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        # Listening now means a client that connects as soon as "serving ... at" is printed waits
        # in the backlog until uvicorn accepts, instead of being refused.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise KitError(f"cannot listen on {host}:{port} ({e.strerror}); is another server using it? choose another --port") from None
    return sock


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL (http://host:port). Port 0 picks a free port."""
    import uvicorn  # only servers need it; kit.core is imported by every command

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="kit-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise KitError(f"the server on {host}:{port} did not start within {timeout:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def read_key_file(path: Path) -> str:
    """The API key in a file (its first line): unlike --api-key, it does not show in `ps`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KitError(f"--api-key-file {path}: cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise KitError(f"--api-key-file {path}: the first line is empty; write the key there")
    return key


def resolve_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api-key (or its environment variable) or --api-key-file. KitError for both or an empty one."""
    if api_key is not None and api_key_file is not None:
        raise KitError("give the key once: --api-key (or KIT_API_KEY) or --api-key-file, not both")
    if api_key_file is not None:
        api_key = read_key_file(api_key_file)
    if api_key is not None and not api_key.strip():
        raise KitError("--api-key is empty; give a key or leave the option out")
    return api_key


def require_key_off_loopback(host: str, api_key: str | None) -> bool:
    """Whether `host` is loopback only. KitError when it is not and there is no key: other machines
    could use the server without one."""
    local = resolves_only_to_loopback(host)
    if not local and api_key is None:
        raise KitError(f"--host {host} is reachable from other machines: set a key with KIT_API_KEY or --api-key-file "
                       "(clients send 'Authorization: Bearer KEY'), or serve on 127.0.0.1")
    return local
