"""The one readiness wait, and the servers started with it: ready at /readyz 200, failing early with the log."""

from __future__ import annotations

import contextlib
import socket
import sys
import time

import pytest

from training.packaging.server import (LISTEN_PORTS, NotReady, free_port, running_server, start_server,
                                       wait_ready)

# A server whose /readyz answers 503 for a second, then 200.
READY_LATER = """
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
ready_at = time.monotonic() + 1
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" and time.monotonic() > ready_at else 503)
        self.end_headers()
HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except OSError:  # not Linux
        return 32768


def test_free_port_is_unbound_and_below_the_ephemeral_range():
    port = free_port()
    assert port in LISTEN_PORTS and port < _ephemeral_start()
    with socket.socket() as s:
        s.bind(("", port))  # raises if anything holds it


def test_free_port_never_hands_out_a_port_twice_before_it_is_bound(monkeypatch):
    """Two servers given ports one after the other, before either listens, must not get the same one."""
    import training.packaging.server as server

    monkeypatch.setattr(server, "LISTEN_PORTS", range(1000, 1200))  # as many ports as one call tries
    monkeypatch.setattr(server, "_HANDED_OUT", server.deque(maxlen=1000))
    unbound = type("Unbound", (), {"bind": lambda self, address: None})()  # every port is free to bind
    monkeypatch.setattr(server.socket, "socket", lambda: contextlib.nullcontext(unbound))
    assert len({server.free_port() for _ in range(200)}) == 200
    with pytest.raises(OSError, match="no free TCP port in 1000-1199"):
        server.free_port()


def test_a_startup_failure_in_the_log_fails_at_once():
    started = time.monotonic()
    with pytest.raises(NotReady, match="(?s)exited before it was ready; its log ends:\n.*Application startup failed"):
        wait_ready(f"http://127.0.0.1:{free_port()}", timeout=60, alive=lambda: True,
                   log=lambda: "...\nERROR: Application startup failed. Exiting.\n")
    assert time.monotonic() - started < 5


def test_a_server_that_exits_fails_at_once_with_its_log(tmp_path):
    started = time.monotonic()
    with pytest.raises(NotReady, match="exited before it was ready; its log ends:\nno model here"):
        start_server(["sh", "-c", "echo no model here; exit 3"], tmp_path / "serve.log", free_port(), timeout=60)
    assert time.monotonic() - started < 5


def test_a_slow_server_fails_after_the_timeout_with_its_log(tmp_path):
    port = free_port()
    with pytest.raises(NotReady, match=f"http://127.0.0.1:{port}/readyz did not answer 200 within 0.5 s"):
        start_server(["sh", "-c", "echo loading; sleep 30"], tmp_path / "serve.log", port, timeout=0.5)


def test_a_server_is_yielded_once_ready_and_stopped_after(tmp_path):
    port = free_port()
    with running_server([sys.executable, "-c", READY_LATER, str(port)], tmp_path / "serve.log", port,
                        timeout=60) as url:
        assert url == f"http://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5)
