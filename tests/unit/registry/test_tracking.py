"""The MLflow preflight: an unreachable tracking server fails within the timeout, saying what to do."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.helpers import free_port
from training.registry.tracking import TrackingServerUnreachable, check_reachable


def _serve(status: int):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_nothing_listening_fails_within_the_timeout_with_what_to_do():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingServerUnreachable) as info:
        check_reachable(url, timeout=2)
    assert time.monotonic() - start < 4
    message = str(info.value)
    assert f"MLflow tracking server {url} is unreachable" in message
    assert "ConnectionError" in message and "within 2 s" in message
    assert "Start the server, or point MLFLOW_TRACKING_URI" in message and "CIFAR10_MLFLOW_CONNECT_TIMEOUT" in message


@pytest.mark.parametrize("status", [200, 401, 404])
def test_any_answer_from_the_server_counts_as_reachable(status):
    server = _serve(status)
    try:
        check_reachable(f"http://127.0.0.1:{server.server_port}", timeout=2)
    finally:
        server.shutdown()


def test_a_proxy_answering_502_is_not_reachable():
    server = _serve(502)
    try:
        with pytest.raises(TrackingServerUnreachable, match="HTTP 502"):
            check_reachable(f"http://127.0.0.1:{server.server_port}", timeout=1.5)
    finally:
        server.shutdown()


def test_passwords_are_masked_and_local_stores_are_not_checked():
    with pytest.raises(TrackingServerUnreachable) as info:
        check_reachable(f"http://user:s3cret@127.0.0.1:{free_port()}", timeout=1)
    assert "s3cret" not in str(info.value) and "user:***@" in str(info.value)
    check_reachable("sqlite:////nonexistent/mlflow.db", timeout=1)  # no server involved: returns at once
