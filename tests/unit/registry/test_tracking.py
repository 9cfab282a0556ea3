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
    assert "Start the server, or point MLFLOW_TRACKING_URI" in message and "Airflow retries this task" in message


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


# --- git_commit -------------------------------------------------------------------

def test_git_commit_comes_from_git_in_a_checkout(tmp_path, monkeypatch):
    import subprocess

    from training.registry.tracking import git_commit

    monkeypatch.setenv("CIFAR10_GIT_COMMIT", "from-the-image")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(tmp_path) == sha  # git wins over the variable where it works
    (tmp_path / "f").write_text("2")
    assert git_commit(tmp_path) == f"{sha}-dirty"


def test_git_commit_without_git_reads_the_image_variable_at_each_call(tmp_path, monkeypatch):
    from training.registry.tracking import git_commit

    no_repo = tmp_path / "opt"  # like /opt/cifar10 in the Airflow image: no .git above it
    no_repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv("CIFAR10_GIT_COMMIT", raising=False)
    assert git_commit(no_repo) == "unknown"
    monkeypatch.setenv("CIFAR10_GIT_COMMIT", " 0123abcd \n")
    assert git_commit(no_repo) == "0123abcd"
    monkeypatch.setenv("CIFAR10_GIT_COMMIT", "")
    assert git_commit(no_repo) == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git installed at all
    monkeypatch.setenv("CIFAR10_GIT_COMMIT", "feedface")
    assert git_commit(no_repo) == "feedface"
