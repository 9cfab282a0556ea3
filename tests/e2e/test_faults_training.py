"""Faults during training, on a real ``airflow dags test`` run of the DAG (tiny recipe, generated data).

- The training process is SIGKILLed in the middle of training; the DAG is run again and
  completes, the killed MLflow run is marked KILLED and nothing it half-wrote is used.
- The MLflow server is down when training starts; the task fails within seconds with a
  message that says what to do, Airflow retries it, and it succeeds once the server is up.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from tests.helpers import BIN, bentoml_cli_json, free_port, run_dag, start_dag, state_env, stop_server
from tests.helpers import image_folder_zip
from training.registry.tracking import CONNECT_TIMEOUT_S

MODEL = "cifar10-cnn"
# Enough tiny epochs that training lasts long enough to be killed in the middle.
KILL_EPOCHS = 25
BASE_CONF = {"recipe": "tiny", "container_backend": "none"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return image_folder_zip(tmp_path_factory.mktemp("faults-data") / "cifar-mini.zip", per_class=30, fmt="PNG")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    """Poll ``log`` until ``pattern`` matches; fail if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        if proc.poll() is not None:
            pytest.fail(f"airflow exited ({proc.returncode}) before {pattern!r}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {pattern!r} after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _train_tries(state: Path) -> list[tuple[int, str, float]]:
    """(try number, state, seconds) of every try of the train task, from Airflow's own database."""
    with sqlite3.connect(state / "airflow" / "airflow.db") as db:
        rows = db.execute("SELECT try_number, state, start_date, end_date FROM task_instance_history "
                          "WHERE task_id = 'train' UNION ALL SELECT try_number, state, start_date, end_date "
                          "FROM task_instance WHERE task_id = 'train'").fetchall()
    seconds = [(datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if end else -1.0
               for _, _, start, end in rows]
    return sorted((int(t), s, sec) for (t, s, _, _), sec in zip(rows, seconds))


def test_killed_training_leaves_nothing_that_a_rerun_uses(archive, tmp_path):
    state = tmp_path / "state"
    env = state_env(state, CIFAR10_DATA_ROOTS=str(archive.parent))
    conf = {**BASE_CONF, "epochs": KILL_EPOCHS, "data_url": archive.as_uri()}
    first = tmp_path / "dag-run-killed.log"
    started = time.monotonic()
    proc = start_dag(env, conf, first)
    try:
        # Epoch 1 is logged (and sent to MLflow) at its end: the kill lands in a later epoch.
        _wait_for(first, rf"epoch 1/{KILL_EPOCHS} ", proc, timeout=600)
        # `airflow dags test` trains inside its own process: make sure this is the one with TensorFlow loaded.
        assert "tensorflow" in Path(f"/proc/{proc.pid}/maps").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and anything it had started
        except ProcessLookupError:
            pass
        proc.wait()
    killed_after = time.monotonic() - started

    uri = env["MLFLOW_TRACKING_URI"]
    client = _client(uri)
    experiment = client.get_experiment_by_name("cifar10")
    [orphan] = client.search_runs([experiment.experiment_id])
    epochs_done = len(client.get_metric_history(orphan.info.run_id, "val_accuracy"))
    assert orphan.info.status == "RUNNING" and 1 <= epochs_done < KILL_EPOCHS, (orphan.info, epochs_done)
    assert orphan.data.tags["airflow_task_id"] == "train" and orphan.data.tags["airflow_try_number"] == "1"

    second = tmp_path / "dag-run-after-kill.log"
    rerun_started = time.monotonic()
    result = run_dag(env, conf, second)
    rerun_seconds = time.monotonic() - rerun_started
    log = second.read_text()
    assert result.returncode == 0, log[-5000:]
    assert f"marked MLflow run {orphan.info.run_id} KILLED" in log

    orphan = client.get_run(orphan.info.run_id)
    assert orphan.info.status == "KILLED" and "died without ending it" in orphan.data.tags["ended_by"]
    assert not client.list_artifacts(orphan.info.run_id, "onnx")  # it never got as far as a model
    runs = client.search_runs([experiment.experiment_id])
    [fresh] = [r for r in runs if r.info.run_id != orphan.info.run_id]
    assert fresh.info.status == "FINISHED"
    assert len(client.get_metric_history(fresh.info.run_id, "val_accuracy")) == KILL_EPOCHS

    # Only the finished run reached the registry, the BentoML store and the Bento.
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert [v.run_id for v in versions] == [fresh.info.run_id]
    assert client.get_model_version_by_alias(MODEL, "champion").run_id == fresh.info.run_id
    tags = [m["tag"] for m in bentoml_cli_json(env, "models", "list")]
    labels = [bentoml_cli_json(env, "models", "get", t).get("labels") or {} for t in tags]
    assert [lb.get("mlflow_run_id") for lb in labels] == [fresh.info.run_id]
    assert any(b["tag"].startswith("cifar10-classifier:") for b in bentoml_cli_json(env, "list"))
    print(f"\nkill: SIGKILL after {killed_after:.0f} s with {epochs_done}/{KILL_EPOCHS} epochs logged; "
          f"rerun completed in {rerun_seconds:.0f} s")


def _start_mlflow_server(port: int, folder: Path, env: dict[str, str]) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    server_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    with open(folder / "server.log", "w") as out:
        return subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            env=server_env, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_mlflow_outage_fails_fast_and_the_retry_succeeds_once_it_is_back(archive, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = tmp_path / "state"
    # `mlflow server` took up to 2.3 minutes to come up on the loaded 2-core machine: enough
    # retries, each failing within seconds, to outlast that.
    env = state_env(state, MLFLOW_TRACKING_URI=url, CIFAR10_TASK_RETRIES="12", CIFAR10_RETRY_DELAY_SECONDS="15",
                    CIFAR10_DATA_ROOTS=str(archive.parent))
    log = tmp_path / "dag-run.log"
    proc = start_dag(env, {**BASE_CONF, "data_url": archive.as_uri()}, log)
    server = None
    try:
        message = _wait_for(log, rf"MLflow tracking server {re.escape(url)} is unreachable[^\n]*", proc, 600)
        outage_seen = time.monotonic()
        server = _start_mlflow_server(port, tmp_path / "mlflow-server", env)
        while True:  # the time the server needs to come up is part of the outage
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None, (tmp_path / "mlflow-server" / "server.log").read_text()[-3000:]
            assert time.monotonic() - outage_seen < 180, "mlflow server did not come up in 180 s"
            time.sleep(0.5)
        server_up_after = time.monotonic() - outage_seen
        assert proc.wait(900) == 0, log.read_text()[-5000:]

        assert "Start the server, or point MLFLOW_TRACKING_URI" in message.group(0)
        tries = _train_tries(state)
        assert tries[-1][1] == "success" and [t[0] for t in tries] == list(range(1, len(tries) + 1)), tries
        failed = tries[:-1]
        assert failed and all(state_ in ("failed", "up_for_retry") for _, state_, _ in failed), tries
        # Each failed try ended within seconds, not after MLflow's minutes of HTTP retries.
        assert all(seconds < CONNECT_TIMEOUT_S + 30 for _, _, seconds in failed), tries

        client = _client(url)
        [run] = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.tags["airflow_try_number"] == str(tries[-1][0])
        assert [v.run_id for v in client.search_model_versions(f"name='{MODEL}'")] == [run.info.run_id]
        print(f"\noutage: tries {tries}; mlflow server healthy {server_up_after:.0f} s after the failure was seen")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if server is not None:
            stop_server(server)
