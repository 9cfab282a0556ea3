"""Registry: each trained model becomes a version; the ``champion`` alias moves last.

1. :func:`register` adds the version and applies the quality gate: the challenger and the
   current champion are scored on the same test split (:mod:`training.registry.evaluation`),
   and the challenger must reach ``min_accuracy`` and beat the champion by
   ``min_improvement`` (or ``force_promote`` is set). A version that passes is a
   ``candidate``; nothing has moved yet.
2. The DAG packages a candidate and checks the served artifact
   (:mod:`training.packaging.verify`).
3. :func:`promote` moves ``champion`` to it. Every move of the alias (promotion or rollback)
   is recorded on the version (``champion_*`` tags) and as a run in the
   ``<experiment>-champion`` MLflow experiment, so the registry says what is served, since
   when, why and by whom.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from training.config import PipelineConfig

log = logging.getLogger(__name__)

CHAMPION = "champion"
# gate_decision tag values, in the order a version can pass through them.
CANDIDATE, REJECTED, FAILED_SERVING, PROMOTED = "candidate", "rejected", "failed_serving", "promoted"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def decide(accuracy: float, champion_accuracy: float | None, config: PipelineConfig) -> GateDecision:
    """The gate, as a pure function of the numbers (both measured on the same test split)."""
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


def client_for(config: PipelineConfig):
    """An MLflow client on ``config``'s store (tracking and registry)."""
    from mlflow import MlflowClient

    from training.registry.tracking import configure_mlflow

    configure_mlflow(config)
    return MlflowClient()


def split_uri(version_uri: str) -> tuple[str, str]:
    """``models:/<name>/<version>`` -> (name, version)."""
    name, version = version_uri.removeprefix("models:/").rsplit("/", 1)
    return name, version


def current_champion(client, name: str):
    """The model version holding ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _set_tags(client, name: str, version: str, run_id: str | None, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        if run_id:
            client.set_tag(run_id, key, value)


def register(config: PipelineConfig, run_id: str, prepared_dir: Path) -> str:
    """Register the run's model as a new version and apply the quality gate; return ``models:/<name>/<version>``.

    The challenger and the champion are scored on the challenger's test split in
    ``prepared_dir``; both accuracies, per class, and the data digest are logged to the
    run (``gate_*`` metrics, ``gate/comparison.json``) and tagged on the version.
    """
    import mlflow
    from mlflow.entities import Metric

    from training.registry.evaluation import compare

    client = client_for(config)
    run = client.get_run(run_id)
    name = config.registered_model_name
    champion = current_champion(client, name)
    comparison = compare(client, run_id, champion, Path(prepared_dir))
    version = mlflow.register_model(run.data.tags["logged_model_uri"], name,
                                    tags={"run_id": run_id, "test_accuracy": f"{comparison.challenger.accuracy:.6f}"})
    champion_accuracy = comparison.champion.accuracy if comparison.champion else None
    decision = decide(comparison.challenger.accuracy, champion_accuracy, config)
    metrics = {"gate_challenger_accuracy": comparison.challenger.accuracy}
    metrics |= {f"gate_challenger_accuracy_{c}": a for c, a in comparison.challenger.per_class.items()}
    if comparison.champion:
        metrics["gate_champion_accuracy"] = comparison.champion.accuracy
        metrics |= {f"gate_champion_accuracy_{c}": a for c, a in comparison.champion.per_class.items()}
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()
                                      if v == v])  # NaN: a class absent from the split
    client.log_dict(run_id, {**comparison.as_dict(), "decision": decision.reason, "version": str(version.version)},
                    "gate/comparison.json")
    tags = {"gate_decision": CANDIDATE if decision.promote else REJECTED, "gate_reason": decision.reason,
            "gate_dataset_digest": comparison.dataset_digest,
            "gate_challenger_accuracy": f"{comparison.challenger.accuracy:.6f}",
            "gate_champion_version": comparison.champion_version or "",
            "gate_champion_accuracy": "" if champion_accuracy is None else f"{champion_accuracy:.6f}"}
    # On the version (the registry explains the served model) and on the run (the experiment
    # view explains why a good-looking run was not promoted).
    _set_tags(client, name, version.version, run_id, tags)
    for note in comparison.notes:
        log.warning("%s version %s: %s", name, version.version, note)
    log.info("%s version %s: %s (%s)", name, version.version,
             "candidate for champion" if decision.promote else "not promoted", decision.reason)
    return f"models:/{name}/{version.version}"


def is_candidate(config: PipelineConfig, version_uri: str) -> tuple[bool, str]:
    """Whether ``version_uri`` passed the quality gate, and the gate's recorded reason."""
    name, version = split_uri(version_uri)
    mv = client_for(config).get_model_version(name, version)
    return mv.tags.get("gate_decision") == CANDIDATE, mv.tags.get("gate_reason", "")


def package_if_candidate(config: PipelineConfig, version_uri: str) -> bool:
    """The DAG's short circuit: True (go on to package and check it) when ``version_uri`` passed the gate."""
    passed, reason = is_candidate(config, version_uri)
    log.info("%s %s the gate: %s%s", version_uri, "passed" if passed else "did NOT pass", reason,
             "" if passed else " -> skipping the Bento tasks; the served model is unchanged")
    return passed


def mark_failed_serving(config: PipelineConfig, version_uri: str, reason: str) -> None:
    """Record on the version and its run that its Bento failed the served-artifact check."""
    name, version = split_uri(version_uri)
    client = client_for(config)
    mv = client.get_model_version(name, version)
    _set_tags(client, name, version, mv.run_id, {"gate_decision": FAILED_SERVING, "gate_reason": reason})


def held_champion(mv) -> bool:
    """Whether model version ``mv`` has ever held the alias."""
    return "champion_since" in mv.tags or mv.tags.get("gate_decision") == PROMOTED


def previous_champion(client, name: str, current: str | None):
    """The newest version older than ``current`` that held ``champion``, or None."""
    older = [mv for mv in client.search_model_versions(f"name='{name}'")
             if held_champion(mv) and (current is None or int(mv.version) < int(current))]
    return max(older, key=lambda mv: int(mv.version), default=None)


def promote(config: PipelineConfig, version_uri: str, bento_tag: str, *, by: str, action: str = "promote",
            reason: str = "") -> str:
    """Move ``champion`` to ``version_uri``, whose Bento is ``bento_tag``; record the move; return ``version_uri``.

    A promotion (``action="promote"``) fails when the champion changed after the version was
    scored against it: the comparison is then stale, and the run must be repeated.
    """
    from training.registry.tracking import side_experiment

    name, version = split_uri(version_uri)
    client = client_for(config)
    mv = client.get_model_version(name, version)
    before = current_champion(client, name)
    before_version = str(before.version) if before else ""
    if action == "promote" and not config.force_promote and before_version != mv.tags.get("gate_champion_version", ""):
        raise RuntimeError(f"the champion moved to version {before_version or 'none'} after version {version} was "
                           f"scored against version {mv.tags.get('gate_champion_version') or 'none'}: the comparison "
                           "is stale; rerun this DAG run to score it against the current champion")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    reason = reason or mv.tags.get("gate_reason", "")
    record = {"champion_since": now, "champion_action": action, "champion_reason": reason, "champion_by": by,
              "champion_previous": before_version, "bento_tag": bento_tag}
    client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    if action == "promote":
        _set_tags(client, name, version, mv.run_id, {"gate_decision": PROMOTED})
    if before is not None and before_version != version:
        client.set_model_version_tag(name, before_version, "champion_until", now)
    move = client.create_run(side_experiment(client, config, "champion"),
                             run_name=f"{action} v{before_version or '-'} -> v{version}", tags={
        "action": action, "model": name, "from_version": before_version, "to_version": version,
        "to_run_id": mv.run_id, "bento_tag": bento_tag, "reason": reason[:5000], "by": by, "at": now})
    client.set_terminated(move.info.run_id)
    log.info("%s: %s moved from version %s to %s (%s; by %s)", name, CHAMPION, before_version or "none", version,
             reason, by)
    return version_uri


def champion_record(config: PipelineConfig) -> dict:
    """What holds ``champion`` now: version, run id, Bento tag and the recorded move."""
    client = client_for(config)
    name = config.registered_model_name
    mv = current_champion(client, name)
    if mv is None:
        return {}
    return {"model": name, "version": str(mv.version), "run_id": mv.run_id,
            **{k: v for k, v in mv.tags.items() if k.startswith(("champion_", "gate_")) or k == "bento_tag"}}


def dumps(record: dict) -> str:
    return json.dumps(record, indent=2, sort_keys=True)
