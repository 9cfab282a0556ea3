"""The HTTP edge: the in-memory upload type and the request guard in front of BentoML's routes."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import PurePosixPath

from serving.balance import ConnectionBalance
from serving.openapi import amend_spec
from serving.slots import server_key


class Upload(PurePosixPath):
    """An uploaded file held in memory: the client's file name, and its bytes in ``data``.

    BentoML writes every ``Path`` input to a temporary file (``FileSchema.decode`` in
    ``_bentoml_sdk/validators.py``) that the handler then reads back, a cost per request
    (docs/serving.md). A ``PurePath`` subclass is still a file field to BentoML (multipart
    part, Swagger file picker); its own pydantic schema below keeps the bytes instead.
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


# A request body must have arrived this long after the request began, or it is answered 408:
# a client sending a byte a second would otherwise hold its memory and its connection for as long
# as it likes. Below BentoML's 30-second request timeout, so the client learns which side was slow.
BODY_TIMEOUT_S = 20.0
# Requests still sending their body, per worker, as a multiple of the requests being answered: they
# cost a connection and the bytes sent so far, not a slot, so many more may wait for their bodies.
RECEIVING_PER_SLOT = 4
# Body bytes one worker holds at once, for requests still arriving or being answered: what a crowd of
# large uploads can take of its memory. Over it, a request is answered 503 until bytes are freed.
BODY_BUDGET_BYTES = 256 * 1024**2

# The Swagger page may load only what the service itself serves: BentoML's page also carries a Google Tag
# Manager snippet, which would report every visitor to a third party.
PAGE_POLICY = (b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
               b"frame-ancestors 'none'")

log = logging.getLogger(__name__)


async def _send_json(send, status: int, body: dict, more_body: bool = False,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": payload, "more_body": more_body})


async def _refuse_unread(receive, send, status: int, body: dict, linger_s: float,
                         headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer ``status`` before the request body was read, then drop what the client still sends.

    Closing a socket with unread bytes in it makes the kernel send a reset, and a client
    that gives up at its first failed write (asyncio streams: ``ConnectionResetError``)
    loses the answer it already received (tests/service/test_service.py reproduces it). Like
    nginx's lingering close, the answer goes out first, then the rest of the body is read
    and dropped until it ends or for at most ``linger_s``; only then does the connection close.
    """
    await _send_json(send, status, body, more_body=True, headers=headers)
    deadline = time.monotonic() + linger_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            message = await asyncio.wait_for(receive(), left)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
    except asyncio.TimeoutError:
        pass  # a client still sending after linger_s gets the reset; it had the answer that long
    await send({"type": "http.response.body", "body": b""})


class _Refused(Exception):
    """A request the guard answers itself: status, the error text, and whether its body is still unread."""

    def __init__(self, status: int, error: str, unread: bool = True, headers: list[tuple[bytes, bytes]] = ()):
        super().__init__(error)
        self.status, self.error, self.unread, self.headers = status, error, unread, list(headers)


class _ClientGone(Exception):
    """The client disconnected before its body arrived: there is nobody to answer."""


class _ClientErrorTracebacks(logging.Filter):
    """Drops BentoML's ERROR record with a traceback for a request refused for its input or for load.

    BentoML logs every exception its API handler raises, ``BadInput`` and overload included, as
    ``Exception on /predict [POST]`` with the whole chain: a client's mistake reads as a server
    error. The guard logs those requests in one line instead; a real server error (500) keeps
    its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        code = getattr(getattr(exc, "error_code", None), "value", 500)
        return not (isinstance(exc, ValidationError) or isinstance(exc, BentoMLException) and code != 500)


class RequestGuard:
    """ASGI middleware in front of BentoML's routes: what a request may cost, who may send it, one error shape.

    - ``fields`` maps each API route to its multipart file fields, each to the most parts it
      may have (more: 400, before BentoML parses the form). ``/predict/`` is
      ``/predict`` here, before anything else: Starlette would answer it with a bodyless
      307, which curl (without ``-L``) prints as nothing.
    - With a ``token``, the API routes and ``/metrics`` need ``Authorization: Bearer <token>``
      (401 otherwise); health routes and the API document never do.
    - Bodies: a declared ``Content-Length`` over ``max_body_bytes`` is refused (413) before
      any byte is read, a chunked body once it passes the limit; a body that has not arrived
      within :data:`BODY_TIMEOUT_S` gets 408. After such an early answer the connection
      lingers (see :func:`_refuse_unread`) so that the client reads it.
    - Slots: ``max_concurrency`` counts an API request only once its body has arrived, as a
      buffering proxy would, so clients that send slowly cannot take the slots of the others
      (429 when all are taken). Requests still sending have their own, larger cap
      (:data:`RECEIVING_PER_SLOT`), and the bytes all requests hold are bounded by
      :data:`BODY_BUDGET_BYTES`; over either, 503.
    - The part headers of an API route's form body are read here first (by the parser BentoML's
      own parse uses) and the body refused with 400 when BentoML 1.4.40 would answer 500 or do
      something unsafe: an
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
    - Every refused request (4xx, or 503 for load) is one log line at INFO or WARNING with the
      route, the client and the reason, never a traceback (:class:`_ClientErrorTracebacks`).
    - ``GET /docs.json`` says all of this: BentoML 1.4.40 documents every error as
      ``{"error": str, "detail": str}`` and has no way to set an operation's responses, so
      its spec is amended on the way out (:func:`amend_spec`). ``description``, if
      given, replaces the page text, which for a service served from source is BentoML's
      own README (``description=`` of ``@bentoml.service`` reaches only a built Bento's).
    - With ``workers`` > 1, a worker holding more than its share of the server's kept-alive connections
      closes one after its answer, so the workers share the load (:mod:`serving.balance`).
    """

    def __init__(self, app, max_body_bytes: int, fields: dict[str, dict[str, int]] | None = None,
                 max_concurrency: int = 0, token: str = "", linger_s: float = 2.0, description: str | None = None,
                 body_timeout_s: float = BODY_TIMEOUT_S, workers: int = 1) -> None:
        import bentoml

        self.app = app
        self.max_body_bytes = max_body_bytes
        self.fields = fields or {}
        self.max_concurrency = max_concurrency  # 0: no cap
        self.max_receiving = RECEIVING_PER_SLOT * max_concurrency
        self.body_budget = max(BODY_BUDGET_BYTES, max_body_bytes)
        self.body_timeout_s = body_timeout_s
        self._token = token.encode()
        self.protected = {*self.fields, "/metrics"} if token else set()
        self.linger_s = linger_s  # most seconds spent dropping the rest of a refused body
        self.description = description
        self._answering = self._receiving = self._held = 0
        # Built where the worker builds its app: BentoML has set the worker's index by then.
        self._balance = ConnectionBalance(server_key(), workers, bentoml.server_context.worker_index)
        self._balance.start()
        logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorTracebacks())
        if log.level == logging.NOTSET:  # BentoML sets the root logger to WARNING: refusals log at INFO
            log.setLevel(logging.INFO)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.endswith("/") and path[:-1] in self.fields:
            raw = scope.get("raw_path")
            scope = {**scope, "path": path[:-1], "raw_path": raw[:-1] if raw and raw.endswith(b"/") else raw}
            path = scope["path"]
        elif path == "/docs.json" and scope["method"] == "GET":
            return await self.app(scope, receive, _amend_spec(send, self.fields, self.description, bool(self._token)))
        elif path == "/" and scope["method"] == "GET":
            return await self.app(scope, receive, _with_header(send, b"content-security-policy", PAGE_POLICY))
        # The API routes take POST only: another method gets the router's 405, whatever its body.
        allowed = self.fields.get(path) if scope["method"] == "POST" else None
        held = [0]  # body bytes this request holds of the budget
        try:
            receive = await self._admit(scope, receive, allowed, held)
            shaped = _one_error_shape(send, path, self.fields.get(path), self._log_refusal(scope))
            if allowed is None:
                return await self.app(scope, receive, shaped)
            if self.max_concurrency and self._answering >= self.max_concurrency:
                raise _Refused(429, f"server busy: {self._answering} requests are being answered, the most this worker "
                                    "takes (CIFAR10_MAX_CONCURRENCY); retry later", unread=False)
            if self._balance.should_close(scope.get("client")):
                shaped = _with_header(shaped, b"connection", b"close")
            self._answering += 1
            try:
                await self.app(scope, receive, shaped)
            finally:
                self._answering -= 1
        except _ClientGone:
            return
        except _Refused as refused:
            self._log_refusal(scope)(refused.status, refused.error)
            if refused.unread:
                return await _refuse_unread(receive, send, refused.status, {"error": refused.error}, self.linger_s,
                                            refused.headers)
            await _send_json(send, refused.status, {"error": refused.error}, headers=refused.headers)
        finally:
            self._held -= held[0]

    async def _admit(self, scope, receive, allowed: set[str] | None, held: list[int]):
        """Checks before the app runs: token, declared size, and the whole body for an API route.

        Returns the ``receive`` the app is to use (the buffered body, replayed); raises :class:`_Refused`.
        """
        headers = dict(scope.get("headers") or [])
        if scope["path"] in self.protected and not hmac.compare_digest(
                headers.get(b"authorization", b""), b"Bearer " + self._token):
            raise _Refused(401, "missing or wrong bearer token: send the header Authorization: Bearer <token> "
                                "(the server's CIFAR10_API_TOKEN)", headers=[(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            raise _Refused(400, "invalid Content-Length header", unread=False)
        if length is not None and int(length) > self.max_body_bytes:
            # A client that sent Expect: 100-continue waits for the answer: nothing is in flight to drop.
            raise _Refused(413, self._too_big(), unread=headers.get(b"expect", b"").lower() != b"100-continue")
        if allowed is None and not (length is None and b"chunked" in headers.get(b"transfer-encoding", b"")):
            return receive
        messages = await self._body(receive, held)
        if allowed is not None and (error := _form_error(headers, messages, scope["path"], allowed)):
            raise _Refused(400, error, unread=False)
        replay = iter(messages)

        async def replayed():  # hand the buffered body to the app, then go live
            return next(replay, None) or await receive()

        return replayed

    async def _body(self, receive, held: list[int]) -> list[dict]:
        """The request body's messages, read within the deadline, the size limit and the worker's byte budget."""
        if self.max_concurrency and self._receiving >= self.max_receiving:
            raise _Refused(503, f"server busy: {self._receiving} uploads are arriving, the most this worker takes at "
                                "once; retry later", headers=[(b"retry-after", b"1")])
        self._receiving += 1
        messages, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    messages.append(message)
                    chunk = len(message.get("body", b""))
                    size += chunk
                    if size > self.max_body_bytes:
                        raise _Refused(413, self._too_big())
                    if self._held + chunk > self.body_budget:
                        raise _Refused(503, "server busy: uploads in progress hold all the memory this worker gives "
                                            "them; retry later", headers=[(b"retry-after", b"1")])
                    self._held += chunk
                    held[0] += chunk
                    if not message.get("more_body"):
                        return messages
        except TimeoutError:
            raise _Refused(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                f"({size:,} bytes came); send it at once") from None
        finally:
            self._receiving -= 1

    def _log_refusal(self, scope):
        """A callback logging one line for a refused request: the route, the client, the status and why."""
        def log_refusal(status: int, error: str) -> None:
            client = ":".join(map(str, scope.get("client") or ("?",)))
            log.log(logging.WARNING if status in (408, 429, 503) else logging.INFO, "refused %s %s from %s: %d %s",
                    scope["method"], scope["path"], client, status, error)

        return log_refusal

    def _too_big(self) -> str:
        return (f"request body is over the {self.max_body_bytes:,}-byte limit (CIFAR10_MAX_BODY_BYTES); "
                "send fewer or smaller images")


def _form_error(headers: dict, messages: list[dict], path: str, allowed: dict[str, int]) -> str | None:
    """Why a form body for ``path`` must be refused, or None if it may go on to BentoML.

    ``allowed`` maps each file field of the route to the most parts it may have. Only the parts'
    headers are read, by the multipart parser BentoML's own parse uses (python-multipart's, through
    Starlette): its part data is skipped, not copied, so the form is built once, by BentoML.
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type, params = parse_options_header(headers.get(b"content-type", b""))
    how = _how(allowed)
    if content_type == b"application/x-www-form-urlencoded":
        return f"url-encoded forms are not accepted: {how}"
    if content_type != b"multipart/form-data":
        return None  # BentoML answers other bodies (JSON, text) with 400 itself
    if b"boundary" not in params:
        return f"malformed multipart body (Missing boundary in multipart.): {how}"
    parts: list[tuple[str, bool]] = []  # (field name, whether the part is a file)
    header: dict[str, bytes] = {"name": b"", "value": b"", "disposition": b""}

    def on_header_end() -> None:
        if header["name"].lower() == b"content-disposition":
            header["disposition"] = header["value"]
        header["name"] = header["value"] = b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(header["disposition"])
        if b"name" not in options:
            raise FormParserError('The Content-Disposition header field "name" must be provided.')
        parts.append((options[b"name"].decode("utf-8", "replace"), b"filename" in options))
        header["disposition"] = b""

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": lambda data, start, end: header.__setitem__("name", header["name"] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__("value", header["value"] + data[start:end]),
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished})
    try:
        for message in messages:
            parser.write(message.get("body", b""))
        parser.finalize()
    except FormParserError as exc:
        return f"malformed multipart body ({exc}): {how}"
    if unknown := sorted({name for name, _ in parts} - set(allowed)):
        return f"unexpected form field(s) {unknown}; {path} takes {' and '.join(sorted(allowed)) or 'none'}"
    if text := sorted({name for name, is_file in parts if not is_file}):
        return f"form field(s) {text} hold text, not a file (no filename): {how}"
    for name, most in allowed.items():
        if (count := sum(1 for part, _ in parts if part == name)) > most:
            return (f"{count} files in field {name!r}: at most {most} per request"
                    f"{' (CIFAR10_MAX_FILES)' if most > 1 else ''}; split the request")
    return None


def _how(allowed: dict[str, int] | None) -> str:
    """What a client should send to a route with file fields ``allowed``."""
    if not allowed:
        return "it takes no input: send an empty body or the JSON object {}"
    return f"send images as multipart file parts (curl -F {min(allowed)}=@image.png)"


def _one_error(body: object, path: str, allowed: dict[str, int] | None) -> object:
    """BentoML's error bodies as one ``{"error": ...}`` object; anything else unchanged."""
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
        return body[0]
    if isinstance(body, dict) and isinstance(body.get("detail"), list):  # a pydantic ValidationError
        problems = "; ".join(f"{'.'.join(map(str, item.get('loc') or ())) or 'body'}: {item.get('msg')}"
                             for item in body["detail"] if isinstance(item, dict))
        return {"error": f"invalid request to {path}: {problems or body.get('error')}; {_how(allowed)}"}
    return body


def _rewrite_body(send, statuses: Callable[[int], bool], rewrite: Callable[[int, bytes], bytes]):
    """Wrap ``send``: the body of a response whose status passes ``statuses`` goes out as ``rewrite(status, body)``."""
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
        start = held.pop("start")
        body = rewrite(start["status"], b"".join(chunks))
        start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"] + [
            (b"content-length", str(len(body)).encode())]
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _one_error_shape(send, path: str, allowed: dict[str, int] | None, log_refusal: Callable[[int, str], None]):
    """Wrap ``send`` so that a 4xx JSON body goes out in the one documented error shape, and a refusal
    (4xx, or 503 for load) is logged through ``log_refusal``."""

    def rewrite(status: int, body: bytes) -> bytes:
        try:
            shaped = _one_error(json.loads(body), path, allowed) if status < 500 else json.loads(body)
        except ValueError:  # not JSON (Starlette's plain-text answers): as it is
            log_refusal(status, body[:200].decode(errors="replace"))
            return body
        log_refusal(status, shaped.get("error", "") if isinstance(shaped, dict) else str(shaped)[:200])
        return json.dumps(shaped).encode() if status < 500 else body

    return _rewrite_body(send, lambda status: 400 <= status < 500 or status == 503, rewrite)


def _with_header(send, name: bytes, value: bytes):
    """Wrap ``send`` so that the response carries the header ``name: value``."""
    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return wrapped


def _amend_spec(send, fields: dict[str, dict[str, int]], description: str | None, token: bool):
    """Wrap ``send`` so that BentoML's OpenAPI document goes out through :func:`amend_spec`."""
    return _rewrite_body(send, lambda status: status == 200,
                         lambda _, body: json.dumps(amend_spec(json.loads(body), fields, description, token)).encode())
