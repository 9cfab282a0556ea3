"""Spread keep-alive connections evenly over the service's worker processes.

BentoML's workers share one listening socket, and whichever worker is awake when a
burst of connections arrives accepts most of them: 32 keep-alive connections split
30/2, 6/26 and 31/1 over two workers here. The busy worker then queues while the other
idles, and one process cannot use 2 cores (its Python request handling holds the
GIL; measured 54-64% of 2 cores). Throughput at a given concurrency became a lottery
(c=8: 170-220 req/s when one worker held every connection, 290-395 when both had some).

:class:`WorkerBalance` is an ASGI middleware: each worker counts its active
connections (distinct client address and port seen within the last ``window_s``
seconds; ASGI shows requests, not connections) and publishes the count in a small
shared-memory table (one slot per worker). A worker holding more than its share
(total / workers + ``slack``) answers with ``Connection: close``; HTTP/1.1 clients
reconnect and the new connection goes to whichever worker accepts first, usually the
idle one. Clients that already spread evenly never see a close.

A close is only added after the app has read the whole request body. An early answer
(BentoML's 429, a 413) leaves body bytes in flight; closing then makes the kernel send
a reset, and a client still writing its body loses the answer (httpx: ``ReadError``).
Kept open, uvicorn reads and drops the rest, and the next request can balance instead.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


class WorkerBalance:
    """ASGI middleware: ``Connection: close`` from a worker over its share of active connections."""

    def __init__(self, app, workers: int, slack: int = 2, window_s: float = 1.0, table_dir: str | None = None) -> None:
        self.app = app
        self.workers = workers
        self.slack = slack
        self.window_s = window_s
        self.table_dir = table_dir
        self._table: memoryview | None = None
        self._slot = -1
        self._seen: dict[tuple, float] = {}  # client (host, port) -> when it last sent a request
        self._pruned = 0.0

    def _attach(self) -> bool:
        """Map the shared table on first use (in the worker, after BentoML set its index)."""
        if self._slot >= 0 or self.workers < 2:
            return self._slot >= 0
        import bentoml

        index = bentoml.server_context.worker_index
        if not index:  # not under `bentoml serve` (tests, in-process use): nothing to balance
            self.workers = 1
            return False
        # All workers of one server are children of the same arbiter process.
        folder = Path(self.table_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))
        path = folder / f"cifar10-connections-{os.getuid()}-{os.getppid()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, max(os.fstat(fd).st_size, 8 * self.workers))
                self._table = memoryview(mmap.mmap(fd, 8 * self.workers)).cast("q")
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("worker balancing off: cannot map %s (%s)", path, exc)
            self.workers = 1
            return False
        self._slot = (index - 1) % self.workers
        self._table[self._slot] = 0  # a restarted worker starts from zero
        return True

    def over_share(self) -> bool:
        """Whether this worker holds more than its share of the server's active connections."""
        table = self._table
        return table[self._slot] > sum(table) / self.workers + self.slack

    def _saw(self, client: tuple, now: float) -> None:
        self._seen[client] = now
        if now - self._pruned > self.window_s / 4:  # forget connections idle for a window
            self._pruned = now
            self._seen = {c: t for c, t in self._seen.items() if now - t <= self.window_s}
        self._table[self._slot] = len(self._seen)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope.get("client") or not self._attach():
            return await self.app(scope, receive, send)
        client = tuple(scope["client"])
        self._saw(client, time.monotonic())
        headers = dict(scope.get("headers") or ())
        body_read = b"transfer-encoding" not in headers and headers.get(b"content-length", b"0") == b"0"

        async def receive_and_note() -> dict:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_or_close(message) -> None:
            if message["type"] == "http.response.start" and body_read and self.over_share():
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                self._seen.pop(client, None)  # it will reconnect, maybe to another worker
                self._table[self._slot] = len(self._seen)
            await send(message)

        await self.app(scope, receive_and_note, send_or_close)
