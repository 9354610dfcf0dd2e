"""Running `kit serve`: bind before loading (a taken port fails in a second), load the pool, listen;
and `running(app)`, which serves an app from a background thread (tests, the web-page test)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from kit.core.errors import KitError
from kit.core.network import go_offline, resolves_only_to_loopback
from kit.serve.app import DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS_LIMIT, create_app
from kit.serve.pool import load_pool


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (uvicorn listens on it). KitError if the address cannot be used."""
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


def serve(model: Path, adapters: list[str] = (), host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          image_root: Path | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_queue: int = DEFAULT_MAX_QUEUE, dtype: str = "auto",
          echo=print, api_key_file: Path | None = None, max_batch: int = 8) -> None:
    """Load MODEL_OR_ADAPTER (+ adapters) and serve until interrupted. KitError for bad options or
    folders, and for an address other machines can reach without a key."""
    go_offline()
    if api_key is not None and api_key_file is not None:
        raise KitError("give the key once: --api-key (or KIT_API_KEY) or --api-key-file, not both")
    if api_key_file is not None:
        api_key = read_key_file(api_key_file)
    if max_request_bytes < 1024:
        raise KitError(f"--max-request-bytes {max_request_bytes}: give at least 1024")
    if max_tokens_limit < 1:
        raise KitError(f"--max-tokens-limit {max_tokens_limit}: give at least 1")
    if max_queue < 1:
        raise KitError(f"--max-queue {max_queue}: give at least 1")
    if max_batch < 1:
        raise KitError(f"--max-batch {max_batch}: give at least 1 (1 generates one request at a time)")
    if image_root is not None and not Path(image_root).is_dir():
        raise KitError(f"--image-root {image_root} is not a folder")
    if api_key is not None and not api_key.strip():
        raise KitError("--api-key is empty; give a key or leave the option out")
    local = resolves_only_to_loopback(host)
    if not local and api_key is None:
        raise KitError(f"--host {host} is reachable from other machines: set a key with KIT_API_KEY or --api-key-file "
                       "(clients send 'Authorization: Bearer KEY'), or serve on 127.0.0.1")
    sock = bind(host, port)  # before loading: a taken port fails in a second, not after the weights load
    pool = None
    try:
        if not local:
            echo(f"warning: listening on {host}, reachable from other machines: with the key they can use the models"
                 + (f" and read images below {image_root}" if image_root else ""))
        pool = load_pool(Path(model), list(adapters), dtype=dtype, echo=echo, max_batch=max_batch)
        # A wildcard address answers to whatever name clients reach it by (the key guards it).
        hosts = ("*",) if host in ("0.0.0.0", "::", "") else (host,)
        app = create_app(pool, api_key=api_key, image_root=image_root, max_request_bytes=max_request_bytes,
                         max_tokens_limit=max_tokens_limit, max_queue=max_queue, hosts=hosts)
        bound = sock.getsockname()
        echo(f"serving {', '.join(pool.names)} at http://{host}:{bound[1]}/v1 (OpenAI-compatible; Ctrl-C stops)")
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
        if pool is not None:
            pool.close()
