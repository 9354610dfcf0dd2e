"""`kit serve`: an OpenAI-compatible chat server for a base and its adapters, offline.

    POST /v1/chat/completions   OpenAI schema; text and images (data: URLs; files under --image-root)
    GET  /v1/models             the base and every adapter, by the names requests use
    GET  /                      the web page (kit/assets/web/index.html) when installed
    GET  /health                liveness (behind the key when one is set)

Requests must name this server in `Host` (loopback names and the address it listens on): a web
page the user visits cannot reach it by DNS rebinding. POST bodies must be JSON (415 otherwise): a
cross-site form or `text/plain` request, which browsers send without asking, is refused.

`create_app(pool, ...)` builds the FastAPI app from a loaded kit.serve.pool.ModelPool (tests and
pages build on it); kit.serve.run loads the models and listens. Generation runs in the pool's
batcher thread (requests join the running batch between decode steps, kit.serve.batching), so the
event loop keeps answering while long answers are generated.

(No `from __future__ import annotations` here: FastAPI reads the route functions' annotations.)
"""

import contextlib
import functools
import hmac
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from kit.core import options
from kit.core.errors import KitError
from kit.core.files import ASSETS
from kit.core.http import LOOPBACK_NAMES, HostCheck, HttpError, parse_json, read_body
from kit.infer.generation import Sampling
from kit.data.images import MAX_SIDE
from kit.serve.openai_schema import (ApiError, Limits, chunk, completion, completion_id, decode_images, model_card, parse_request,
                                     usage)

# Decoded pixels in flight across requests: two of the largest canvases kit takes (8192 px
# squares, ~200 MiB each as RGB). Queued requests hold only their encoded bytes.
DEFAULT_MAX_DECODED_PIXELS = 2 * MAX_SIDE**2
# A request whose body has not arrived by then is answered 408 and leaves the queue.
DEFAULT_BODY_TIMEOUT_S = 30.0
GENERATION_FAILED = "generation failed on the server (its log says why); retry, or report it to whoever runs the server"


class Admission:
    """At most `limit` generations admitted at once (the one running + those waiting for the model).

    Past it a request gets 429 with Retry-After instead of queueing without bound: the OpenAI
    clients back off and retry on 429, while an unbounded queue only turns overload into timeouts.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def enter(self, error) -> None:
        with self._lock:
            if self.count >= self.limit:
                raise error(429, f"the server is busy: {self.count} requests are running or waiting (limit {self.limit}, "
                                 "kit serve --max-queue); retry shortly", "server_busy")
            self.count += 1

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


class PixelBudget:
    """Bounds the decoded image pixels held at once: a request decodes its images (and prepares
    model inputs from them) only once its pixels fit beside those already decoded; a request larger
    than the whole budget runs when it has the budget to itself. Counts canvases, as `pad` makes
    them square. `peak` is the most ever held (tests read it)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def held(self, pixels: int):
        with self._cond:
            while self.used and self.used + pixels > self.limit:
                self._cond.wait()
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


WEB_DIR = ASSETS / "web"


@dataclass(frozen=True)
class ServeSettings:
    """What a kit serve app enforces (see create_app for each)."""

    api_key: str | None = None
    image_root: Path | None = None
    max_request_bytes: int = options.MAX_REQUEST_BYTES
    max_tokens_limit: int = options.MAX_TOKENS_LIMIT
    max_images: int = 4
    max_queue: int = options.MAX_QUEUE
    web_dir: Path | None = WEB_DIR
    hosts: tuple[str, ...] = ()
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise KitError(f"--max-request-bytes {self.max_request_bytes}: give at least 1024")
        if self.max_tokens_limit < 1:
            raise KitError(f"--max-tokens-limit {self.max_tokens_limit}: give at least 1")
        if self.max_queue < 1:
            raise KitError(f"--max-queue {self.max_queue}: give at least 1")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise KitError(f"--image-root {self.image_root} is not a folder")

    def limits(self) -> Limits:
        return Limits(max_tokens=self.max_tokens_limit, default_max_tokens=min(512, self.max_tokens_limit),
                      max_images=self.max_images, image_root=Path(self.image_root).resolve() if self.image_root else None)


def create_app(pool, *, settings: ServeSettings | None = None, log=None, **fields):
    """The FastAPI app serving `pool` (kit.serve.pool.ModelPool) as `settings` say (or ServeSettings
    made from `fields`):

    api_key: when set, every /v1 route and /health need `Authorization: Bearer <api_key>` (401 otherwise).
    hosts: names besides loopback that requests may carry in `Host` (the address served on).
    log: where server-side failures are written (default stderr); responses never carry them.
    image_root: local image paths / file:// URLs are read only from below it (None: refused).
    max_request_bytes: larger bodies get 413. max_tokens_limit: larger max_tokens get 400.
    max_queue: more generations than this running or waiting get 429 (see Admission).
    max_decoded_pixels: decoded image pixels held at once across requests (see PixelBudget).
    body_timeout_s: an admitted request whose body has not fully arrived by then gets 408 and
        frees its place (a client that sends headers and then nothing cannot hold the queue).
    web_dir: `/` serves web_dir/index.html and `/web/*` the folder's files, when they exist.
    Errors have OpenAI's body shape {"error": {"message", "type", "param", "code"}}.
    """
    if settings is not None and fields:
        raise TypeError(f"create_app: give settings or its fields, not both ({', '.join(fields)})")
    config = settings or ServeSettings(**fields)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    app = FastAPI(title="kit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostCheck, allowed={*LOOPBACK_NAMES, *(h.lower() for h in config.hosts)})
    add_error_handlers(app, log)
    completions = Completions(pool, config, log)
    app.state.pool = pool
    app.state.admission = completions.admission
    app.state.pixels = completions.pixels
    auth = Depends(bearer_auth(config.api_key))
    app.include_router(v1_routes(completions, auth))
    add_page_routes(app, pool, config.web_dir, auth=auth)
    return app


def add_error_handlers(app: FastAPI, log) -> None:
    """Every error as OpenAI's body; a server-side failure's reason only in the log."""

    @app.exception_handler(HttpError)
    async def api_error(request: Request, e: HttpError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return await api_error(request, ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        # The reason stays in the server's log: exception text can hold paths and patient data.
        log(f"kit serve: {request.url.path} failed: {type(e).__name__}: {e}")
        return JSONResponse(ApiError(500, GENERATION_FAILED if request.url.path.endswith("/completions") else
                                     "the server failed on this request (its log says why)", "server_error").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return await api_error(request, ApiError(400, f"invalid request: {e.errors()}", "invalid_request"))


def bearer_auth(api_key: str | None):
    """The dependency every /v1 route and /health carry: 401 without the key (when one is set)."""

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server was started with",
                           "invalid_api_key")

    return authorised


class Completions:
    """POST /v1/chat/completions on `pool`: admission before the body is read, the body within its
    time, images decoded inside the pixel budget, then an answer (whole or streamed)."""

    def __init__(self, pool, config: ServeSettings, log):
        self.pool, self.config, self.log = pool, config, log
        self.limits = config.limits()
        self.admission = Admission(config.max_queue)
        self.pixels = PixelBudget(config.max_decoded_pixels)
        self.created = int(time.time())
        # Every admitted request holds at most one worker thread at a time (parsing, then the
        # answer): a pool this size never makes an admitted request wait for a thread, so overload
        # is a 429.
        self.threads = anyio.CapacityLimiter(config.max_queue + 4)

    async def in_thread(self, fn, *args):
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.threads)

    def served(self, name: Any):
        if not isinstance(name, str) or name not in self.pool.served:
            raise ApiError(404, f"model {name!r} is not served here; available: {', '.join(self.pool.names)}", "model_not_found", param="model")
        return self.pool.get(name)

    async def answer(self, request: Request):
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, f"send the request as JSON (Content-Type: application/json), not {media or 'no content type'}",
                           "unsupported_media_type")
        # Admitted before the body is read, images decoded or text tokenized: overload costs nothing.
        self.admission.enter(ApiError)
        streaming = False
        try:
            gen, conv = await self.started(request)
            cid = completion_id()
            if conv.stream:
                streaming = True
                events = _events(gen, cid, conv.model, include_usage=conv.include_usage, done=self.admission.leave, log=self.log, in_thread=self.in_thread)
                return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                text = await self.in_thread(gen.result)
            except Exception as e:  # noqa: BLE001 - a failed generation is the server's fault: 500, not a dropped connection
                self.log(f"kit serve: generation failed: {type(e).__name__}: {e}")
                raise ApiError(500, GENERATION_FAILED, "generation_failed") from None
            finally:
                gen.cancel()
            return JSONResponse(completion(cid, conv.model, text, finish_reason=gen.finish_reason, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens))
        finally:
            if not streaming:
                self.admission.leave()

    async def started(self, request: Request):
        timeout = self.config.body_timeout_s
        try:
            with anyio.fail_after(timeout):
                raw = await read_body(request, self.config.max_request_bytes, " (set with kit serve --max-request-bytes)")
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s; send it whole, at once",
                           "request_timeout") from None
        body = parse_json(raw)
        if isinstance(body, dict) and "model" in body:
            self.served(body["model"])  # an unknown model is reported before any image is decoded
        conv = await self.in_thread(parse_request, body, self.limits)
        inputs = await self.in_thread(self.prepared, conv)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        context = self.pool.max_positions()
        if context and prompt_tokens >= context:
            raise ApiError(400, f"the conversation is {prompt_tokens} tokens; this model reads at most {context}",
                           "context_length_exceeded", param="messages")
        max_new = min(conv.max_tokens, context - prompt_tokens) if context else conv.max_tokens
        return self.pool.start(conv.model, inputs, Sampling(max_new, conv.temperature, conv.top_p, seed=conv.seed, stop=conv.stop)), conv

    def prepared(self, conv):
        """Model inputs, with the request's images decoded only inside the pixel budget and
        dropped once the processor has turned them into (much smaller) tensors."""
        with self.pixels.held(sum(im.canvas_pixels for im in conv.images)):
            images = decode_images(conv.images)
            conv.images = []
            try:
                return self.pool.prepare(conv.model, conv.messages, images)
            except KitError as e:
                raise ApiError(400, str(e), "invalid_request") from None
            finally:
                images.clear()


def v1_routes(completions: Completions, auth) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[auth])
    pool, created = completions.pool, completions.created

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(s.name, s.kind, created) for s in pool.served.values()]}

    @v1.get("/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        s = completions.served(name)
        return model_card(s.name, s.kind, created)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await completions.answer(request)

    return v1


def add_page_routes(app: FastAPI, pool, web_dir: Path | None, auth) -> None:
    """/health (behind the key), and the web page: served from the package's assets when installed."""

    @app.get("/health", include_in_schema=False, dependencies=[auth])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": pool.names}

    @app.get("/", include_in_schema=False)
    async def index():
        page = Path(web_dir) / "index.html" if web_dir else None
        if page is not None and page.is_file():
            return FileResponse(page, media_type="text/html")
        return PlainTextResponse("kit serve: OpenAI-compatible API at /v1 (GET /v1/models, POST /v1/chat/completions); "
                                 "no web page is installed (kit/assets/web/index.html).\n")

    if web_dir and Path(web_dir).is_dir():
        app.mount("/web", StaticFiles(directory=str(web_dir)), name="web")


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(gen, cid: str, model: str, include_usage: bool, done, log, in_thread) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: role chunk, content chunks, finish chunk, [usage], [DONE]."""
    created = int(time.time())
    pieces = iter(gen)
    try:
        yield _event(chunk(cid, model, created, delta={"role": "assistant", "content": ""}))
        while (piece := await in_thread(next, pieces, None)) is not None:
            yield _event(chunk(cid, model, created, delta={"content": piece}))
        yield _event(chunk(cid, model, created, delta={}, finish_reason=gen.finish_reason))
        if include_usage:
            yield _event(chunk(cid, model, created, delta=None, usage_=usage(gen.prompt_tokens, gen.completion_tokens)))
    except Exception as e:  # noqa: BLE001 - headers are sent: the error travels as an event the client raises
        log(f"kit serve: generation failed: {type(e).__name__}: {e}")
        yield _event({"error": {"message": GENERATION_FAILED, "type": "server_error", "param": None, "code": "generation_failed"}})
    finally:
        gen.cancel()  # also when the client went away: stop generating for nobody
        done()
    yield "data: [DONE]\n\n"
