"""Serving runtime pieces that ``service.py`` composes: settings, in-process batching, request guard.

Why in-process batching and not ``bentoml.depends`` on a batched model service: in
BentoML 1.4.40 the inter-service client (``_bentoml_impl/client/proxy2.py``,
``SessionManager``) replaces its aiohttp session after ``runner_connection.max_requests``
(default 100) requests or ``max_age`` seconds and *closes the old session while other
requests are still in flight on it*; those requests fail with
``ServerDisconnectedError`` / "Cannot write to closing transport" and the front answers
500. At concurrency 1 nothing overlaps, from 2 on it happens every 100 requests. The
second hop also costs CPU (pickle + HTTP over a Unix socket in a second process) that a
2-core machine does not have. So the service decodes and validates each upload in the
request handler and hands only valid pixels to :class:`MicroBatcher`, which groups
concurrent requests into one ONNX Runtime call in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from training.compute_slots import ComputeSlots
# numpy is imported inside the functions that use it: the `bentoml serve` CLI process
# imports this module (through service.py) only for the settings and saves ~0.15 CPU-s
# of start-up without it (issue 6); workers import numpy with ONNX Runtime anyway.


def _cpu_share() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 quota if one is set."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


SWITCHES = ("balance_connections", "access_log", "trace_requests")  # settings that are 0 (off) or 1 (on)
ZERO_ALLOWED = ("infer_nice", "compute_slots")  # other counts must be positive
# Routes left out of OpenTelemetry unless CIFAR10_TRACE_REQUESTS=1 (OpenTelemetry's
# excluded_urls: comma-separated regular expressions searched in the request URL).
UNTRACED = "/predict,/predict_batch,/metadata"


@dataclass(frozen=True)
class ServingSettings:
    """Runtime settings of the service, read from ``CIFAR10_<FIELD>`` environment variables.

    They are read where the service starts (container or ``bentoml serve``), not at
    build time, so one Bento can be tuned per deployment.
    """

    max_batch_size: int = 64  # most images in one ONNX Runtime call
    # A request that waited longer than this in the batch queue is answered 503
    # (shed load instead of letting latency grow without bound).
    max_latency_ms: int = 1000
    max_files: int = 64  # most files in one /predict_batch request (more: 400)
    max_body_bytes: int = 10 * 1024 * 1024  # larger request bodies: 413
    max_concurrency: int = 256  # requests in flight per worker (more: 429, BentoML's limit)
    # Worker processes, each with its own event loop, model and batcher. One process
    # tops out at ~55-65% of 2 cores (its Python request handling holds the GIL), so
    # one worker per CPU, at most 4.
    workers: int = min(_cpu_share(), 4)
    # ONNX Runtime intra-op threads per model call. One: the cores are used by running
    # batches side by side (model_concurrency), which scales ~linearly (measured 624 vs
    # 331 img/s for one call), while intra-op threads synchronise per layer and spin.
    model_threads: int = 1
    # Batches one worker runs at once, each in its own thread (ONNX Runtime releases
    # the GIL): the CPU share, not share/workers, so a worker holding most connections
    # can still use every core.
    model_concurrency: int = max(1, _cpu_share())
    # 1: spread keep-alive connections over the workers (training/worker_balance.py): a
    # worker over its share answers `Connection: close`. Without it a burst of connections
    # lands mostly on one worker (30/2 of 32 seen), and one process caps at ~60% of 2
    # cores. Off by default: with it on, an httpx burst of 768 requests at concurrency 256
    # got connection resets (ReadError) in 2 of 13 runs; cause not found (README, Serving).
    balance_connections: int = 0
    # Niceness the model threads add to the process's (0-19). Positive: a worker's event loop (parse, decode,
    # answer) runs before model compute when both want a core, so requests reach the queue
    # and answers leave without waiting for a batch's time slice; batches are the larger
    # for it. A/B at concurrency 32, 6 alternating runs: 333 -> 377 req/s, p50 93 -> 83 ms,
    # faster in 6 of 6 (bench/ab_serving.sh); p99 unchanged within its noise.
    infer_nice: int = 10
    # Model calls running at once across all workers (training/compute_slots.py): the CPU
    # share, so no two calls time-share a core. 0: no machine-wide cap (each worker still
    # runs up to model_concurrency).
    compute_slots: int = _cpu_share()
    access_log: int = 1  # 1: one log line per request (BentoML access log); 0: off, saves CPU under load
    # 1: OpenTelemetry spans for the API routes (set it with a tracing exporter in BentoML's
    # configuration). 0: the routes are excluded from tracing. BentoML runs its tracing
    # middleware on every request even when nothing exports spans (sample rate 0 by
    # default): with a span per ASGI message it was ~15% of a worker's Python time here.
    trace_requests: int = 0

    def service_options(self) -> dict:
        """``@bentoml.service`` options these settings decide (service.py and bench/http_floor.py)."""
        options = {"workers": self.workers, "traffic": {"timeout": 30, "max_concurrency": self.max_concurrency},
                   "logging": {"access": {"enabled": bool(self.access_log)}}}
        if not self.trace_requests:
            options["tracing"] = {"excluded_urls": UNTRACED}
        return options

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServingSettings:
        """Defaults overridden by ``CIFAR10_MAX_BATCH_SIZE`` etc.; rejects non-positive counts and switches not 0/1."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, default in asdict(cls()).items():
            raw = environ.get(f"CIFAR10_{name.upper()}")
            value = default if raw is None else int(raw)
            if name in SWITCHES and value not in (0, 1):
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be 0 (off) or 1 (on)")
            if name == "infer_nice" and not 0 <= value <= 19:
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be a niceness from 0 to 19")
            if value < 0 or value == 0 and name not in SWITCHES and name not in ZERO_ALLOWED:
                kind = "0 or a positive integer" if name in ZERO_ALLOWED else "a positive integer"
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be {kind}")
            values[name] = value
        return cls(**values)


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


def prediction(probs: np.ndarray, class_names: list[str]) -> dict:
    """The API's answer for one image from its class probabilities."""
    import numpy as np

    class_id = int(np.argmax(probs))
    return {"label": class_names[class_id], "class_id": class_id, "confidence": float(probs[class_id]),
            "probabilities": {name: float(p) for name, p in zip(class_names, probs)}}


def _renice(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: a thread's own niceness)."""
    if not nice:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # where a thread id is not a process id (not Linux): keep the process's niceness
        pass


def warm_up(infer: Callable[[np.ndarray], np.ndarray], max_batch_size: int, concurrency: int) -> None:
    """Run ``concurrency`` full batches side by side, as a loaded worker does.

    ONNX Runtime's arena then reaches most of its working size before the server says
    ready rather than under the first load: with the session's memory pattern off
    (``export.onnx_session``), ``bench/ort_arena.py --warm`` measured +25 MiB after it.
    """
    import numpy as np

    images = np.zeros((max_batch_size, 32, 32, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(infer, [images] * concurrency))


class Overloaded(RuntimeError):
    """A request waited longer than the latency budget before its batch started."""


class MicroBatcher:
    """Group concurrent requests into one call of ``infer`` (run in a worker thread).

    Greedy, adaptive batching: while one batch runs, new images queue; the next batch
    takes everything queued (up to ``max_batch_size``), so batches grow with load and
    a lone request never waits for company. Only valid, decoded pixels ever reach
    the queue, so one bad upload cannot fail its neighbours.
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: int,
                 on_batch: Callable[[int], None] | None = None, concurrency: int = 1, nice: int = 0,
                 gate: ComputeSlots | None = None) -> None:
        self._infer = infer
        self.concurrency = concurrency
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self._on_batch = on_batch or (lambda size: None)
        # Machine-wide slots shared with the other workers (training/compute_slots.py): a
        # batch is formed only once it has a core, so requests arriving meanwhile join it.
        self._gate = gate
        self._queue: deque[tuple[np.ndarray, asyncio.Future, float]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        # Own threads, one per batch slot: ONNX Runtime releases the GIL, so `concurrency`
        # single-threaded calls use that many cores while the event loop parses requests.
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="infer",
                                            initializer=_renice, initargs=(nice,))

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (k, classes) for ``pixels`` (k, 32, 32, 3) uint8, in order."""
        import numpy as np

        if self._worker is None or self._worker.done():
            self._wakeup, self._slots = asyncio.Event(), asyncio.Semaphore(self.concurrency)
            self._worker = asyncio.get_running_loop().create_task(self._run())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for image in pixels:
            future = loop.create_future()
            self._queue.append((image, future, now))
            futures.append(future)
        self._wakeup.set()
        return np.stack(await asyncio.gather(*futures))

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._slots.acquire()  # at most `concurrency` batches run at once
                slot = None
                if self._gate is not None:
                    slot = await asyncio.get_running_loop().run_in_executor(self._executor, self._gate.acquire)
                batch = self._take()
                if not batch:
                    self._release(slot)
                    continue
                task = asyncio.get_running_loop().create_task(self._run_batch(batch, slot))
                self._running.add(task)  # keep a reference until it ends
                task.add_done_callback(self._running.discard)

    def _release(self, slot: int | None) -> None:
        if slot is not None:
            self._gate.release(slot)
        self._slots.release()

    async def _run_batch(self, batch: list[tuple[np.ndarray, asyncio.Future, float]], slot: int | None = None
                         ) -> None:
        import numpy as np

        try:
            images, futures = np.stack([b[0] for b in batch]), [b[1] for b in batch]
            self._on_batch(len(batch))
            try:
                probs = await asyncio.get_running_loop().run_in_executor(self._executor, self._infer, images)
            except Exception as exc:  # a model failure fails this batch only, then we go on
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
                return
            for future, row in zip(futures, probs):
                if not future.done():  # the client may have gone (cancelled)
                    future.set_result(row)
        finally:
            self._release(slot)

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future, float]]:
        """Up to ``max_batch_size`` live queued items; too-old ones get :class:`Overloaded`."""
        deadline = time.monotonic() - self.max_latency_s
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item[1].done():
                continue
            if item[2] < deadline:
                item[1].set_exception(Overloaded(
                    f"server overloaded: the request waited over {self.max_latency_s * 1000:.0f} ms "
                    "for the model; retry later"))
                continue
            batch.append(item)
        return batch


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
    loses the answer it already received (tests/test_service.py reproduces it). Like
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


ERROR_SCHEMA = {"type": "object", "title": "Error", "required": ["error"], "additionalProperties": False,
                "properties": {"error": {"type": "string", "description": "What was wrong and what to do"}}}
ERROR_STATUSES = {
    400: "Invalid input: not a readable image, a missing, unknown or text form field, too many files",
    413: "Request body over the size limit (CIFAR10_MAX_BODY_BYTES)",
    429: "More requests in flight than the limit (CIFAR10_MAX_CONCURRENCY); retry later",
    500: "Unexpected server error; the server log has the details",
    503: "Overloaded: the request waited too long for the model (CIFAR10_MAX_LATENCY_MS); retry later",
}
# What a file part holds (OpenAPI encoding.contentType); the decoder goes by the bytes, not the part's type.
IMAGE_TYPES = "image/png, image/jpeg, image/bmp, image/gif, image/webp"
# BentoML's error components: dropped once no operation refers to them.
BENTOML_ERRORS = ("InvalidArgument", "NotFound", "InternalServerError")


def amend_spec(spec: dict, fields: dict[str, set[str]], description: str | None = None) -> dict:
    """``spec`` (BentoML's OpenAPI document) saying what the routes in ``fields`` really take and answer.

    - Errors: :data:`ERROR_SCHEMA` for every status in :data:`ERROR_STATUSES` a route can
      answer, 503 only where the model runs (routes with file fields). BentoML's 404 goes:
      an existing route never answers it.
    - A route with file fields needs a multipart body with no other fields (the guard
      refuses unknown ones), and its file parts are images (:data:`IMAGE_TYPES`).
    """
    for path, allowed in fields.items():
        for operation in spec.get("paths", {}).get(path, {}).values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if allowed and form:
                operation["requestBody"]["required"] = True
                form.setdefault("schema", {})["additionalProperties"] = False
                form.setdefault("encoding", {}).update({name: {"contentType": IMAGE_TYPES} for name in sorted(allowed)})
            responses = {code: answer for code, answer in operation.get("responses", {}).items()
                         if int(code) < 400}
            for status, what in ERROR_STATUSES.items():
                if status != 503 or allowed:
                    responses[str(status)] = {"description": what, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            operation["responses"] = responses
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    referenced = json.dumps(spec.get("paths", {}))
    for name in BENTOML_ERRORS:
        if f'"#/components/schemas/{name}"' not in referenced:
            schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    if description is not None:
        spec.setdefault("info", {})["description"] = description
    return spec


def _amend_spec(send, fields: dict[str, set[str]], description: str | None):
    """Wrap ``send`` so that BentoML's OpenAPI document goes out through :func:`amend_spec`."""
    return _rewrite_body(send, lambda status: status == 200,
                         lambda body: json.dumps(amend_spec(json.loads(body), fields, description)).encode())
