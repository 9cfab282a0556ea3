"""The DAG file: it loads, wires the stages in order, and imports nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


EXPECTED_ORDER = ["fetch", "prepare", "train", "register", "gate", "import_model", "build", "containerize",
                  "verify", "promote", "publish"]


@pytest.fixture(scope="module")
def dag():
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["cifar10_pipeline"]


def test_tasks_and_dependencies(dag):
    assert sorted(dag.task_ids) == sorted(EXPECTED_ORDER)
    up = {t: sorted(dag.get_task(t).upstream_task_ids) for t in dag.task_ids}
    assert up["fetch"] == []
    assert up["prepare"] == ["fetch"]
    assert up["train"] == ["prepare"]
    assert up["register"] == ["prepare", "train"]  # scores both models on the prepared test split
    assert up["gate"] == ["register"]
    assert up["import_model"] == ["gate", "register"]
    assert up["build"] == ["import_model"]
    assert up["containerize"] == ["build"]
    # The served-artifact check runs after the image exists (or was skipped) and before the alias moves.
    assert up["verify"] == ["build", "containerize", "prepare", "register"]
    assert dag.get_task("verify").trigger_rule == "none_failed"
    assert up["promote"] == ["register", "verify"]
    # Serving machines get a Bento only once it is champion; the archive is recorded on its version.
    assert up["publish"] == ["promote", "register", "verify"]


def test_params_retries_timeouts_and_docs(dag):
    for name in ["data_url", "epochs", "batch_size", "seed", "max_train_images", "min_accuracy", "force_promote"]:
        assert name in dag.params, name
    assert dag.doc_md and "champion" in dag.doc_md
    assert dag.max_active_runs == 1
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
        assert task.execution_timeout is not None, task.task_id


def test_rollback_dag_is_one_task_on_demand():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    rollback = bag.dags["cifar10_rollback"]
    assert rollback.task_ids == ["rollback"]
    assert type(rollback.timetable).__name__ == "NullTimetable"  # on demand only
    assert set(rollback.params) == {"version", "reason", "force"}
    # A half-applied rollback is not retried blindly: the operator reads the error first.
    assert rollback.get_task("rollback").retries == 0
    assert "previous champion" in rollback.doc_md


@pytest.mark.parametrize("dag_id, declared", [("cifar10_pipeline", "PIPELINE"), ("cifar10_rollback", "ROLLBACK"),
                                               ("cifar10_drift_monitor", "MONITOR")])
def test_each_dags_params_are_its_declaration(dag_id, declared):
    """One source of truth: the params a run may set are generated from training.params, not retyped."""
    import training.params
    from airflow.dag_processing.dagbag import DagBag

    declaration = getattr(training.params, declared)
    params = DagBag(dag_folder=str(ROOT / "dags")).dags[dag_id].params
    assert list(params) == declaration.names
    for name, expected in declaration.airflow().items():
        assert (params.get_param(name).schema, params.get_param(name).value) == (expected.schema, expected.value)


@pytest.mark.parametrize("dag_file", ["cifar10_pipeline.py", "cifar10_drift_monitor.py", "cifar10_rollback.py"])
def test_parsing_imports_no_heavy_library(dag_file):
    """Parsing a DAG must not import TensorFlow, Keras, MLflow or BentoML (scheduler cost)."""
    code = (
        "import sys, json, runpy; runpy.run_path(sys.argv[1]); "
        "print(json.dumps(sorted(m for m in ('tensorflow', 'keras', 'mlflow', 'bentoml', 'onnxruntime', 'matplotlib', 'requests') "
        "if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / dag_file)],
                         capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _dag_with_env(monkeypatch, dag_id: str = "cifar10_pipeline", **env: str):
    """The DAG as Airflow parses it with ``env`` (and no other schedule settings) in the environment."""
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    for name in ("CIFAR10_SCHEDULE", "CIFAR10_START_PAUSED", "CIFAR10_MONITOR_SCHEDULE", "CIFAR10_TASK_RETRIES",
                 "CIFAR10_RETRY_DELAY_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags[dag_id]


def _scheduler_timetable(dag):
    """The timetable as the scheduler runs it: serialized as the DAG processor stores it, then decoded."""
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable

    return decode_timetable(encode_timetable(dag.timetable))


@pytest.mark.parametrize("schedule", ["@weekly", "*/1 * * * *"])
def test_first_scheduled_run_is_the_next_due_time_never_a_past_one(monkeypatch, schedule):
    """Switching the stack on must not start a training for a due time that already passed."""
    from airflow.timetables.base import TimeRestriction
    from airflow.sdk import timezone

    dag = _dag_with_env(monkeypatch, CIFAR10_SCHEDULE=schedule)
    before = timezone.utcnow()
    info = _scheduler_timetable(dag).next_dagrun_info(last_automated_data_interval=None,
                                          restriction=TimeRestriction(earliest=None, latest=None, catchup=False))
    assert info.run_after > before, (schedule, info.run_after, before)


def test_a_scheduled_dag_is_active_when_airflow_loads_it_unless_told_to_start_paused(monkeypatch):
    assert _dag_with_env(monkeypatch).is_paused_upon_creation is False
    assert _dag_with_env(monkeypatch, CIFAR10_START_PAUSED="true").is_paused_upon_creation is True


def test_min_improvement_is_a_param_with_a_margin_above_zero(dag):
    from training.config import PipelineConfig

    assert "min_improvement" in dag.params
    assert PipelineConfig().min_improvement > 0


def test_dag_retrains_weekly_by_default_without_catchup_one_run_at_a_time(monkeypatch):
    dag = _dag_with_env(monkeypatch)
    assert dag.timetable.timetable.expression == "0 0 * * 0"  # Sunday midnight UTC
    assert dag.catchup is False
    assert dag.max_active_runs == 1


@pytest.mark.parametrize("value,expected", [("0 3 * * 1", "0 3 * * 1"), ("none", None)])
def test_schedule_comes_from_the_environment_and_drift_events_always_start_a_run(monkeypatch, value, expected):
    from airflow.sdk import AssetOrTimeSchedule

    dag = _dag_with_env(monkeypatch, CIFAR10_SCHEDULE=value)
    assert dag.timetable.asset_condition.uri == "cifar10://serving/drift"
    if expected:
        assert isinstance(dag.timetable, AssetOrTimeSchedule)
        assert dag.timetable.timetable.expression == expected
    else:  # no timed runs: the asset alone
        assert not isinstance(dag.timetable, AssetOrTimeSchedule)
    assert "asset" in _scheduler_timetable(dag).summary.lower()
    assert dag.max_active_runs == 1


def test_monitor_observes_on_its_schedule_and_only_emit_produces_the_drift_asset(monkeypatch):
    monitor = _dag_with_env(monkeypatch, "cifar10_drift_monitor")
    assert monitor.timetable.expression == "*/15 * * * *"
    assert monitor.task_ids == ["observe", "emit"]
    assert monitor.get_task("emit").upstream_task_ids == {"observe"}
    assert [a.uri for a in monitor.get_task("emit").outlets] == ["cifar10://serving/drift"]
    assert monitor.get_task("observe").outlets == []  # observing alone never retrains
    assert [a.uri for a in monitor.get_task("observe").inlets] == ["cifar10://serving/drift"]  # the cooldown
    assert monitor.catchup is False and monitor.max_active_runs == 1 and monitor.is_paused_upon_creation is False
    # Where the service is comes from the operator (CIFAR10_MONITOR_URL): a run cannot point the worker elsewhere.
    assert set(monitor.params) == {"drift_threshold", "drift_min_images", "drift_cooldown_hours"}
    for task in monitor.tasks:
        assert task.execution_timeout is not None, task.task_id
    assert "drift_threshold" in monitor.doc_md
    off = _dag_with_env(monkeypatch, "cifar10_drift_monitor", CIFAR10_MONITOR_SCHEDULE="none")
    assert type(off.timetable).__name__ == "NullTimetable"


def test_parse_time_settings_come_from_the_environment_with_their_documented_defaults():
    from training.schedule import DagSettings

    assert DagSettings.from_env({}) == DagSettings("@weekly", "*/15 * * * *", False, 1, 30.0)
    set_ = DagSettings.from_env({"CIFAR10_SCHEDULE": "@daily", "CIFAR10_MONITOR_SCHEDULE": "none",
                                 "CIFAR10_START_PAUSED": "true", "CIFAR10_TASK_RETRIES": "3",
                                 "CIFAR10_RETRY_DELAY_SECONDS": "5"})
    assert set_ == DagSettings("@daily", "none", True, 3, 5.0) and set_.monitor_timetable() is None


def test_the_pipeline_retries_as_the_environment_says(monkeypatch):
    from datetime import timedelta

    dag = _dag_with_env(monkeypatch, CIFAR10_TASK_RETRIES="4", CIFAR10_RETRY_DELAY_SECONDS="7")
    assert {(t.retries, t.retry_delay) for t in dag.tasks} == {(4, timedelta(seconds=7))}
