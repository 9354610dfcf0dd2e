"""`kit review`'s web app: one page (kit/assets/review/) and a small JSON API over a ReviewFolder.

    GET  /                          the page, carrying this server's session token
    GET  /review.js, /review.css    its script and styles (nothing is loaded from elsewhere)
    GET  /api/items                 every conversation, briefly (origin, bad claims, decision)
    GET  /api/items/{n}             one conversation: turns, claims, source facts, decision
    GET  /api/items/{n}/image       its image, only ever one a conversation of the folder names
    POST /api/items/{n}/check       claims of edited turns (nothing is saved)
    POST /api/decisions             accept | reject | edit; answered once it is on disk

Every /api request carries the page's token in `X-Kit-Token` (403 otherwise): a page on another
site cannot read it, so it cannot decide for the reviewer, and cannot show the folder's images
either. POSTs must be JSON (415 otherwise: a cross-site form cannot send it without asking). Host
names are checked (DNS rebinding), and with a key every /api request needs `Authorization:
Bearer KEY` too. The Content-Security-Policy lets the page load and contact nothing but this server.

(No `from __future__ import annotations` here: FastAPI reads the route functions' annotations.)
"""

import hmac
import io
import secrets
import sys
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kit.core.errors import KitError
from kit.core.files import ASSETS
from kit.core.http import HostCheck, HttpError, parse_json, read_body
from kit.data.images import ImageProblem, open_rgb
from kit.data.reviewed import now
from kit.review.folder import ReviewFolder

PAGE_DIR = ASSETS / "review"
MAX_BODY = 4 * 2**20  # an edited conversation is a few kilobytes
# Formats every browser shows as they are; anything else (TIFF, DICOM-derived 16-bit PNGs are
# fine) is converted to PNG first.
BROWSER_FORMATS = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(review: ReviewFolder, *, hosts: set[str], api_key: str | None = None, token: str | None = None, log=None):
    """The app for `review`. hosts: the Host names it answers to (kit.core.http.allowed_hosts).
    token: the session token (default: a fresh random one). log: where server failures go (stderr)."""
    token = token or secrets.token_urlsafe(24)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    app = FastAPI(title="kit review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostCheck, allowed=hosts)
    app.state.token = token
    add_security(app, log)
    add_page_routes(app, token, keyed=api_key is not None)
    app.include_router(api_routes(review, Depends(session_guard(api_key, token))))
    return app


def add_security(app: FastAPI, log) -> None:
    """The page's security headers on every response; every error as a JSON body, a server-side
    failure's reason only in the log."""

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(HttpError)
    async def http_error(request: Request, e: HttpError):
        return JSONResponse(e.body(), status_code=e.status, headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, e: StarletteHTTPException):
        return await http_error(request, HttpError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None))

    @app.exception_handler(KitError)
    async def kit_error(request: Request, e: KitError):
        return await http_error(request, HttpError(400, str(e), "invalid_request"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log(f"kit review: {request.url.path} failed: {type(e).__name__}: {e}")
        return JSONResponse(HttpError(500, "the server failed on this request (its log says why)", "server_error").body(),
                            status_code=500)


def session_guard(api_key: str | None, token: str):
    """The dependency of every /api route: the key (when one is set), then the page's session token."""

    def allowed(request: Request) -> None:
        if api_key is not None:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
                raise HttpError(401, "missing or wrong key: send 'Authorization: Bearer <key>' with the key kit review "
                                     "was started with", "invalid_api_key")
        if not hmac.compare_digest(request.headers.get("x-kit-token", "").encode(), token.encode()):
            raise HttpError(403, "missing or wrong X-Kit-Token: requests come from the review page this server shows",
                            "invalid_token")

    return allowed


def add_page_routes(app: FastAPI, token: str, keyed: bool) -> None:
    """The page (carrying this session's token) and its script and styles: files of the package."""

    @app.get("/", include_in_schema=False)
    async def page():
        html = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{TOKEN}}", token).replace("{{KEYED}}", "1" if keyed else "0"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/review.js", include_in_schema=False)
    async def script():
        return FileResponse(PAGE_DIR / "review.js", media_type="text/javascript")

    @app.get("/review.css", include_in_schema=False)
    async def styles():
        return FileResponse(PAGE_DIR / "review.css", media_type="text/css")


async def json_body(request: Request) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise HttpError(415, f"send JSON (Content-Type: application/json), not {media or 'no content type'}",
                        "unsupported_media_type")
    return parse_json(await read_body(request, MAX_BODY))


def api_routes(review: ReviewFolder, guard) -> APIRouter:
    """/api: the conversations, their details and images, a re-check of an edit, decisions."""
    api = APIRouter(prefix="/api", dependencies=[guard])

    def item(n: int):
        try:
            return review.item(n)
        except KitError as e:
            raise HttpError(404, str(e), "not_found") from None

    @api.get("/items")
    async def items() -> dict[str, Any]:
        return review.summary()

    @api.get("/items/{n}")
    async def one(n: int) -> dict[str, Any]:
        return review.detail(item(n))

    @api.get("/items/{n}/image")
    def image(n: int):
        it = item(n)
        if it.image is None:
            raise HttpError(404, it.image_problem or f"conversation '{it.id}' has no image", "no_image")
        media = BROWSER_FORMATS.get(it.image.suffix.lower())
        if media:
            return FileResponse(it.image, media_type=media)
        try:
            im = open_rgb(it.image)
        except ImageProblem as e:
            raise HttpError(404, str(e), "bad_image") from None
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @api.post("/items/{n}/check")
    async def check(n: int, request: Request) -> dict[str, Any]:
        it = item(n)
        body = await json_body(request)
        turns = review.edited_turns(it, body.get("conversations") if isinstance(body, dict) else None)
        return {"claims": [c.to_json() for c in review.claims(it, turns)]}

    @api.post("/decisions")
    async def decide(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        d = review.decide(body, now())
        return {"saved": d.to_json(), "item": review.detail(review.by_id[d.id])}

    return api
