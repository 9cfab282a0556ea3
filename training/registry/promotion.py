"""Registry: each trained model becomes a version; the ``champion`` alias moves last.

:func:`register` adds the version and applies the quality gate (both models scored on the same test
split, :mod:`training.registry.evaluation`): a version that passes is a ``candidate``. The DAG then
packages and checks it (:mod:`training.packaging.verify`), and :mod:`training.deploy.champion` moves the
alias: every move is recorded first (:func:`record_move`), and the alias moves last (:func:`move_alias`),
only if the champion is still the one the move was planned from. The alias is the truth: a recorded
move that never happened leaves no ``champion_until`` anywhere.
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
# The version a front door shadows before it may become champion (training/deploy/shadow.py).
CHALLENGER = "challenger"
# The front door's heartbeat on the registered model: a JSON {"at": epoch seconds, "every": seconds}, written by
# the follower each time it looks at the aliases. Fresh, it tells the promote step that a server follows them.
FRONT_DOOR_TAG = "front_door"
# Where publish put a version's Bento archive and the archive's sha256: serving imports exactly that.
ARCHIVE_URI_TAG, ARCHIVE_SHA256_TAG = "bento_archive_uri", "bento_archive_sha256"
# gate_decision tag values, in the order a version can pass through them.
CANDIDATE, REJECTED, FAILED_SERVING, PROMOTED = "candidate", "rejected", "failed_serving", "promoted"
# ... and where a front door shadows it first: in shadow between the last two, failed_shadow when it did not pass.
SHADOWED, FAILED_SHADOW = "shadowed", "failed_shadow"


class ChampionChanged(RuntimeError):
    """The champion moved while a promotion or rollback was under way; this one did not move it."""


@dataclass(frozen=True)
class Move:
    """One move of ``champion`` to ``version`` of model ``name``, as it is recorded."""

    name: str
    version: str
    run_id: str
    action: str  # what the record says it was: "promote" or "rollback"
    previous: str  # the champion the move starts from; "" when there is none
    bento_tag: str
    reason: str
    by: str
    forced: bool = False


class NotPublished(RuntimeError):
    """The registry names no champion, or no published Bento archive for it."""


@dataclass(frozen=True)
class PublishedBento:
    """A version's Bento as publish recorded it: its tag, the archive's URI and sha256."""

    model: str
    version: str
    bento_tag: str
    uri: str
    sha256: str


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


def champion_version(client, name: str) -> str:
    """The version number holding ``champion``, or "" when none does."""
    mv = current_champion(client, name)
    return str(mv.version) if mv is not None else ""


def challenger(client, name: str):
    """The model version holding ``challenger``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHALLENGER)
    except MlflowException:
        return None


def front_door_beat(client, name: str, every_s: float, now: float) -> None:
    """The follower's heartbeat: a server follows ``name``'s aliases, looking every ``every_s`` seconds."""
    client.set_registered_model_tag(name, FRONT_DOOR_TAG, json.dumps({"at": round(now, 1), "every": every_s}))


def front_door_watching(client, name: str, now: float) -> bool:
    """Whether a front door's follower looked at ``name``'s aliases lately (three of its intervals, at least 30 s)."""
    from mlflow.exceptions import MlflowException

    try:
        beat = json.loads(client.get_registered_model(name).tags.get(FRONT_DOOR_TAG) or "{}")
        return now - float(beat["at"]) < max(3 * float(beat["every"]), 30.0)
    except (MlflowException, ValueError, KeyError, TypeError):
        return False


def _set_tags(client, name: str, version: str, run_id: str | None, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        if run_id:
            client.set_tag(run_id, key, value)


def register(config: PipelineConfig, run_id: str, prepared_dir: Path) -> str:
    """Register the run's model as a new version and apply the quality gate; return ``models:/<name>/<version>``.

    Both models are scored on the challenger's test split in ``prepared_dir``.
    """
    import mlflow

    from training.registry.evaluation import compare

    client = client_for(config)
    run = client.get_run(run_id)
    name = config.registered_model_name
    comparison = compare(client, run_id, current_champion(client, name), Path(prepared_dir))
    version = mlflow.register_model(run.data.tags["logged_model_uri"], name,
                                    tags={"run_id": run_id, "test_accuracy": f"{comparison.challenger.accuracy:.6f}"})
    champion_accuracy = comparison.champion.accuracy if comparison.champion else None
    decision = decide(comparison.challenger.accuracy, champion_accuracy, config)
    _log_gate(client, run_id, comparison, decision, str(version.version))
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


def _log_gate(client, run_id: str, comparison, decision: GateDecision, version: str) -> None:
    """Both accuracies, overall and per class, as ``gate_*`` metrics and ``gate/comparison.json`` on the run."""
    from mlflow.entities import Metric

    metrics = {}
    for role, score in (("challenger", comparison.challenger), ("champion", comparison.champion)):
        if score is not None:
            metrics[f"gate_{role}_accuracy"] = score.accuracy
            metrics |= {f"gate_{role}_accuracy_{c}": a for c, a in score.per_class.items()}
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()
                                      if v == v])  # NaN: a class absent from the split
    client.log_dict(run_id, {**comparison.as_dict(), "decision": decision.reason, "version": version},
                    "gate/comparison.json")


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
    """Whether model version ``mv`` held the alias and was replaced (the alias moving away from it records that)."""
    return "champion_until" in mv.tags


def previous_champion(client, name: str, current: str | None):
    """The newest version older than ``current`` that held ``champion``, or None."""
    older = [mv for mv in client.search_model_versions(f"name='{name}'")
             if held_champion(mv) and (current is None or int(mv.version) < int(current))]
    return max(older, key=lambda mv: int(mv.version), default=None)


def record_move(client, config: PipelineConfig, move: Move) -> str:
    """Record ``move`` before it is made (``champion_*`` and ``bento_tag`` tags, ``champion_until`` on the
    previous champion, a run in ``<experiment>-champion``); return that run's id. A retry of the same move
    reuses the newest run when it records the same action, versions and mover."""
    from training.registry.tracking import side_experiment

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in {"champion_since": now, "champion_action": move.action, "champion_reason": move.reason,
                       "champion_by": move.by, "champion_previous": move.previous, "bento_tag": move.bento_tag,
                       "champion_forced": str(move.forced).lower()}.items():
        client.set_model_version_tag(move.name, move.version, key, value)
    if move.previous and move.previous != move.version:
        client.set_model_version_tag(move.name, move.previous, "champion_until", now)
    experiment = side_experiment(client, config, "champion")
    tags = {"action": move.action, "model": move.name, "from_version": move.previous, "to_version": move.version,
            "by": move.by}
    newest = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)
    if newest and all(newest[0].data.tags.get(k) == v for k, v in tags.items()):
        run_id = newest[0].info.run_id
    else:
        run_id = client.create_run(experiment, run_name=f"{move.action} v{move.previous or '-'} -> v{move.version}",
                                   tags=tags).info.run_id
    for key, value in {"to_run_id": move.run_id, "bento_tag": move.bento_tag, "reason": move.reason[:5000],
                       "forced": str(move.forced).lower(), "at": now}.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


def mark_promoted(client, move: Move) -> None:
    """Record on the version and its run that it passed every gate and is being promoted."""
    _set_tags(client, move.name, move.version, move.run_id, {"gate_decision": PROMOTED})


def move_alias(client, move: Move, record_run_id: str) -> None:
    """Point ``champion`` at ``move.version`` only if it still is ``move.previous`` (or already the version);
    otherwise mark the move's run FAILED and raise :class:`ChampionChanged`. MLflow has no compare-and-set
    on aliases: reading the champion right before the move leaves a window of one request."""
    now = champion_version(client, move.name)
    if now not in (move.previous, move.version):
        why = (f"the champion of {move.name} moved from version {move.previous or 'none'} to {now or 'none'} while "
               f"this {move.action} to version {move.version} was under way; nothing was moved. Check who moved it "
               "(python -m training.deploy.champion show) and start again if version "
               f"{move.version} should still serve")
        client.set_tag(record_run_id, "outcome", why)
        client.set_terminated(record_run_id, status="FAILED")
        raise ChampionChanged(why)
    client.set_registered_model_alias(move.name, CHAMPION, move.version)
    log.info("%s: %s moved from version %s to %s (%s; by %s)", move.name, CHAMPION, move.previous or "none",
             move.version, move.reason, move.by)


def record_published(config: PipelineConfig, version_uri: str, uri: str, sha256: str) -> None:
    """Record on ``version_uri`` where its Bento archive was published and the archive's sha256."""
    name, version = split_uri(version_uri)
    client = client_for(config)
    for key, value in {ARCHIVE_URI_TAG: uri, ARCHIVE_SHA256_TAG: sha256}.items():
        client.set_model_version_tag(name, version, key, value)


def published_champion(config: PipelineConfig, alias: str = CHAMPION) -> PublishedBento:
    """The Bento archive of the version ``alias`` names, as publish recorded it; :class:`NotPublished` when there
    is none yet."""
    name = config.registered_model_name
    client = client_for(config)
    mv = current_champion(client, name) if alias == CHAMPION else challenger(client, name)
    if mv is None:
        raise NotPublished(f"no {name} version holds the {alias} alias yet: run the pipeline first")
    tags = mv.tags
    if not all(tags.get(key) for key in ("bento_tag", ARCHIVE_URI_TAG, ARCHIVE_SHA256_TAG)):
        raise NotPublished(f"the {alias} ({name} version {mv.version}) has no published Bento on record (tags "
                           f"bento_tag, {ARCHIVE_URI_TAG}, {ARCHIVE_SHA256_TAG}): its publish task has not run yet, "
                           "failed, or ran without bento_export_uri; rerun that task with CIFAR10_BENTO_EXPORT_URI set")
    return PublishedBento(name, str(mv.version), tags["bento_tag"], tags[ARCHIVE_URI_TAG], tags[ARCHIVE_SHA256_TAG])


def champion_record(config: PipelineConfig) -> dict:
    """What holds ``champion`` now: version, run id, Bento tag and the recorded move."""
    client = client_for(config)
    name = config.registered_model_name
    mv = current_champion(client, name)
    if mv is None:
        return {}
    return {"model": name, "version": str(mv.version), "run_id": mv.run_id,
            **{k: v for k, v in mv.tags.items() if k.startswith(("champion_", "gate_", "bento_"))}}


def dumps(record: dict) -> str:
    return json.dumps(record, indent=2, sort_keys=True)
