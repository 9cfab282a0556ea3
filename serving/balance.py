"""Connections spread over the worker processes, although they accept from one shared socket.

BentoML's workers accept connections from one listening socket they all inherit
(https://github.com/bentoml/BentoML/issues/5426). When a burst of connections arrives, the worker that wakes
first accepts nearly all of them: 32 keep-alive connections opened at once went 32/0 to one of two
workers in about a third of the runs. That worker's Python request handling holds its GIL and cannot use
more than about one core, the other worker idles, and the server answers half as many requests.

Each worker counts its active connections (a client address and port that sent a request within
:data:`WINDOW_S`: ASGI shows requests, not connections) and publishes the count, with the time it
counted, in a table in shared memory, one slot per worker. A count older than the window is read as 0:
a worker that answered nothing for a window holds no active connection, and one that takes no request
never updates its slot. A worker holding more than its share by :data:`SLACK` answers with
``Connection: close``, and forgets that connection; the client reconnects, and the worker waiting in
``accept`` (the idle one) takes it. Connections already spread never see a close. A worker closes at
most one connection per :data:`CLOSE_EVERY_S`, so that a moved connection is counted where it lands
before the next is moved: counts lag behind a burst, and closing on them at once would move too many,
then move them back.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

# A connection that sent no request for this long no longer counts: an idle keep-alive connection costs
# its worker nothing.
WINDOW_S = 1.0
# Connections a worker may hold over an even share before it closes one: rounding, and a little noise,
# must not make connections move back and forth.
SLACK = 2
# Time between two closes by one worker: a closed client reconnects and sends its next request within it
# (tens of ms at most under load), so 32 connections on one worker are spread within a second.
CLOSE_EVERY_S = 0.05


class ConnectionBalance:
    """One worker's count of its active connections, and the decision to close one."""

    def __init__(self, key: str, workers: int, index: int | None, folder: Path | None = None) -> None:
        # Off (never closes) for one worker, or outside `bentoml serve` (no worker index: tests, in-process use).
        self.on = workers > 1 and bool(index)
        self._key, self._workers, self._index, self._folder = key, workers, index, folder
        self._table: memoryview | None = None  # mapped on first use: nothing happens at construction
        self._seen: dict[tuple, float] = {}  # client (host, port) -> when it last sent a request
        self._pruned = self._closed = 0.0

    def should_close(self, client: tuple | None) -> bool:
        """Count ``client``'s request; whether this worker is over its share and should close that connection."""
        if not self.on or client is None:
            return False
        now = time.monotonic()
        client = tuple(client)  # a server may give a list: a key must be hashable
        self._seen[client] = now
        if now - self._pruned > WINDOW_S / 4:
            self._pruned = now
            for old in [c for c, seen in self._seen.items() if now - seen > WINDOW_S]:
                del self._seen[old]
        table = self._table if self._table is not None else self._attach()
        if table is None:
            return False
        mine, stamp = len(self._seen), int(now * 1e6)
        table[2 * self._slot], table[2 * self._slot + 1] = mine, stamp
        fresh = stamp - int(WINDOW_S * 1e6)
        total = sum(table[2 * i] for i in range(self._workers) if table[2 * i + 1] > fresh)
        if mine <= total / self._workers + SLACK or now - self._closed < CLOSE_EVERY_S:
            return False
        self._closed = now
        del self._seen[client]  # it is closing: the next look counts it where it reconnects
        table[2 * self._slot] = mine - 1
        return True

    def _attach(self) -> memoryview | None:
        """Map the server's table (its workers share the key); a worker that cannot stops balancing."""
        folder = Path(self._folder or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))
        path = folder / f"cifar10-connections-{self._key}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                size = 16 * self._workers  # per worker: its count, and when it counted (monotonic us)
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._table = memoryview(mmap.mmap(fd, size)).cast("q")
            finally:
                os.close(fd)
        except OSError:
            self.on = False
            return None
        self._slot = (self._index - 1) % self._workers
        return self._table
