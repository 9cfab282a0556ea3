"""Drift-triggered retraining under Airflow's real scheduler, with nobody triggering anything.

A real ``bentoml serve`` of a model that carries its training data's drift reference, and the
local stack's Airflow (``make up PARTS=airflow``: scheduler, DAG processor, API server) with
the drift monitor on a ten-second schedule and the pipeline on the drift asset alone. In order:

1. images like the training data: the monitor's checks pass, emit nothing, and no pipeline run starts;
2. inverted images fill the service's window: a check emits one ``cifar10_drift`` event, and the
   scheduler itself starts an ``asset_triggered`` run of ``cifar10_pipeline`` for that event;
3. the later checks of the same episode are within the cooldown: still one event, one run.

The tests read what happened from Airflow's metadata database and the MLflow store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.helpers import (ServingModel, encode, free_port, make_serving_model, natural_images, serve_service, stack,
                           state_env, stop_server)
from training.config import PipelineConfig

MONITOR, PIPELINE = "cifar10_drift_monitor", "cifar10_pipeline"
THRESHOLD = PipelineConfig().drift_threshold  # the defaults are what is tested
MIN_IMAGES = PipelineConfig().drift_min_images
WINDOW = PipelineConfig().drift_min_images  # the service's window (CIFAR10_DRIFT_WINDOW): the fewest judged
SCENARIO_TIMEOUT_S = 900


def _db(state: Path, query: str, *args) -> list[tuple]:
    db = state / "airflow" / "airflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        try:
            return con.execute(query, args).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []


def _monitor_runs(state: Path) -> list[dict]:
    """The monitor's ended runs, oldest first, with each task's state."""
    rows = _db(state, "SELECT r.run_id, r.state, t.task_id, t.state FROM dag_run r JOIN task_instance t "
                      "ON t.dag_id = r.dag_id AND t.run_id = r.run_id WHERE r.dag_id = ? "
                      "AND r.state IN ('success', 'failed') ORDER BY r.start_date", MONITOR)
    runs: dict[str, dict] = {}
    for run_id, state, task, task_state in rows:
        runs.setdefault(run_id, {"run_id": run_id, "state": state})[task] = task_state
    return list(runs.values())


def _pipeline_runs(state: Path) -> list[tuple[str, str]]:
    return _db(state, "SELECT run_id, run_type FROM dag_run WHERE dag_id = ? ORDER BY id", PIPELINE)


def _events(state: Path) -> list[dict]:
    rows = _db(state, "SELECT e.id, e.source_dag_id, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                      "WHERE a.uri = 'cifar10://serving/drift' ORDER BY e.id")
    return [{"id": i, "source_dag_id": dag, "extra": json.loads(extra or "{}")} for i, dag, extra in rows]


def _send(url: str, images) -> None:
    with requests.Session() as http:
        for i, img in enumerate(images):
            resp = http.post(f"{url}/predict/", files={"file": (f"{i}.png", encode(img), "image/png")}, timeout=30)
            assert resp.status_code == 200, resp.text


def _wait(what: str, condition, deadline: float, state: Path):
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, (f"timed out waiting for {what}; monitor runs: {_monitor_runs(state)}, "
                                             f"task logs under {state / 'airflow' / 'logs'}")
        time.sleep(3)


@dataclass(frozen=True)
class Scenario:
    env: dict[str, str]
    state: Path
    calm: list[dict]  # monitor runs that ended while the service saw training-like images
    pipeline_runs_when_calm: list[tuple[str, str]]
    after_event: list[dict]  # monitor runs that ended after the drift event


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    work = tmp_path_factory.mktemp("drift")
    state = work / "state"
    home = state / "bentoml"
    model = ServingModel(home=home, tag=make_serving_model(home), labels={}, metadata={})
    server, url = serve_service(model, work / "serve.log", {"CIFAR10_WORKERS": "1",
                                                            "CIFAR10_DRIFT_WINDOW": str(WINDOW)})
    env = state_env(
        state,
        AIRFLOW_PORT=str(free_port()),
        CIFAR10_SCHEDULE="none",  # the pipeline runs on drift events alone here
        CIFAR10_MONITOR_SCHEDULE="* * * * * */10",
        CIFAR10_MONITOR_URL=url,
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
        # The test is about the trigger, not the training (other tests run the pipeline): the triggered
        # run's fetch fails at once on a missing archive, so it takes no CPU from the checks.
        CIFAR10_DATA_URL=(work / "no-such-archive.zip").as_uri(),
        CIFAR10_TASK_RETRIES="0",
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="60",
    )
    like_training = natural_images(WINDOW + 20, seed=11)  # the model's reference is natural_images too
    try:
        _send(url, like_training)
        started = stack(env, "up", "airflow")
        assert started.returncode == 0, f"up airflow failed:\n{started.stdout}\n{started.stderr}"
        deadline = time.monotonic() + SCENARIO_TIMEOUT_S
        # Two checks that saw the calm window (the first may have run while the DAGs were loading).
        calm = _wait("two checks of the calm service", lambda: (r := _monitor_runs(state))[1:] and r, deadline,
                     state)
        pipeline_runs_when_calm = _pipeline_runs(state)
        _send(url, 255 - like_training)  # inverted colours: the whole window drifts
        _wait("a drift event", lambda: _events(state), deadline, state)
        _wait("the scheduler to start the pipeline", lambda: _pipeline_runs(state), deadline, state)
        seen = len(_monitor_runs(state))
        after = _wait("two more checks after the event", lambda: (r := _monitor_runs(state))[seen + 1:] and r[seen:],
                      deadline, state)
    finally:
        stopped = stack(env, "down", "airflow")
        stop_server(server)
    assert stopped.returncode == 0, stopped.stderr
    return Scenario(env, state, calm, pipeline_runs_when_calm, after)


def test_training_like_traffic_is_checked_and_starts_nothing(scenario):
    assert all(r["state"] == "success" and r["observe"] == "success" for r in scenario.calm), scenario.calm
    assert all(r["emit"] == "skipped" for r in scenario.calm), scenario.calm
    assert scenario.pipeline_runs_when_calm == []


def test_drift_emits_an_event_and_the_scheduler_starts_the_pipeline_for_it(scenario):
    events = _events(scenario.state)
    assert len(events) == 1, events
    assert events[0]["source_dag_id"] == MONITOR
    assert events[0]["extra"]["drift_score"] >= THRESHOLD and events[0]["extra"]["window_images"] >= MIN_IMAGES
    runs = _pipeline_runs(scenario.state)
    assert [kind for _, kind in runs] == ["asset_triggered"], runs
    # The run is the scheduler's answer to that very event.
    linked = _db(scenario.state, "SELECT l.event_id FROM dagrun_asset_event l JOIN dag_run r ON r.id = l.dag_run_id "
                                 "WHERE r.run_id = ?", runs[0][0])
    assert [e for (e,) in linked] == [events[0]["id"]]


def test_one_drift_episode_starts_one_retraining(scenario):
    assert scenario.after_event and all(r["emit"] == "skipped" for r in scenario.after_event), scenario.after_event
    assert len(_events(scenario.state)) == 1
    assert len(_pipeline_runs(scenario.state)) == 1


def test_every_check_is_in_mlflow_with_the_drift_plot(scenario, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(scenario.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cifar10-monitoring")
    (run,) = client.search_runs([experiment.experiment_id])
    scores = [m.value for m in client.get_metric_history(run.info.run_id, "drift_score")]
    assert scores[0] < THRESHOLD <= scores[-1], scores
    assert [m.value for m in client.get_metric_history(run.info.run_id, "drift_event")].count(1.0) == 1
    assert Path(client.download_artifacts(run.info.run_id, "drift.png", str(tmp_path))).stat().st_size > 10_000
