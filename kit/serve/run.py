"""Running `kit serve`: bind before loading (a taken port fails in a second), load the pool, listen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import uvicorn

from kit.core import options
from kit.core.errors import KitError
from kit.core.http import bind, require_key_off_loopback, resolve_key
from kit.core.network import go_offline
from kit.serve.app import ServeSettings, create_app
from kit.serve.pool import load_pool


def serve(model: Path, adapters: list[str] = (), *, host: str = options.SERVE_HOST, port: int = options.SERVE_PORT,
          api_key: str | None = None, api_key_file: Path | None = None, dtype: str = "auto", max_batch: int = options.MAX_BATCH,
          echo=print, **limits: Any) -> None:
    """Load MODEL_OR_ADAPTER (+ adapters) and serve until interrupted; `limits` are ServeSettings'
    (image_root, max_request_bytes, max_tokens_limit, max_queue). KitError for bad options or
    folders, and for an address other machines can reach without a key."""
    go_offline()
    api_key = resolve_key(api_key, api_key_file)
    # A wildcard address answers to whatever name clients reach it by (the key guards it).
    settings = ServeSettings(api_key=api_key, hosts=("*",) if host in ("0.0.0.0", "::", "") else (host,), **limits)
    if max_batch < 1:
        raise KitError(f"--max-batch {max_batch}: give at least 1 (1 generates one request at a time)")
    image_root = settings.image_root
    local = require_key_off_loopback(host, api_key)
    sock = bind(host, port)  # before loading: a taken port fails in a second, not after the weights load
    pool = None
    try:
        if not local:
            echo(f"warning: listening on {host}, reachable from other machines: with the key they can use the models"
                 + (f" and read images below {image_root}" if image_root else ""))
        pool = load_pool(Path(model), list(adapters), dtype=dtype, echo=echo, max_batch=max_batch)
        app = create_app(pool, settings=settings)
        bound = sock.getsockname()
        echo(f"serving {', '.join(pool.names)} at http://{host}:{bound[1]}/v1 (OpenAI-compatible; Ctrl-C stops)")
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
        if pool is not None:
            pool.close()
