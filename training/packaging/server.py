"""Servers the pipeline, the tests and the benchmarks start: a free port, one readiness wait, a clean stop."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# A port from bind(0) lies in the kernel's ephemeral range, where outgoing connections take their
# source ports too, and one of those can take it in the seconds a server needs before it listens.
# Servers started here listen below that range (Linux starts it at 32768), where only listeners go.
LISTEN_PORTS = range(20000, 32768)
# Ports this process handed out lately: free when chosen, but their server may not listen yet, so a second
# draw could return the same one to another server (a stack's S3 and front door once got one port).
_HANDED_OUT: deque[int] = deque(maxlen=1000)
# What BentoML logs when the service's __init__ raises; its supervisor then keeps restarting the
# worker, so the server process itself never exits.
STARTUP_FAILED = "Application startup failed"


class NotReady(RuntimeError):
    """A server did not answer /readyz with 200: it exited, failed to start, or took too long."""


def free_port() -> int:
    """A TCP port nothing is bound to on any interface, from :data:`LISTEN_PORTS`, and none this process
    handed out among its last 1,000."""
    for port in random.sample(LISTEN_PORTS, 200):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every interface: a container runtime publishes there
            except OSError:
                continue
        _HANDED_OUT.append(port)
        return port
    raise OSError(f"no free TCP port in {LISTEN_PORTS.start}-{LISTEN_PORTS.stop - 1} after 200 tries")


def read_log(path: Path) -> str:
    """The server log at ``path`` so far ("" before the server wrote it)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _ready(url: str, path: str = "/readyz") -> bool:
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=5) as resp:
            return resp.status == 200
    except (OSError, http.client.HTTPException):  # not listening yet, or still loading the model
        return False


def wait_ready(url: str, timeout: float, alive: Callable[[], bool], log: Callable[[], str],
               every: float = 0.5, path: str = "/readyz") -> None:
    """Return once ``url`` + ``path`` answers 200, polling every ``every`` seconds.

    Raises :class:`NotReady` with the end of ``log()`` as soon as ``alive()`` is false or the log says
    the application failed to start (a server with one broken worker is not ready), or after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        exited = not alive()
        text = log()
        if exited or STARTUP_FAILED in text:
            raise NotReady(f"{url}: the service exited before it was ready; its log ends:\n{text[-3000:]}")
        if _ready(url, path):
            return
        if time.monotonic() > deadline:
            raise NotReady(f"{url}{path} did not answer 200 within {timeout:g} s (the pipeline's "
                           f"served_start_timeout); its log ends:\n{text[-3000:]}")
        time.sleep(every)


def bentoml_serve(target: str, port: int, *options: str) -> list[str]:
    """The command serving ``target`` (a Bento tag, or ``service:CIFAR10Classifier`` in a checkout) on
    127.0.0.1:``port``; BentoML would listen on every interface."""
    bentoml = Path(sys.executable).with_name("bentoml")
    return [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(port), *options]


def start_server(argv: list[str], log_path: Path, port: int, timeout: float, env: dict[str, str] | None = None,
                 cwd: Path | None = None, ready: str = "/readyz") -> subprocess.Popen:
    """Start ``argv`` in a session of its own, its output to ``log_path``; return it once
    ``http://127.0.0.1:port`` + ``ready`` answers 200 (:func:`wait_ready`), or stop it and raise."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout, lambda: proc.poll() is None, lambda: read_log(log_path),
                   path=ready)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session, and every process of that session (BentoML's workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # it already exited
        proc.wait()
        return
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def running_server(argv: list[str], log_path: Path, port: int, timeout: float, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> Iterator[str]:
    """:func:`start_server` until the block ends; yields the server's base URL."""
    proc = start_server(argv, log_path, port, timeout, env, cwd)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)
