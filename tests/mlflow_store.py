"""One temporary SQLite MLflow store for the whole test session.

Creating a SQLite store runs MLflow's migrations (~13 s), so tests share one store and
keep apart by using distinct experiment and registered-model names.
"""

from __future__ import annotations

from pathlib import Path

_STORE: dict[str, Path] = {}


def shared_store(tmp_path_factory) -> Path:
    """The session's MLflow folder (``mlflow.db`` + ``artifacts/``), created on first use."""
    if "dir" not in _STORE:
        _STORE["dir"] = tmp_path_factory.mktemp("mlflow-store")
    return _STORE["dir"]


def store_overrides(folder: Path, name: str) -> dict[str, str]:
    """Config overrides pointing at the shared store with a test-specific experiment/model name."""
    return {
        "mlflow_tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "mlflow_artifact_location": (folder / "artifacts" / name).as_uri(),
        "experiment_name": f"test-{name}",
        "registered_model_name": f"test-{name}",
    }
