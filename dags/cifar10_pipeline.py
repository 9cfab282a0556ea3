"""CIFAR-10 pipeline: fetch -> prepare -> train -> register -> import -> build -> containerize -> verify -> promote.

This file only wires tasks. Every task body is a lazy import and one call into the
``training`` package, and returns a path, URI or tag (never arrays), so parsing this
file stays fast and the scheduler never imports TensorFlow, MLflow or BentoML.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from airflow.sdk import dag, get_current_context, task

# These import only the standard library: parsing stays fast.
from training.params import PIPELINE
from training.schedule import DagSettings, run_name


DOC = """
### CIFAR-10: from raw archive to a served container

1. **fetch** the dataset URL (http(s), file, s3, path) into a checksummed cache
2. **prepare** stratified, seeded train/validation/test splits with a manifest and digest
3. **train** a Keras 3 CNN in one MLflow run (params, per-epoch metrics, pictures, dataset, model, ONNX)
4. **register** a new model version; the champion is rescored on this run's test split, and the new
   version is a *candidate* only at `min_accuracy` and `min_improvement` above it (comparison in MLflow)
5. **gate**: the tasks below run only for a candidate; otherwise nothing served changes
6. **import** the candidate into the BentoML store (labels: MLflow model, version, run id)
7. **build** the Bento from `bentofile.yaml`
8. **containerize** it when docker, podman or buildah is present (skipped otherwise, with the reason)
9. **verify**: the Bento (and image) is served and must answer golden test images exactly as the exported
   model does, with no error and p99 within `served_p99_budget_ms`; a failure fails the run, nothing moves
10. **promote**: the move is recorded (on the version, in MLflow) and the image tagged `latest`, then the
    `champion` alias moves, only if the champion is still the one the version was scored against; a
    retry after a partial failure finishes the step. Where a front door serves (`make up`), the version is
    named `challenger` instead and `champion` moves only after its shadow on live traffic passes
    (`shadow_*` params; docs/deploy.md)
11. **publish** the Bento to `bento_export_uri` (e.g. S3) for serving machines, recording the archive's URI
    and sha256 on the version: serving imports exactly that archive (skipped when the URI is empty)

Every param overrides the `training.config.PipelineConfig` field of the same name; a conf key that is not
a param fails the run at its first task (`training/params.py` declares them). A local `data_url` must lie
under the operator's data roots (`CIFAR10_DATA_ROOTS`); safety limits are never params.
Runs on demand, on the schedule in `CIFAR10_SCHEDULE` (default `@weekly`, Sunday 00:00 UTC; `none`: no
timed runs), and on each `cifar10_drift` asset event, which the `cifar10_drift_monitor` DAG emits when
the served model's inputs drift. No catch-up, one run at a time; active as soon as Airflow loads it,
unless `CIFAR10_START_PAUSED=true`. A run that does not beat the champion by `min_improvement` leaves
the served model unchanged.
Rollback: the `cifar10_rollback` DAG, or `make rollback`.
"""

SETTINGS = DagSettings.from_env()


def _config():
    """The pipeline config: environment defaults overridden by this run's params (a conf key that is not one fails)."""
    return PIPELINE.for_task(get_current_context())


@dag(
    dag_id="cifar10_pipeline",
    schedule=SETTINGS.pipeline_schedule(),
    catchup=False,  # a missed week is not worth several back-to-back trainings
    is_paused_upon_creation=SETTINGS.start_paused,
    max_active_runs=1,  # scheduled and manual runs share the store and registry
    doc_md=DOC,
    default_args=SETTINGS.default_args(),
    tags=["cifar10", "mlops"],
    params=PIPELINE.airflow(),
)
def cifar10_pipeline():
    @task(execution_timeout=timedelta(hours=2))
    def fetch() -> str:
        from training.data.fetch import fetch as run

        return str(run(_config()))

    @task(execution_timeout=timedelta(minutes=30))
    def prepare(archive: str) -> str:
        from training.data.prepare import prepare as run

        return str(run(Path(archive), _config()))

    @task(execution_timeout=timedelta(hours=3))
    def train(prepared_dir: str) -> str:
        from training.registry.attempts import TaskAttempt
        from training.model.train import train as run

        return run(_config(), Path(prepared_dir), TaskAttempt.of(get_current_context()["ti"]))

    @task(execution_timeout=timedelta(minutes=20))
    def register(mlflow_run_id: str, prepared_dir: str) -> str:
        from training.registry.promotion import register as run

        return run(_config(), mlflow_run_id, Path(prepared_dir))

    @task.short_circuit(execution_timeout=timedelta(minutes=5))
    def gate(version_uri: str) -> bool:
        from training.registry.promotion import package_if_candidate

        return package_if_candidate(_config(), version_uri)

    @task(execution_timeout=timedelta(minutes=10))
    def import_model(version_uri: str) -> str:
        from training.packaging.bento import import_version

        return import_version(_config(), version_uri)

    @task(execution_timeout=timedelta(minutes=20))
    def build(model_tag: str) -> str:
        from training.packaging.bento import build_bento

        return build_bento(_config(), model_tag)

    @task(execution_timeout=timedelta(minutes=45))
    def containerize(bento_tag: str) -> str:
        from airflow.sdk.exceptions import AirflowSkipException

        from training.packaging.container import containerize as run

        image = run(_config(), bento_tag)
        if image is None:
            raise AirflowSkipException("no container builder available; see the log line above")
        return image

    # After containerize even when it was skipped (no builder): the Bento alone is checked then.
    @task(execution_timeout=timedelta(minutes=20), trigger_rule="none_failed")
    def verify(version_uri: str, bento_tag: str, prepared_dir: str) -> str:
        from training.packaging.verify import verify as run

        return run(_config(), version_uri, bento_tag, Path(prepared_dir))

    @task(execution_timeout=timedelta(minutes=5))
    def promote(version_uri: str, bento_tag: str) -> str:
        from training.deploy.champion import promote as run

        return run(_config(), version_uri, bento_tag, by=run_name(get_current_context()))

    @task(execution_timeout=timedelta(minutes=20))
    def publish(version_uri: str, bento_tag: str) -> str:
        from airflow.sdk.exceptions import AirflowSkipException

        from training.packaging.bento_store import publish_bento

        uri = publish_bento(_config(), version_uri, bento_tag)
        if not uri:
            raise AirflowSkipException("bento_export_uri is empty: the Bento stays in this machine's store")
        return uri

    prepared = prepare(fetch())
    version = register(train(prepared), prepared)
    model_tag = import_model(version)
    gate(version) >> model_tag
    bento = build(model_tag)
    checked = verify(version, bento, prepared)
    containerize(bento) >> checked
    promote(version, checked) >> publish(version, checked)


cifar10_pipeline()
