"""In-process adaptive batching: concurrent requests' images go to the model in one call.

Why not ``bentoml.depends`` on a batched model service: in
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
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from serving.cpu import renice

if TYPE_CHECKING:
    import numpy as np

    from serving.slots import ComputeSlots


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
        # Machine-wide slots shared with the other workers (serving/slots.py): a
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
                                            initializer=renice, initargs=(nice,))

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
        if len(futures) == 1:  # most requests: no gathering future and no copy
            return (await futures[0])[None]
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
