"""Scheduled retraining under Airflow's real scheduler, with nobody triggering anything.

The local stack's Airflow (``make up PARTS=airflow``: its components as processes, LocalExecutor
on SQLite) loads the DAG with a ten-second schedule from ``CIFAR10_SCHEDULE`` (cron with a
seconds field); the DAG is active on creation, so the scheduler starts runs by itself. Each run
takes much longer than ten seconds, so runs fall due while one is running. The scenario waits for two scheduled runs to finish, then
stops Airflow, and the tests read what happened from Airflow's metadata database, the MLflow
registry and the BentoML store:

- ``max_active_runs=1``: the second run started only after the first ended, though runs fell
  due meanwhile;
- ``catchup=False``: the due times missed during the first run were not backfilled: the second
  run is for a recent due time, not the one after the first's, and nothing lies between the two;
- the second run trains the same data with the same seed, so it ties; a tie does not beat the
  champion by ``min_improvement``, so the champion, the Bento and what a server serves from
  the store stay the first run's.
- the tasks saw the stack's environment (data URL, recipe), since nothing passed them params.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.helpers import bentoml_cli_json, bentoml_serve, free_port, image_folder_zip, stack, state_env

DAG_ID = "cifar10_pipeline"
MODEL = "cifar10-cnn"
RUNS = 2
# The schedule's period: short, so that several due times pass during one tiny run.
PERIOD = timedelta(seconds=10)
# Two tiny runs and Airflow's start-up; generous for a busy 2-core machine.
SCENARIO_TIMEOUT_S = 1500
BENTO_TASKS = ("import_model", "build", "containerize", "verify", "promote", "publish")


@dataclass(frozen=True)
class Run:
    run_id: str
    run_type: str
    state: str
    logical_date: datetime
    start_date: datetime
    end_date: datetime | None
    tasks: dict[str, str]


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=None)


def _runs(db: Path) -> list[Run]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        try:
            rows = con.execute("SELECT run_id, run_type, state, logical_date, start_date, end_date FROM dag_run "
                               "WHERE dag_id = ? ORDER BY logical_date", (DAG_ID,)).fetchall()
            tasks = con.execute("SELECT run_id, task_id, state FROM task_instance WHERE dag_id = ?",
                                (DAG_ID,)).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []
    by_run: dict[str, dict[str, str]] = {}
    for run_id, task_id, state in tasks:
        by_run.setdefault(run_id, {})[task_id] = state
    return [Run(r[0], r[1], r[2], _when(r[3]), _when(r[4]), _when(r[5]), by_run.get(r[0], {}))
            for r in rows if r[4] is not None]


@dataclass(frozen=True)
class Scenario:
    env: dict[str, str]
    runs: list[Run]
    bentos_after_first: list[str]
    logs: Path


def _stack(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return stack(env, command, "airflow")


def _bento_tags(env: dict[str, str]) -> list[str]:
    return sorted(b["tag"] for b in bentoml_cli_json(env, "list"))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    work = tmp_path_factory.mktemp("scheduled")
    archive = image_folder_zip(work / "data.zip", per_class=12)
    state = work / "state"
    env = state_env(
        state,
        AIRFLOW_PORT=str(free_port()),
        CIFAR10_SCHEDULE="* * * * * */10",
        # The scheduler's next due time is as fresh as the DAG file's last parse (30 s by default).
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
        # What scheduled runs train on: they get no params, only the stack's environment.
        CIFAR10_DATA_URL=archive.as_uri(),
        CIFAR10_RECIPE="tiny",
        CIFAR10_EPOCHS="1",
        CIFAR10_WIDTHS="8,16",
        CIFAR10_BATCH_SIZE="32",
        CIFAR10_CONTAINER_BACKEND="none",
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="60",
    )
    db = state / "airflow" / "airflow.db"
    started = _stack("up", env)
    bentos_after_first: list[str] = []
    try:
        assert started.returncode == 0, f"up airflow failed:\n{started.stdout}\n{started.stderr}"
        deadline = time.monotonic() + SCENARIO_TIMEOUT_S
        while True:
            runs = _runs(db)
            done = [r for r in runs if r.state in ("success", "failed")]
            if not bentos_after_first and done:
                bentos_after_first = _bento_tags(env)
            if len(done) >= RUNS:
                break
            if any(r.state == "failed" for r in runs):
                break
            assert time.monotonic() < deadline, f"{len(done)} of {RUNS} scheduled runs ended in time: {runs}"
            time.sleep(5)
    finally:
        stopped = _stack("down", env)
    assert stopped.returncode == 0, stopped.stderr
    return Scenario(env=env, runs=_runs(db), bentos_after_first=bentos_after_first, logs=state / "airflow" / "logs")


def _first_two(scenario: Scenario) -> tuple[Run, Run]:
    failed = [r for r in scenario.runs if r.state == "failed"]
    assert not failed, f"a scheduled run failed: {failed}; task logs under {scenario.logs}"
    first, second = scenario.runs[:2]
    return first, second


def test_the_scheduler_started_the_runs_by_itself(scenario):
    first, second = _first_two(scenario)
    assert (first.run_type, second.run_type) == ("scheduled", "scheduled")
    assert (first.state, second.state) == ("success", "success"), scenario.runs
    # Every run is for a due time of the schedule.
    for run in (first, second):
        assert run.logical_date.second % 10 == 0 and run.logical_date.microsecond == 0, run


def test_a_due_run_waits_while_one_runs(scenario):
    first, second = _first_two(scenario)
    # Runs fell due while the first one ran...
    assert first.end_date - first.logical_date >= 3 * PERIOD, first
    # ...but none started before it had ended.
    assert second.start_date >= first.end_date, (first, second)
    for run in scenario.runs[1:]:
        assert run.start_date >= first.end_date, run


def test_missed_due_times_are_not_backfilled(scenario):
    first, second = _first_two(scenario)
    # The scenario needs a first run long enough for several due times to pass during it.
    assert first.end_date - first.logical_date >= 3 * PERIOD, first
    # The second run is not for the due time after the first's: those in between were skipped...
    assert second.logical_date - first.logical_date >= 2 * PERIOD, (first, second)
    # ...it is for a recent one ("recent" allows for the scheduler's view of the next due time,
    # as old as the DAG file's last parse, every 5 s here).
    assert first.end_date - 3 * PERIOD <= second.logical_date <= second.start_date, (first, second)


def test_the_first_run_promoted_and_built_the_bento(scenario):
    first, _ = _first_two(scenario)
    assert first.tasks["register"] == "success"
    assert first.tasks["gate"] == "success"
    assert first.tasks["build"] == "success"
    assert len(scenario.bentos_after_first) == 1, scenario.bentos_after_first


def test_a_run_that_does_not_beat_the_champion_changes_nothing_served(scenario):
    from mlflow import MlflowClient

    _, second = _first_two(scenario)
    assert {t: second.tasks[t] for t in BENTO_TASKS} == {t: "skipped" for t in BENTO_TASKS}, second.tasks

    uri = scenario.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not another test's process-wide registry URI
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert set(versions) >= {"1", "2"}
    accuracies = [float(client.get_run(versions[v].run_id).data.metrics["test_accuracy"]) for v in ("1", "2")]
    assert versions["2"].tags["gate_decision"] == "rejected", (versions["2"].tags, accuracies)
    assert "does not beat the champion's" in versions["2"].tags["gate_reason"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    assert _bento_tags(scenario.env) == scenario.bentos_after_first
    log = scenario.logs.parent / "serve-after-second-run.log"
    with bentoml_serve("cifar10-classifier:latest", scenario.env, log) as url:
        served = requests.post(f"{url}/metadata", json={}, timeout=30).json()
    assert served["mlflow_version"] == "1", served
    assert served["mlflow_run_id"] == versions["1"].run_id
    assert served["bento_tag"] == scenario.bentos_after_first[0]
