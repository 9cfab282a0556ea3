"""Machine-wide slots for model calls, shared by the worker processes of one server.

Each BentoML worker batches on its own and may run several model calls side by side,
so a worker holding most connections can use every core. Left alone, two workers then
run up to four single-threaded ONNX Runtime calls on two cores: the calls time-share
the cores, every batch takes twice as long, and the latency tail grows with it.
The slots cap the calls running at once across all workers at the CPU count, so a call
either has a core or has not started; requests that arrive meanwhile join the next batch.

The slots are ``flock`` locks on small files: the kernel drops a lock when its process
dies, so a crashed worker never keeps a slot.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from pathlib import Path

# How long a caller sleeps between tries while every slot is taken: short against a
# batch (tens of ms), long enough that waiting costs no noticeable CPU.
POLL_S = 0.0005


class ComputeSlots:
    """``count`` slots named by ``key``: processes using the same key share them.

    :meth:`acquire` blocks (call it from a worker thread, not the event loop) and returns
    a slot number for :meth:`release`.
    """

    def __init__(self, key: str, count: int, folder: Path | None = None) -> None:
        if count < 1:
            raise ValueError(f"compute slots: count must be at least 1, got {count} (CIFAR10_CPUS)")
        folder = Path(folder or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))
        self.count = count
        self._paths = [folder / f"cifar10-compute-{key}-{i}.lock" for i in range(count)]
        self._fds: list[int] | None = None  # opened on first use: nothing happens at construction
        self._held: dict[int, int] = {}  # slot -> fd, for the slots this object holds
        self._lock = threading.Lock()

    def acquire(self, timeout: float | None = None) -> int:
        """Take a free slot, waiting for one; returns its number. Raises TimeoutError after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._fds is None:
                    self._fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in self._paths]
                for slot, fd in enumerate(self._fds):
                    # flock on a descriptor this object already locked would succeed again:
                    # its own held slots are skipped here; other holders (objects, processes)
                    # have their own descriptors, which flock excludes.
                    if slot in self._held:
                        continue
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    self._held[slot] = fd
                    return slot
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no free compute slot of {self.count} within {timeout} s")
            time.sleep(POLL_S)

    def release(self, slot: int) -> None:
        """Give back ``slot`` (from any thread of this process)."""
        with self._lock:  # unlock before forgetting it: in between, acquire() would re-take it on the held fd
            fcntl.flock(self._held[slot], fcntl.LOCK_UN)
            del self._held[slot]


def server_key() -> str:
    """A key shared by the workers of one server: their parent's PID (BentoML's process manager)."""
    return f"{os.getppid()}"
