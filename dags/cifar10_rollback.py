"""Rollback: ``champion`` back to the previous champion (or a version given), serving its Bento.

Wiring only, like the pipeline's DAG: one task, a lazy import and one call.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

# Standard library only: parsing stays fast.
from training.params import ROLLBACK
from training.schedule import run_name

DOC = """
### Roll the served CIFAR-10 model back

Moves the `champion` alias to the previous champion (the newest older version that held it), or to
`version`, and makes that version's Bento the served one: rebuilt only when the store lost it, its
image tagged `latest` when it has one, published again to `bento_export_uri` when that is set.
Only to a version that passed both gates: one that failed `verify` or lost the quality gate needs
`force` and a `reason`. If the champion changes while the rollback works (e.g. a promotion during a
Bento rebuild), it stops and moves nothing. The move is recorded first, on the version (`champion_*`
tags) and in the `cifar10-champion` MLflow experiment, with the reason and this run's id; the alias
moves last. A server started before the rollback keeps serving
what it loaded: restart it (`make rollback` on the serving machine does both).
"""


@dag(
    dag_id="cifar10_rollback",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    doc_md=DOC,
    tags=["cifar10", "mlops"],
    params=ROLLBACK.airflow(),
)
def cifar10_rollback():
    @task(execution_timeout=timedelta(minutes=20), retries=0)
    def rollback() -> str:
        from training.deploy.champion import rollback as run

        context = get_current_context()
        params = context["params"]
        return run(ROLLBACK.for_task(context), params["version"], params["reason"], force=params["force"],
                   by=run_name(context)).bento_tag

    rollback()


cifar10_rollback()
