"""The HTTP edge: the in-memory upload type and the request guard in front of BentoML's routes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import PurePosixPath

from serving.openapi import amend_spec


class Upload(PurePosixPath):
    """An uploaded file held in memory: the client's file name, and its bytes in ``data``.

    BentoML writes every ``Path`` input to a temporary file (``FileSchema.decode`` in
    ``_bentoml_sdk/validators.py``) that the handler then reads back: temp-file and
    path handling were ~11% of a worker's Python time per request here. A ``PurePath``
    subclass is still a file field to BentoML (multipart part, Swagger file picker); its
    own pydantic schema below keeps the bytes instead of writing them out.
    """

    data: bytes = b""

    @classmethod
    def from_form(cls, value: object) -> Upload:
        """The form's ``UploadFile`` (or raw bytes) as an in-memory upload."""
        from starlette.datastructures import UploadFile

        if isinstance(value, UploadFile):
            upload = cls(os.path.basename(value.filename or "") or "upload")
            upload.data = value.file.read()
        elif isinstance(value, bytes | bytearray):
            upload = cls("upload")
            upload.data = bytes(value)
        else:
            # No advice here: the guard adds the route's own (_how) when it answers the validation error.
            raise ValueError("expected an uploaded file (a multipart part with a filename), not text")
        return upload

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(cls.from_form)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler) -> dict:
        # As BentoML's FileSchema for a Path: "file" marks a file part for BentoML's
        # routing and client; OpenAPI (serialization mode) gets a binary string, never
        # empty (an empty file is refused).
        if handler.mode == "validation":
            return {"type": "file", "format": "binary"}
        return {"type": "string", "format": "binary", "minLength": 1}


async def _send_json(send, status: int, body: dict, more_body: bool = False) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload, "more_body": more_body})


async def _refuse_unread(receive, send, status: int, body: dict, linger_s: float) -> None:
    """Answer ``status`` before the request body was read, then drop what the client still sends.

    Closing a socket with unread bytes in it makes the kernel send a reset, and a client
    that gives up at its first failed write (asyncio streams: ``ConnectionResetError``)
    loses the answer it already received (tests/service/test_service.py reproduces it). Like
    nginx's lingering close, the answer goes out first, then the rest of the body is read
    and dropped until it ends or for at most ``linger_s``; only then does the connection close.
    """
    await _send_json(send, status, body, more_body=True)
    deadline = time.monotonic() + linger_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            message = await asyncio.wait_for(receive(), left)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
    except asyncio.TimeoutError:
        pass  # a client still sending after linger_s gets the reset; it had the answer that long
    await send({"type": "http.response.body", "body": b""})


class RequestGuard:
    """ASGI middleware: 413 for bodies over ``max_body_bytes``, 400 for unknown form fields, one error shape.

    - ``fields`` maps each API route to its multipart file fields. ``/predict/`` is
      ``/predict`` here, before anything else: Starlette would answer it with a bodyless
      307, which curl (without ``-L``) prints as nothing.
    - A declared ``Content-Length`` over the limit is refused before any byte of the
      body is read; a chunked body is read only up to the limit. After such a 413 the
      connection lingers (see :func:`_refuse_unread`) so that the client reads the answer.
    - An API route's form body is parsed here first (Starlette's parser, as BentoML's) and
      refused with 400 when BentoML 1.4.40 would answer 500 or do something unsafe: an
      unknown field holding binary data (``json.loads`` raises ``UnicodeDecodeError`` in
      ``_bentoml_impl/serde.py``), a malformed multipart body or one without boundary
      (Starlette's ``HTTPException(400)`` becomes 500), and a file field holding text
      instead of a file, or any url-encoded form: ``MultipartSerde.ensure_file``
      *downloads* such a value as a URL (500 for non-URLs; a fetch of any public URL the
      client names otherwise).
    - Every error is one object ``{"error": "..."}`` (:data:`ERROR_SCHEMA`): BentoML answers a
      raised ``BadInput`` with a JSON *list* of that object, and a request its input model
      rejects with ``{"error": "1 validation error for Input", "detail": [...]}``
      (``_bentoml_impl/server/app.py``); both are rewritten to the one shape.
    - ``GET /docs.json`` says so: BentoML 1.4.40 documents every error as
      ``{"error": str, "detail": str}`` and has no way to set an operation's responses, so
      its spec is amended on the way out (:func:`amend_spec`). ``description``, if
      given, replaces the page text, which for a service served from source is BentoML's
      own README (``description=`` of ``@bentoml.service`` reaches only a built Bento's).
    """

    def __init__(self, app, max_body_bytes: int, fields: dict[str, set[str]] | None = None,
                 linger_s: float = 2.0, description: str | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.fields = fields or {}
        self.linger_s = linger_s  # most seconds spent dropping the rest of a refused body
        self.description = description

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.endswith("/") and path[:-1] in self.fields:
            raw = scope.get("raw_path")
            scope = {**scope, "path": path[:-1], "raw_path": raw[:-1] if raw and raw.endswith(b"/") else raw}
        elif path == "/docs.json" and scope["method"] == "GET":
            return await self.app(scope, receive, _amend_spec(send, self.fields, self.description))
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _send_json(send, 400, {"error": "invalid Content-Length header"})
        if length is not None and int(length) > self.max_body_bytes:
            if headers.get(b"expect", b"").lower() == b"100-continue":  # the client waits: nothing is in flight
                return await _send_json(send, 413, self._too_big())
            return await _refuse_unread(receive, send, 413, self._too_big(), self.linger_s)
        # The API routes take POST only: another method gets the router's 405, whatever its body.
        allowed = self.fields.get(scope["path"]) if scope["method"] == "POST" else None
        if allowed is not None or (length is None and b"chunked" in headers.get(b"transfer-encoding", b"")):
            messages, size = [], 0
            while True:  # buffer the body (at most the limit) to check it, then replay it to the app
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    return await _refuse_unread(receive, send, 413, self._too_big(), self.linger_s)
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            if allowed is not None and (error := await _form_error(headers, messages, scope["path"], allowed)):
                return await _send_json(send, 400, {"error": error})
            replay = iter(messages)
            original_receive = receive

            async def receive():  # noqa: F811 - hand the buffered body to the app, then go live
                return next(replay, None) or await original_receive()

        await self.app(scope, receive, _one_error_shape(send, scope["path"], self.fields.get(scope["path"])))

    def _too_big(self) -> dict:
        return {"error": f"request body is over the {self.max_body_bytes:,}-byte limit; "
                         "send fewer or smaller images"}


async def _form_error(headers: dict, messages: list[dict], path: str, allowed: set[str]) -> str | None:
    """Why a form body for ``path`` (file fields ``allowed``) must be refused, or None if it may go on."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    content_type = headers.get(b"content-type", b"").lower()
    how = _how(allowed)
    if content_type.startswith(b"application/x-www-form-urlencoded"):
        return f"url-encoded forms are not accepted: {how}"
    if not content_type.startswith(b"multipart/"):
        return None  # BentoML answers other bodies (JSON, text) with 400 itself

    async def body():
        for message in messages:
            yield message.get("body", b"")

    try:
        form = await MultiPartParser(Headers(raw=list(headers.items())), body()).parse()
    except MultiPartException as exc:
        return f"malformed multipart body ({exc.message}): {how}"
    try:
        if unknown := sorted(set(form) - allowed):
            return f"unexpected form field(s) {unknown}; {path} takes {' and '.join(sorted(allowed)) or 'none'}"
        if text := sorted({name for name, value in form.multi_items() if not isinstance(value, UploadFile)}):
            return f"form field(s) {text} hold text, not a file (no filename): {how}"
        return None
    finally:
        await form.close()


def _how(allowed: set[str] | None) -> str:
    """What a client should send to a route with file fields ``allowed``."""
    if not allowed:
        return "it takes no input: send an empty body or the JSON object {}"
    return f"send images as multipart file parts (curl -F {min(allowed)}=@image.png)"


def _one_error(body: object, path: str, allowed: set[str] | None) -> object:
    """BentoML's error bodies as one ``{"error": ...}`` object; anything else unchanged."""
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
        return body[0]
    if isinstance(body, dict) and isinstance(body.get("detail"), list):  # a pydantic ValidationError
        problems = "; ".join(f"{'.'.join(map(str, item.get('loc') or ())) or 'body'}: {item.get('msg')}"
                             for item in body["detail"] if isinstance(item, dict))
        return {"error": f"invalid request to {path}: {problems or body.get('error')}; {_how(allowed)}"}
    return body


def _rewrite_body(send, statuses: Callable[[int], bool], rewrite: Callable[[bytes], bytes]):
    """Wrap ``send``: the body of a response whose status passes ``statuses`` goes out as ``rewrite(body)``."""
    held: dict = {}
    chunks: list[bytes] = []

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start" and statuses(message["status"]):
            held["start"] = message
            return
        if "start" not in held or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body, start = rewrite(b"".join(chunks)), held.pop("start")
        start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"] + [
            (b"content-length", str(len(body)).encode())]
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _one_error_shape(send, path: str, allowed: set[str] | None):
    """Wrap ``send`` so that a 4xx JSON body goes out in the one documented error shape."""

    def rewrite(body: bytes) -> bytes:
        try:
            return json.dumps(_one_error(json.loads(body), path, allowed)).encode()
        except ValueError:  # not JSON (Starlette's plain-text answers): as it is
            return body

    return _rewrite_body(send, lambda status: 400 <= status < 500, rewrite)


def _amend_spec(send, fields: dict[str, set[str]], description: str | None):
    """Wrap ``send`` so that BentoML's OpenAPI document goes out through :func:`amend_spec`."""
    return _rewrite_body(send, lambda status: status == 200,
                         lambda body: json.dumps(amend_spec(json.loads(body), fields, description)).encode())
