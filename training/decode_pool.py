"""Decode many image files into one uint8 array, in forked worker processes.

Decoding 50,000 small images is CPU-bound Python + libjpeg work, so it is split into
contiguous slices, one per worker process. Workers are forked: they inherit the
caller's reader factory and the output array without pickling anything, and write
pixels straight into an anonymous shared memory map that the caller keeps, so no
image is copied between processes. Only the list of unreadable files travels back.

Each worker calls the factory once to get its own ``read(i) -> bytes``, so a worker
never shares a file position with another (archives are reopened per process).
Where ``fork`` is unavailable, or the work is small, everything runs in-process.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import traceback
from typing import Callable

import numpy as np

from training.images import SIZE, InvalidImage, decode_image

# Below this many images per worker, forking costs more than it saves.
MIN_PER_WORKER = 500
IMAGE_BYTES = SIZE * SIZE * 3

ReadFactory = Callable[[], Callable[[int], bytes]]


class WorkerError(RuntimeError):
    """A decode worker failed for a reason other than an unreadable image."""


def default_workers() -> int:
    """CPUs this process may use (affinity-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def shared_images(count: int) -> np.ndarray:
    """A (count, 32, 32, 3) uint8 array in anonymous shared memory (visible to forked children)."""
    buf = mmap.mmap(-1, max(1, count * IMAGE_BYTES))  # MAP_SHARED | MAP_ANONYMOUS on Unix
    return np.frombuffer(buf, dtype=np.uint8, count=count * IMAGE_BYTES).reshape(count, SIZE, SIZE, 3)


def _decode_range(out: np.ndarray, lo: int, hi: int, make_read: ReadFactory) -> list[tuple[int, str]]:
    read = make_read()
    bad = []
    for i in range(lo, hi):
        try:
            out[i] = decode_image(read(i))
        except InvalidImage as exc:
            bad.append((i, str(exc)))
    return bad


def _worker(conn, out: np.ndarray, lo: int, hi: int, make_read: ReadFactory) -> None:
    try:
        conn.send(("ok", _decode_range(out, lo, hi, make_read)))
    except BaseException as exc:  # report anything, the parent decides; never hang it
        try:
            conn.send(("error", (exc, traceback.format_exc())))
        except Exception:  # the exception itself does not pickle
            conn.send(("error", (WorkerError(f"{type(exc).__name__}: {exc}"), traceback.format_exc())))
    finally:
        conn.close()


def decode_into(out: np.ndarray, lo: int, hi: int, make_read: ReadFactory, workers: int,
                passthrough: tuple[type[BaseException], ...] = ()) -> list[tuple[int, str]]:
    """Decode items ``lo..hi-1`` into ``out[lo:hi]``; return sorted (index, reason) of unreadable ones.

    ``out`` must come from :func:`shared_images` when ``workers > 1``. An exception of a
    type in ``passthrough`` raised in a worker (e.g. an unsafe archive member) is raised
    again here; anything else becomes :class:`WorkerError` with the worker's traceback.
    """
    count = hi - lo
    workers = max(1, min(workers, count // MIN_PER_WORKER))
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return _decode_range(out, lo, hi, make_read)
    ctx = multiprocessing.get_context("fork")
    bounds = np.linspace(lo, hi, workers + 1).astype(int)
    jobs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(send, out, int(a), int(b), make_read), daemon=True)
        proc.start()
        send.close()
        jobs.append((proc, recv, int(a), int(b)))
    bad: list[tuple[int, str]] = []
    errors = []
    for proc, recv, a, b in jobs:
        try:
            status, payload = recv.recv()
        except EOFError:
            status, payload = "died", None
        finally:
            recv.close()
        proc.join()
        if status == "ok":
            bad.extend(payload)
        elif status == "error":
            errors.append(payload)
        else:
            errors.append((WorkerError(f"decode worker for items {a}..{b - 1} died with exit code "
                                       f"{proc.exitcode}; rerun with decode_workers=1 to see the error "
                                       "in-process"), ""))
    for exc, trace in errors:
        if isinstance(exc, passthrough):
            raise exc
        raise WorkerError(f"decode worker failed: {type(exc).__name__}: {exc}\n{trace}".rstrip()) from exc
    return sorted(bad)
