"""Helpers for end-to-end tests: isolated state folders, a real Airflow run, a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True`` and all its children (BentoML workers)."""
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:  # it already exited (a failed start): let the test report why, not this
        proc.wait()
        return
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def state_env(state: Path, **extra: str) -> dict[str, str]:
    """Environment for a pipeline whose whole state lives in ``state``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CIFAR10_", "BENTOML_", "MLFLOW_"))}
    env.update({
        "CIFAR10_STATE_DIR": str(state),
        "AIRFLOW_HOME": str(state / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{state}/airflow/airflow.db",
        "BENTOML_HOME": str(state / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "MLFLOW_TRACKING_URI": f"sqlite:///{state}/mlflow/mlflow.db",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
        # As under make: the project's tools first, so nothing relies on one installed by hand.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    env.update(extra)
    return env


def _migrate(env: dict[str, str]) -> None:
    airflow_home = Path(env["AIRFLOW_HOME"])
    if not (airflow_home / "airflow.db").exists():
        airflow_home.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True,
                       timeout=300)


def start_dag(env: dict[str, str], conf: dict, log: Path) -> subprocess.Popen:
    """Like :func:`run_dag`, but return the running ``airflow dags test`` process (its own session).

    ``airflow dags test`` runs every task inside this one process (no executor), so it
    is also the process that trains.
    """
    _migrate(env)
    with open(log, "w") as out:
        return subprocess.Popen([str(BIN / "airflow"), "dags", "test", "cifar10_pipeline", "-c", json.dumps(conf)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def run_dag(env: dict[str, str], conf: dict, log: Path) -> subprocess.CompletedProcess:
    """``airflow db migrate`` (first time) then ``airflow dags test cifar10_pipeline -c conf``."""
    _migrate(env)
    with open(log, "w") as out:
        return subprocess.run([str(BIN / "airflow"), "dags", "test", "cifar10_pipeline", "-c", json.dumps(conf)],
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1200, cwd=ROOT)


@contextmanager
def bentoml_serve(target: str, env: dict[str, str], log: Path, timeout: float = 120) -> Iterator[str]:
    """Run ``bentoml serve target`` on a free port until /readyz answers; yield the base URL."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", target, "--port", str(port), "--host", "127.0.0.1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or busy starting up
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"bentoml serve not ready after {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_server(proc)


def bentoml_cli_json(env: dict[str, str], *args: str):
    """Run a ``bentoml ... -o json`` command and parse its output."""
    out = subprocess.run([str(BIN / "bentoml"), *args, "-o", "json"], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)
