"""Running `kit serve`: bind before loading (a taken port fails in a second), load the pool, listen."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from kit.core import options
from kit.core.errors import KitError
from kit.core.http import bind, require_key_off_loopback, resolve_key
from kit.core.network import go_offline
from kit.serve.app import create_app
from kit.serve.pool import load_pool


def serve(model: Path, adapters: list[str] = (), host: str = options.SERVE_HOST, port: int = options.SERVE_PORT, api_key: str | None = None,
          image_root: Path | None = None, max_request_bytes: int = options.MAX_REQUEST_BYTES,
          max_tokens_limit: int = options.MAX_TOKENS_LIMIT, max_queue: int = options.MAX_QUEUE, dtype: str = "auto",
          echo=print, api_key_file: Path | None = None, max_batch: int = options.MAX_BATCH) -> None:
    """Load MODEL_OR_ADAPTER (+ adapters) and serve until interrupted. KitError for bad options or
    folders, and for an address other machines can reach without a key."""
    go_offline()
    api_key = resolve_key(api_key, api_key_file)
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
    local = require_key_off_loopback(host, api_key)
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
