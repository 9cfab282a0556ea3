"""Drift monitor: check the served model on a schedule; on drift, emit the asset event that retrains.

Wiring only, like the pipeline's DAG: each task is a lazy import and one call into ``training.monitor``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

# These import only the standard library: parsing stays fast.
from training.params import MONITOR
from training.schedule import DagSettings, drift_asset

DOC = """
### Is the served CIFAR-10 model still seeing what it was trained on?

1. **observe**: scrape the service's `/metrics` and `/metadata` at `CIFAR10_MONITOR_URL`: each worker's drift
   score (its last images against the training data's statistics, which travel with the model), the
   predicted-class counts and the confidence histogram. The check is logged to MLflow (experiment
   `cifar10-monitoring`, one run per served Bento, with `drift.png`). It lets **emit** run only when a
   worker with at least `drift_min_images` images scores `drift_threshold` or more, and no drift event
   was emitted in the last `drift_cooldown_hours`.
2. **emit**: an event on the `cifar10_drift` asset, with the evidence as its extra. `cifar10_pipeline`
   is scheduled on that asset: it retrains, and its quality and served-artifact gates decide whether
   anything served changes.

Schedule: `CIFAR10_MONITOR_SCHEDULE` (default every 15 minutes; `none`: off). A service that does not
answer fails the check (an unreachable service is not drift, and a monitor that sees nothing must say so).
"""

SETTINGS = DagSettings.from_env()
DRIFT = drift_asset()


def _config():
    """The monitor's config: environment defaults overridden by this run's params (a conf key that is not one fails)."""
    return MONITOR.for_task(get_current_context())


def _last_event_at():
    """When the last drift event was emitted (any run, any DAG), or None."""
    events = get_current_context()["inlet_events"][DRIFT].ascending(False).limit(1)
    return events[0].timestamp if len(events) else None


@dag(
    dag_id="cifar10_drift_monitor",
    schedule=SETTINGS.monitor_timetable(),
    is_paused_upon_creation=SETTINGS.start_paused,
    catchup=False,  # a missed check is not worth running late: the next one sees the same service
    max_active_runs=1,
    doc_md=DOC,
    # No retries: the next scheduled check is the retry, with fresher numbers.
    default_args={"retries": 0},
    tags=["cifar10", "mlops", "monitoring"],
    params=MONITOR.airflow(),
)
def cifar10_drift_monitor():
    # A falsy return value (no retraining due) skips emit; inlets give the last drift event's time.
    @task.short_circuit(execution_timeout=timedelta(minutes=5), inlets=[DRIFT])
    def observe() -> str:
        from training.monitor.watch import observe as run

        return run(_config(), _last_event_at())

    @task(execution_timeout=timedelta(minutes=2), outlets=[DRIFT])
    def emit(monitoring_run: str) -> str:
        from training.monitor.watch import event_extra

        get_current_context()["outlet_events"][DRIFT].extra = event_extra(_config(), monitoring_run)
        return monitoring_run

    emit(observe())


cifar10_drift_monitor()
