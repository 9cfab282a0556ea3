"""Every server the make targets start listens on 127.0.0.1 unless ``HOST`` says otherwise.

``make serve``, ``make mlflow-ui``, ``make airflow-ui`` and ``make up`` (Airflow's components, the
MLflow server, the Bento) run for real here, and their listening sockets are read from the kernel
(psutil): a listener on 0.0.0.0, ``::`` or a routable address fails the test, and so does a
missing one (a server that is not there proves nothing). The Bento is built from an untrained model
in a store of its own. The distributed stack's parts are checked in ``tests/e2e/test_scaleout.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import (ROOT, free_port, listeners, make_serving_model, not_loopback, stack_processes, state_env,
                           stop_server)

START_TIMEOUT_S = 600


def _make(target: str, env: dict[str, str], *args: str, **popen) -> subprocess.Popen:
    """``make TARGET`` as from a terminal: its own process group, and Ctrl-C's SIGINT handled by default even
    where this test runs as a background job (which starts with SIGINT ignored, and passes that on)."""
    return subprocess.Popen(["make", "--no-print-directory", target, *args], cwd=ROOT, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **popen)


def _wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet
            pass
        assert proc is None or proc.poll() is None, f"{proc.args} exited with {proc.returncode} before {url} answered"
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {timeout:.0f} s"
        time.sleep(1)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("private") / "state"


@pytest.fixture(scope="module")
def bento(state) -> str:
    """A Bento of an untrained model in ``state``'s store, as the pipeline builds one; its tag."""
    home = state / "bentoml"
    model = make_serving_model(home)
    code = ("from training.config import PipelineConfig; from training.packaging.bento import build_bento; "
            f"print('TAG=' + build_bento(PipelineConfig(state_dir={str(state)!r}), {model!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=state_env(state), capture_output=True,
                         text=True, timeout=600)
    tags = [line[4:] for line in out.stdout.splitlines() if line.startswith("TAG=")]
    assert out.returncode == 0 and tags, out.stdout + out.stderr[-3000:]
    return tags[-1]


def _env(state: Path, **extra: str) -> dict[str, str]:
    # The make targets point Airflow, MLflow and BentoML into STATE themselves.
    env = {k: v for k, v in state_env(state).items()
           if not k.startswith(("AIRFLOW__", "MLFLOW_", "BENTOML_", "CIFAR10_STATE_DIR", "AIRFLOW_HOME"))}
    return {**env, "CIFAR10_SCHEDULE": "none", "CIFAR10_MONITOR_SCHEDULE": "none", **extra}


def test_a_host_from_the_shell_opens_nothing_and_one_on_the_command_line_does(state):
    """zsh sets HOST to the machine's name; only `make ... HOST=` chooses the address."""
    env = {**_env(state), "HOST": "0.0.0.0"}
    dry = subprocess.run(["make", "-n", "serve", "mlflow-ui", "BENTO_TAG=x", f"STATE={state}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert dry.count("--host 127.0.0.1") == 2 and "0.0.0.0" not in dry, dry
    chosen = subprocess.run(["make", "-n", "serve", "BENTO_TAG=x", "HOST=0.0.0.0", f"STATE={state}"], cwd=ROOT,
                            env=env, capture_output=True, text=True, check=True).stdout
    assert "--host 0.0.0.0" in chosen, chosen


def _foreground_listeners(target: str, state: Path, port: int, path: str, *args: str) -> list[tuple[str, str, int]]:
    """Start ``make target`` (a server in the foreground), wait for ``path`` on ``port``, read its listeners, stop it."""
    log = state.parent / f"make-{target}.log"
    with open(log, "w") as out:
        proc = _make(target, _env(state), f"STATE={state}", *args, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}{path}", proc)
        found = listeners({proc.pid})
    finally:
        stop_server(proc)
    assert port in {p for _, _, p in found}, (found, log.read_text()[-2000:])
    return found


def test_make_serve_listens_on_loopback_only(state, bento):
    port = free_port()
    found = _foreground_listeners("serve", state, port, "/readyz", f"PORT={port}", f"BENTO_TAG={bento}")
    assert not not_loopback(found), found


def test_make_mlflow_ui_listens_on_loopback_only(state):
    port = free_port()
    found = _foreground_listeners("mlflow-ui", state, port, "/health", f"MLFLOW_PORT={port}")
    assert not not_loopback(found), found


def test_make_airflow_ui_listens_on_loopback_only_and_stops_with_ctrl_c(state):
    port = free_port()
    log = state.parent / "make-airflow-ui.log"
    with open(log, "w") as out:
        proc = _make("airflow-ui", _env(state), f"STATE={state}", f"AIRFLOW_PORT={port}", stdout=out,
                     stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/v2/monitor/health", proc)
        groups = stack_processes(state)
        assert {"airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"} <= set(groups)
        found = listeners({proc.pid, *groups.values()})
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
        proc.wait(120)
    assert port in {p for _, _, p in found}, (found, log.read_text()[-2000:])
    assert not not_loopback(found), found
    assert not stack_processes(state), "make airflow-ui left Airflow (or its process manager) running after Ctrl-C"


def test_make_up_listens_on_loopback_only_and_keeps_its_secrets_private(state, bento):
    ports = {"AIRFLOW_PORT": free_port(), "MLFLOW_PORT": free_port(), "PORT": free_port()}
    env = _env(state, BENTO_TAG=bento)
    args = [f"STATE={state}", *(f"{k}={v}" for k, v in ports.items())]
    try:
        up = subprocess.run(["make", "--no-print-directory", "up", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1200)
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        groups = stack_processes(state)  # with the process manager itself: it must not listen either
        assert {"supervisord", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                "mlflow", "bento-blue", "follow", "proxy"} <= set(groups), groups
        found = listeners(set(groups.values()))
    finally:
        down = subprocess.run(["make", "--no-print-directory", "down", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert set(ports.values()) <= {p for _, _, p in found}, found
    assert not not_loopback(found), found
    assert down.returncode == 0, down.stderr
    # Listening on loopback keeps other machines out, not other users of this one: the state folder, with
    # the admin's password and the databases, is the owner's alone.
    assert (state / "airflow" / "simple_auth_manager_passwords.json.generated").exists()
    assert state.stat().st_mode & 0o077 == 0, oct(state.stat().st_mode)
