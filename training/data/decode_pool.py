"""Decode many image files into one uint8 array, in forked worker processes.

Each worker decodes a contiguous slice straight into anonymous shared memory: forked, it inherits the
reader factory and the output array without pickling, and only the unreadable files' list travels back
through a pipe. Each worker calls the factory for its own reader, so no two share a file position.
Without ``fork``, or for little work, everything runs in-process.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import traceback
from typing import Callable

import numpy as np
from PIL import Image

from serving.images import SIZE, InvalidImage, decode_image

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


def _run_child(write_fd: int, out: np.ndarray, lo: int, hi: int, make_read: ReadFactory) -> None:
    """Body of a forked worker: decode, send the result, and leave without cleanup of the parent's state."""
    code = 0
    try:
        try:
            result = ("ok", _decode_range(out, lo, hi, make_read))
        except BaseException as exc:  # report anything, the parent decides
            result = ("error", (exc, traceback.format_exc()))
        with os.fdopen(write_fd, "wb") as pipe:
            try:
                pickle.dump(result, pipe)
            except Exception:  # the exception itself does not pickle
                pickle.dump(("error", (WorkerError(repr(result[1][0])), result[1][1])), pipe)
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # never return into the parent's stack (atexit, finally blocks, test runners)


def decode_into(out: np.ndarray, lo: int, hi: int, make_read: ReadFactory, workers: int,
                passthrough: tuple[type[BaseException], ...] = ()) -> list[tuple[int, str]]:
    """Decode items ``lo..hi-1`` into ``out[lo:hi]``; return sorted (index, reason) of unreadable ones.

    ``out`` must come from :func:`shared_images` when ``workers > 1``. A worker's exception of a
    ``passthrough`` type (e.g. an unsafe archive member) is raised again here; any other becomes
    :class:`WorkerError` with the worker's traceback.
    """
    workers = max(1, min(workers, (hi - lo) // MIN_PER_WORKER))
    if workers == 1 or not hasattr(os, "fork"):
        return _decode_range(out, lo, hi, make_read)
    # Plain os.fork rather than multiprocessing: it also works inside daemonic
    # processes (Celery or executor workers), where multiprocessing refuses children.
    Image.init()  # load Pillow's plugins once, before forking, not in every worker
    bounds = np.linspace(lo, hi, workers + 1).astype(int)
    jobs: list[tuple[int, int, int, int]] = []
    try:
        for a, b in zip(bounds[:-1], bounds[1:]):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _run_child(write_fd, out, int(a), int(b), make_read)
            os.close(write_fd)
            jobs.append((pid, read_fd, int(a), int(b)))
        bad, errors = _collect(jobs)
    finally:  # interrupted (task timeout, Ctrl-C) or a failed fork: leave no worker behind
        for pid, read_fd, _, _ in jobs:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if read_fd >= 0:
                os.close(read_fd)
    for exc, trace in errors:
        if isinstance(exc, passthrough):
            raise exc
        raise WorkerError(f"decode worker failed: {type(exc).__name__}: {exc}\n{trace}".rstrip()) from exc
    return sorted(bad)


def _collect(jobs: list[tuple[int, int, int, int]]) -> tuple[list[tuple[int, str]], list]:
    """Read each worker's result and reap it, removing it from ``jobs``; return (unreadable, errors)."""
    bad: list[tuple[int, str]] = []
    errors = []
    while jobs:
        pid, read_fd, a, b = jobs[0]
        with os.fdopen(read_fd, "rb") as pipe:
            jobs[0] = (pid, -1, a, b)  # the descriptor now belongs to ``pipe``
            try:
                status, payload = pickle.load(pipe)
            except (EOFError, pickle.UnpicklingError):
                status, payload = "died", None
        exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        jobs.pop(0)
        if status == "ok":
            bad.extend(payload)
        elif status == "error":
            errors.append(payload)
        else:
            errors.append((WorkerError(f"decode worker for items {a}..{b - 1} died with exit code {exit_code}; "
                                       "rerun with decode_workers=1 to see the error in-process"), ""))
    return bad, errors
