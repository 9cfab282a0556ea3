"""Registry: each trained model becomes a version; the ``champion`` alias is gated.

A new version takes the alias only when its test accuracy is at least
``min_accuracy`` *and* at least the current champion's (or ``force_promote`` is set).
The decision and its reason are stored as tags on the version, so the registry
itself explains why the served model is what it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from training.config import PipelineConfig

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def decide(accuracy: float, champion_accuracy: float | None, config: PipelineConfig) -> GateDecision:
    """The gate, as a pure function of the numbers."""
    if config.force_promote:
        return GateDecision(True, f"force_promote set by operator (test_accuracy={accuracy:.4f})")
    if accuracy < config.min_accuracy:
        return GateDecision(False, f"test_accuracy {accuracy:.4f} < min_accuracy {config.min_accuracy:.4f}")
    if champion_accuracy is None:
        return GateDecision(True, f"test_accuracy {accuracy:.4f} >= min_accuracy {config.min_accuracy:.4f} "
                                  "and no champion yet")
    # Rounded so that a margin of exactly min_improvement passes despite float error.
    if round(accuracy - champion_accuracy, 9) < config.min_improvement:
        return GateDecision(False, f"test_accuracy {accuracy:.4f} does not beat the champion's "
                                   f"{champion_accuracy:.4f} by min_improvement {config.min_improvement:.4f}")
    return GateDecision(True, f"test_accuracy {accuracy:.4f} >= min_accuracy {config.min_accuracy:.4f} "
                              f"and beats the champion's {champion_accuracy:.4f} by >= {config.min_improvement:.4f}")


def register(config: PipelineConfig, run_id: str) -> str:
    """Register the run's model as a new version and apply the gate.

    Returns the version's URI, ``models:/<name>/<version>``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.registry.tracking import configure_mlflow

    configure_mlflow(config)
    client = MlflowClient()
    run = client.get_run(run_id)
    accuracy = float(run.data.metrics["test_accuracy"])
    name = config.registered_model_name
    version = mlflow.register_model(run.data.tags["logged_model_uri"], name,
                                    tags={"run_id": run_id, "test_accuracy": f"{accuracy:.6f}"})
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        champion_accuracy: float | None = float(client.get_run(champion.run_id).data.metrics["test_accuracy"])
    except MlflowException:
        champion_accuracy = None
    decision = decide(accuracy, champion_accuracy, config)
    # On the version (the registry explains the served model) and on the run (the
    # experiment view explains why a good-looking run was not promoted).
    tags = {"gate_decision": "promoted" if decision.promote else "rejected", "gate_reason": decision.reason}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
        client.set_tag(run_id, key, value)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    log.info("%s version %s: %s (%s)", name, version.version,
             "promoted to champion" if decision.promote else "not promoted", decision.reason)
    return f"models:/{name}/{version.version}"


def is_champion(config: PipelineConfig, version_uri: str) -> tuple[bool, str]:
    """Whether ``version_uri`` holds the champion alias now, and the gate's recorded reason."""
    from mlflow import MlflowClient

    from training.registry.tracking import configure_mlflow

    configure_mlflow(config)
    client = MlflowClient()
    name, version = version_uri.removeprefix("models:/").rsplit("/", 1)
    mv = client.get_model_version(name, version)
    return CHAMPION in (mv.aliases or []), mv.tags.get("gate_reason", "")


def serve_if_champion(config: PipelineConfig, version_uri: str) -> bool:
    """The DAG's short-circuit: True (go on to import and build) when ``version_uri`` is the champion."""
    promoted, reason = is_champion(config, version_uri)
    log.info("%s %s champion: %s%s", version_uri, "is" if promoted else "is NOT", reason,
             "" if promoted else " -> skipping the Bento tasks; the served model is unchanged")
    return promoted
