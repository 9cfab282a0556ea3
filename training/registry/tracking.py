"""MLflow connection: tracking URI and experiment, set up explicitly, never at import."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from training.config import PipelineConfig, mask_password

log = logging.getLogger(__name__)

# How long a task waits for an http(s) MLflow server: MLflow's own HTTP retries would keep it
# waiting for minutes before saying anything.
CONNECT_TIMEOUT_S = 10.0


def configure_mlflow(config: PipelineConfig) -> str:
    """Point MLflow at ``config``'s store and return the experiment id. A local store's experiment gets an
    explicit artifact location (MLflow would write to ``./mlruns`` wherever the task runs); a server decides."""
    import mlflow

    check_reachable(config.tracking_uri, CONNECT_TIMEOUT_S)
    if config.tracking_uri.startswith("sqlite:///"):
        Path(config.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.experiment_name)
    if experiment is None:
        try:
            exp_id = mlflow.create_experiment(config.experiment_name, artifact_location=config.artifact_location)
        except Exception:  # created concurrently by another task: use theirs
            experiment = mlflow.get_experiment_by_name(config.experiment_name)
            if experiment is None:
                raise
            exp_id = experiment.experiment_id
    else:
        exp_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def side_experiment(client, config: PipelineConfig, suffix: str) -> str:
    """The id of ``<experiment_name>-<suffix>`` (a record kept beside the training runs), made if missing."""
    name = f"{config.experiment_name}-{suffix}"
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=config.artifact_location)
    except Exception:  # created concurrently by another task: use theirs
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class TrackingServerUnreachable(RuntimeError):
    """The MLflow tracking server did not answer in time; failing lets Airflow retry the task."""


def check_reachable(uri: str, timeout: float) -> None:
    """Raise :class:`TrackingServerUnreachable` unless an http(s) tracking server answers within ``timeout`` s,
    rather than wait minutes in MLflow's own retries. Any answer below 500 counts (an auth proxy may say
    401); a 5xx from a proxy means MLflow behind it is down. Other URIs are not checked."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    health = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = requests.get(health, timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            if answer.status_code < 500:
                return
            problem = f"HTTP {answer.status_code}"
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        if time.monotonic() + 1 >= deadline:
            break
        time.sleep(1)
    raise TrackingServerUnreachable(
        f"MLflow tracking server {mask_password(uri)} is unreachable: {mask_password(health)} gave no usable "
        f"answer within {timeout:g} s (last: {problem}). Start the server, or point "
        "MLFLOW_TRACKING_URI (or CIFAR10_MLFLOW_TRACKING_URI) at a running one; Airflow retries this task.")


def git_commit(repo: Path | None = None) -> str:
    """The git commit (``-dirty`` with changes); without a checkout (the Airflow image has no .git) the
    ``CIFAR10_GIT_COMMIT`` the image was built with, or "unknown"."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("CIFAR10_GIT_COMMIT", "").strip() or "unknown"
