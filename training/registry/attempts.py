"""Which Airflow task try an MLflow run belongs to, and closing the runs of tries that died.

A killed try (SIGKILL, the OOM killer, a lost worker) leaves its run RUNNING for ever, so every training
run is tagged with its try and the next try marks such orphans KILLED. They are never registered: register
takes the run id a successful try returned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENDED_BY_TAG = "ended_by"


@dataclass(frozen=True)
class TaskAttempt:
    """One try of one Airflow task instance."""

    dag_id: str
    run_id: str
    task_id: str
    try_number: int

    @classmethod
    def of(cls, ti) -> "TaskAttempt":
        """The attempt of an Airflow task instance (``context["ti"]``)."""
        return cls(ti.dag_id, ti.run_id, ti.task_id, int(ti.try_number))

    def tags(self) -> dict[str, str]:
        """MLflow tags naming this attempt."""
        return {"airflow_dag_id": self.dag_id, "airflow_run_id": self.run_id, "airflow_task_id": self.task_id,
                "airflow_try_number": str(self.try_number)}


def end_orphaned_runs(client, experiment_id: str, attempt: TaskAttempt) -> list[str]:
    """Mark KILLED every RUNNING run that another try of this DAG's task left; return their ids. With one
    active DAG run at a time (``max_active_runs=1``) no other try of the task is alive."""
    query = (f"tags.airflow_dag_id = '{attempt.dag_id}' and tags.airflow_task_id = '{attempt.task_id}' "
             "and attributes.status = 'RUNNING'")
    ended = []
    for run in client.search_runs([experiment_id], filter_string=query, max_results=1000):
        tags = run.data.tags
        if tags.get("airflow_run_id") == attempt.run_id and tags.get("airflow_try_number") == str(attempt.try_number):
            continue  # this very try (cannot happen before start_run, but never end our own run)
        reason = (f"try {attempt.try_number} of {attempt.run_id} found it RUNNING: try "
                  f"{tags.get('airflow_try_number')} of {tags.get('airflow_run_id')} died without ending it")
        client.set_tag(run.info.run_id, ENDED_BY_TAG, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("marked MLflow run %s KILLED: %s", run.info.run_id, reason)
        ended.append(run.info.run_id)
    return ended
