"""MLflow connection: tracking URI and experiment, set up explicitly, never at import."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from training.config import PipelineConfig

log = logging.getLogger(__name__)


def configure_mlflow(config: PipelineConfig) -> str:
    """Point MLflow at ``config``'s store and return the experiment id.

    With a local store the experiment gets an explicit artifact location, because
    MLflow would otherwise write to ``./mlruns`` relative to whatever directory the
    task runs in; with a tracking server (``http(s)://``) the server decides, so its
    ``--artifacts-destination`` (e.g. S3) is used (see ``PipelineConfig.artifact_location``).
    """
    import mlflow

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


def git_commit(repo: Path | None = None) -> str:
    """The current git commit (with ``-dirty`` when the tree has changes), or "unknown"."""
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"
