"""Runs left RUNNING by killed tries of the train task are closed by the next try, and only those."""

from __future__ import annotations

import pytest
from tests.helpers import shared_store, store_overrides

from training.registry.attempts import TaskAttempt, end_orphaned_runs
from training.config import load_config


@pytest.fixture
def store(tmp_path_factory, request):
    """(client, experiment id) in the session's SQLite store, one experiment per test."""
    from mlflow import MlflowClient

    from training.registry.tracking import configure_mlflow

    config = load_config({"state_dir": str(tmp_path_factory.mktemp("attempts")),
                          **store_overrides(shared_store(tmp_path_factory), f"attempts-{request.node.name}")},
                         environ={})
    experiment_id = configure_mlflow(config)
    return MlflowClient(tracking_uri=config.tracking_uri), experiment_id


def _run(client, experiment_id, attempt: TaskAttempt, status: str = "RUNNING") -> str:
    run = client.create_run(experiment_id, tags=attempt.tags())
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def test_only_runs_that_other_tries_left_running_are_killed(store):
    client, exp = store
    now = TaskAttempt("cifar10_pipeline", "manual__2", "train", 2)
    earlier_try = _run(client, exp, TaskAttempt("cifar10_pipeline", "manual__2", "train", 1))
    abandoned_dag_run = _run(client, exp, TaskAttempt("cifar10_pipeline", "manual__1", "train", 1))
    finished = _run(client, exp, TaskAttempt("cifar10_pipeline", "manual__1", "train", 2), "FINISHED")
    failed = _run(client, exp, TaskAttempt("cifar10_pipeline", "manual__0", "train", 1), "FAILED")
    other_dag = _run(client, exp, TaskAttempt("another_dag", "manual__2", "train", 1))
    other_task = _run(client, exp, TaskAttempt("cifar10_pipeline", "manual__2", "evaluate", 1))
    untagged = client.create_run(exp).info.run_id  # e.g. a notebook run

    assert sorted(end_orphaned_runs(client, exp, now)) == sorted([earlier_try, abandoned_dag_run])

    status = {r: client.get_run(r).info.status for r in
              (earlier_try, abandoned_dag_run, finished, failed, other_dag, other_task, untagged)}
    assert status == {earlier_try: "KILLED", abandoned_dag_run: "KILLED", finished: "FINISHED",
                      failed: "FAILED", other_dag: "RUNNING", other_task: "RUNNING", untagged: "RUNNING"}
    reason = client.get_run(earlier_try).data.tags["ended_by"]
    assert "try 2 of manual__2" in reason and "try 1 of manual__2 died" in reason
    assert end_orphaned_runs(client, exp, now) == []  # nothing left to close


def test_a_try_never_ends_its_own_run(store):
    client, exp = store
    now = TaskAttempt("cifar10_pipeline", "manual__3", "train", 1)
    own = _run(client, exp, now)
    assert end_orphaned_runs(client, exp, now) == []
    assert client.get_run(own).info.status == "RUNNING"


def test_attempt_is_read_from_the_task_instance():
    class TI:
        dag_id, run_id, task_id, try_number = "d", "r", "train", 3

    attempt = TaskAttempt.of(TI())
    assert attempt == TaskAttempt("d", "r", "train", 3)
    assert attempt.tags() == {"airflow_dag_id": "d", "airflow_run_id": "r", "airflow_task_id": "train",
                              "airflow_try_number": "3"}
