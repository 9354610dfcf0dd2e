"""OpenAI chat-completions requests in, kit conversations out; responses and errors in OpenAI's shapes.

Parsing never touches the model: every problem is an ApiError (HTTP status + OpenAI error body) so
the official client raises its matching exception class (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kit.core.http import HttpError
from kit.data.images import EncodedImage, ImageProblem, resolve_image


class ApiError(HttpError):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""


class ChatRequest(BaseModel):
    """The fields kit uses; others OpenAI defines are accepted and ignored unless they change the answer."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)  # what the samplers take; beyond it a 400, not a 500
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None


@dataclass
class Limits:
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 512
    max_images: int = 4
    image_root: Path | None = None  # local image files only from below here; None: no files at all


@dataclass
class PendingImage:
    """One image of a request: checked from its header, decoded later; `where` names its field."""

    encoded: EncodedImage
    where: str

    @property
    def canvas_pixels(self) -> int:
        return self.encoded.canvas_pixels


def decode_images(images: list[PendingImage]) -> list:
    """The PIL images of a request. Raises ApiError (400) naming the field of a damaged image."""
    out = []
    for im in images:
        try:
            out.append(im.encoded.decode())
        except ImageProblem as e:
            raise ApiError(400, f"{im.where}: {e}", "invalid_image", param=im.where) from None
    return out


@dataclass
class ParsedRequest:
    """A request turned into what kit.infer takes."""

    model: str
    messages: list[dict[str, Any]]  # roles system | user | assistant; image parts as {"type": "image"}
    # In the order of the image parts; header-checked, decoded by `decode_images` when the model
    # inputs are prepared (a waiting request holds no decoded pixels).
    images: list[PendingImage] = field(default_factory=list)
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _pydantic_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"'{where}': {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", "invalid_content", param=where)


def _image(url: str, where: str, limits: Limits) -> PendingImage:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ApiError(400, f"{where}: a data URL must look like data:image/png;base64,<base64 bytes>", "invalid_image_url", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL's payload is not valid base64", "invalid_base64", param=where) from None
        try:
            return PendingImage(EncodedImage(data, "the image"), where)
        except ImageProblem as e:
            raise ApiError(400, f"{where}: {e}", "invalid_image", param=where) from None
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        raise ApiError(400, f"{where}: kit serve works offline and does not fetch {scheme} URLs; "
                            "send the image inline as data:image/png;base64,...", "remote_image_url", param=where)
    if scheme == "file":
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    elif scheme and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise ApiError(400, f"{where}: unsupported image URL scheme '{scheme}'; use a data: URL", "invalid_image_url", param=where)
    else:
        path = url
    if limits.image_root is None:
        raise ApiError(400, f"{where}: local image paths are refused: the server was started without --image-root; "
                            "send the image as a data: URL", "image_path_refused", param=where)
    resolved = None
    try:
        resolved = resolve_image(limits.image_root, path)
        if not resolved.is_file():
            raise ImageProblem(f"image file {path!r} is missing")
        # Labelled with the client's own path: the server's folders are not the client's business.
        return PendingImage(EncodedImage(resolved, f"image file {path!r}"), where)
    except ImageProblem as e:
        reason = str(e)
        for local in filter(None, (str(resolved) if resolved else None, str(limits.image_root))):
            reason = reason.replace(local, repr(path) if local != str(limits.image_root) else "the image root")
        raise ApiError(400, f"{where}: {reason}", "invalid_image", param=where) from None


def _user_parts(content: Any, where: str, limits: Limits, images: list) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: content must be a string or a list of parts", "invalid_content", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{pw}: image_url needs a url", "invalid_image_url", param=pw)
            if len(images) >= limits.max_images:
                raise ApiError(400, f"too many images: at most {limits.max_images} per request", "too_many_images", param=pw)
            images.append(_image(url, f"{pw}.image_url", limits))
            parts.append({"type": "image"})
        else:
            raise ApiError(400, f"{pw}: unsupported content part type {kind!r}; use 'text' or 'image_url'", "invalid_content", param=pw)
    return parts


def parse_request(body: Any, limits: Limits) -> ParsedRequest:
    """Check a decoded JSON body and decode its images. Raises ApiError (400) naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object with 'model' and 'messages'", "invalid_body")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise ApiError(400, _pydantic_message(e), "invalid_request") from None
    if req.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported: ask once per answer", "unsupported", param="n")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported by kit serve", "unsupported", param="logprobs")
    if req.tools:
        raise ApiError(400, "tools / function calling are not supported by kit serve", "unsupported", param="tools")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", "invalid_request", param="max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limits.max_tokens} "
                            "(set with kit serve --max-tokens-limit)", "max_tokens_too_large", param="max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise ApiError(400, "at most 4 stop strings", "invalid_request", param="stop")

    systems: list[str] = []
    messages: list[dict[str, Any]] = []
    images: list = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role in ("system", "developer"):
            systems.append(_text(m.get("content"), f"{where}.content"))
        elif role == "user":
            messages.append({"role": "user", "content": _user_parts(m.get("content"), f"{where}.content", limits, images=images)})
        elif role == "assistant":
            messages.append({"role": "assistant", "content": _text(m.get("content") or "", f"{where}.content")})
        else:
            raise ApiError(400, f"{where}.role: {role!r} is not supported; use system, user or assistant", "invalid_role", param=f"{where}.role")
    if not messages or messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "invalid_request", param="messages")
    if systems:
        # Templates take one system message, first: several are joined in their order.
        messages.insert(0, {"role": "system", "content": "\n".join(systems)})
    opts = req.stream_options or {}
    return ParsedRequest(
        model=req.model, messages=messages, images=images, max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature, top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed, stop=stop, stream=bool(req.stream), include_usage=bool(opts.get("include_usage")),
    )


# --------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(cid: str, model: str, created: int, delta: dict[str, Any] | None, finish_reason: str | None = None,
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; with `usage_` and no delta, the final usage-only chunk (empty choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(name: str, kind: str, created: int) -> dict[str, Any]:
    """No folder paths: they say where the server keeps its files, and folder names can be private."""
    return {"id": name, "object": "model", "created": created, "owned_by": "kit", "kind": kind}
