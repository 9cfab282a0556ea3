"""Connections spread over the worker processes, although they accept from one shared socket.

BentoML's workers accept connections from one listening socket they all inherit
(https://github.com/bentoml/BentoML/issues/5426). When a burst of connections arrives, the worker that wakes
first accepts nearly all of them: 32 keep-alive connections opened at once by wrk went 32/0 in every probe
here, and in about a third of the benchmark runs the split stayed so for the whole run. That worker's Python
request handling holds its GIL and cannot use more than about one core, the other worker idles, and the
server answers half as many requests.

Each worker counts its kept-alive connections (a client address and port that sent at least two requests,
the last within :data:`WINDOW_S`: ASGI shows requests, not connections) and publishes the count, with the
time it counted, in a table in shared memory, one slot per worker. Each worker also marks its slot alive
from a thread, requests or not, so the share is taken over the workers that are running; a count older
than the window reads as 0. A worker holding more than its share by :func:`slack` answers with
``Connection: close``, at most once per :data:`CLOSE_EVERY_S`, and forgets that connection; the client
reconnects, and the worker waiting in ``accept`` (most likely an idle one) takes it.

Not counted: a client address rewritten from ``X-Forwarded-For`` (uvicorn gives it port 0: its connection
is unknown, and a local client could name any address), and a connection's first request (clients that
open a connection per request are no imbalance to move).
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

# A connection that sent no request for this long no longer counts: an idle keep-alive connection costs
# its worker nothing.
WINDOW_S = 1.0
# Time between two closes by one worker: a closed client reconnects and sends its next request within it
# (tens of ms at most under load), so 32 connections on one worker are spread within a second.
CLOSE_EVERY_S = 0.05
# Per worker in the table: its connection count, when it counted, and when it last said it was alive
# (monotonic microseconds: CLOCK_MONOTONIC is one clock for every process of the machine).
FIELDS = 3


def slack(share: float) -> float:
    """Connections a worker may hold over an even ``share`` before it closes one: rounding and a little noise
    must not move connections back and forth."""
    return max(2.0, share / 8)


class ConnectionBalance:
    """One worker's count of its kept-alive connections, and the decision to close one."""

    def __init__(self, key: str, workers: int, index: int | None, folder: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # Off (never closes) for one worker, outside `bentoml serve` (no worker index: tests, in-process use),
        # or for a worker beyond the count it was told (it would share another's slot).
        self.on = workers > 1 and bool(index) and index <= workers
        self._key, self._workers, self._index, self._folder, self._clock = key, workers, index, folder, clock
        self._slot = (index - 1) if self.on else -1
        self._table: memoryview | None = None
        self._once: dict[tuple, float] = {}  # connections seen once: client -> when
        self._seen: dict[tuple, float] = {}  # connections seen twice or more: client -> when last
        self._pruned = self._closed = 0.0

    def start(self, heartbeat: bool = True) -> None:
        """Map the table and, with ``heartbeat``, mark this worker alive every quarter window from a daemon
        thread until the process exits (without: :meth:`beat` marks it)."""
        if not self.on or self._attach() is None:
            return
        self.beat()

        def beating() -> None:
            while True:
                time.sleep(WINDOW_S / 4)
                self.beat()

        if heartbeat:
            threading.Thread(target=beating, name="connection-balance", daemon=True).start()

    def beat(self) -> None:
        """Mark this worker alive now."""
        self._table[FIELDS * self._slot + 2] = int(self._clock() * 1e6)

    def should_close(self, client: tuple | list | None) -> bool:
        """Count ``client``'s request; whether this worker is over its share and should close that connection."""
        table = self._table
        if table is None or client is None or client[1] == 0:
            return False
        now = self._clock()
        client = tuple(client)  # a server may give a list: a key must be hashable
        if client in self._seen or self._once.pop(client, None) is not None:
            self._seen[client] = now
        else:
            self._once[client] = now
        if now - self._pruned > WINDOW_S / 4:
            self._pruned = now
            for counted in (self._once, self._seen):
                for old in [c for c, seen in counted.items() if now - seen > WINDOW_S]:
                    del counted[old]
        mine, stamp = len(self._seen), int(now * 1e6)
        table[FIELDS * self._slot], table[FIELDS * self._slot + 1] = mine, stamp
        if client not in self._seen or now - self._closed < CLOSE_EVERY_S:
            return False
        fresh = stamp - int(WINDOW_S * 1e6)
        slots = [table[FIELDS * i:FIELDS * i + FIELDS] for i in range(self._workers)]
        alive = sum(1 for _, _, beat in slots if beat > fresh) or 1
        share = sum(count for count, counted, _ in slots if counted > fresh) / alive
        if mine <= share + slack(share):
            return False
        self._closed = now
        del self._seen[client]  # it is closing: the next look counts it where it reconnects
        table[FIELDS * self._slot] = mine - 1
        return True

    def _attach(self) -> memoryview | None:
        """Map the server's table (its workers share the key); a worker that cannot stops balancing."""
        folder = Path(self._folder or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))
        path = folder / f"cifar10-connections-{self._key}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                size = 8 * FIELDS * self._workers
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._table = memoryview(mmap.mmap(fd, size)).cast("q")
            finally:
                os.close(fd)
        except OSError:
            self.on = False
            return None
        return self._table
