"""What the DAG files share and read when Airflow parses them: schedules, start paused, retries, the drift asset.

Airflow needs these before any run exists, so they come from the environment of the process that
parses the DAG files, never from a run's params: ``CIFAR10_SCHEDULE`` (the pipeline's cron or preset,
default ``@weekly``; ``none``: drift events and manual runs only), ``CIFAR10_MONITOR_SCHEDULE`` (the
drift monitor's, default every 15 minutes; ``none``: off), ``CIFAR10_START_PAUSED`` and
``CIFAR10_TASK_RETRIES`` / ``CIFAR10_RETRY_DELAY_SECONDS``. ``airflow.sdk`` is imported in the
functions that build its objects; the rest is the standard library, so parsing stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

from training.monitor import DRIFT_ASSET_NAME, DRIFT_ASSET_URI


@dataclass(frozen=True)
class DagSettings:
    schedule: str = "@weekly"
    monitor_schedule: str = "*/15 * * * *"
    # Airflow creates DAGs paused, and a paused weekly DAG never retrains: ours are active once loaded.
    start_paused: bool = False
    retries: int = 1  # of every pipeline task
    retry_delay_s: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DagSettings:
        env = os.environ if environ is None else environ
        default = cls()
        return cls(schedule=env.get("CIFAR10_SCHEDULE", "").strip() or default.schedule,
                   monitor_schedule=env.get("CIFAR10_MONITOR_SCHEDULE", "").strip() or default.monitor_schedule,
                   start_paused=env.get("CIFAR10_START_PAUSED", "").strip().lower() in ("1", "true", "yes"),
                   retries=int(env.get("CIFAR10_TASK_RETRIES", default.retries)),
                   retry_delay_s=float(env.get("CIFAR10_RETRY_DELAY_SECONDS", default.retry_delay_s)))

    def default_args(self) -> dict:
        return {"retries": self.retries, "retry_delay": timedelta(seconds=self.retry_delay_s)}

    def pipeline_schedule(self):
        """At the cron times or on a drift event, whichever comes first; with "none", on drift events only."""
        from airflow.sdk import AssetOrTimeSchedule

        timetable = _cron(self.schedule)
        return drift_asset() if timetable is None else AssetOrTimeSchedule(timetable=timetable, assets=drift_asset())

    def monitor_timetable(self):
        return _cron(self.monitor_schedule)


def drift_asset():
    """The asset the drift monitor emits events on and the pipeline is scheduled on."""
    from airflow.sdk import Asset

    return Asset(DRIFT_ASSET_NAME, uri=DRIFT_ASSET_URI)


def run_name(context) -> str:
    """Which Airflow run did something, as the registry records it."""
    return f"airflow:{context['dag'].dag_id}/{context['run_id']}"


def _cron(schedule: str):
    """Runs at the cron times themselves, the first the next due time: Airflow's default for a DAG without a
    start date would run a recent past time at once, so switching the stack on could start a training."""
    if schedule.lower() == "none":
        return None
    from airflow.sdk import CronTriggerTimetable

    return CronTriggerTimetable(schedule, timezone="UTC", run_immediately=timedelta(0))
