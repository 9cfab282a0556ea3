"""Promotion and rollback in a real (temporary) MLflow store: records first, the alias last, retries that finish
the step, rollbacks only to promoted versions unless forced, and no move when the champion changed meanwhile."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from tests.helpers import champion_moves, champion_number, model_version, registry_client, training_run
from tests.helpers import write_prepared

from training.config import load_config
from training.deploy import champion
from training.deploy.champion import RollbackRefused, promote, rollback
from training.packaging import bento_store
from training.packaging.bento_store import publish_bento
from training.registry.promotion import (PROMOTED, ChampionChanged, mark_failed_serving, previous_champion,
                                         published_champion, register)

# Class 0 is half the test split: a model that answers k scores exactly class k's share.
SPLIT = [0] * 50 + [1] * 30 + [2] * 20


def _config(store, **overrides):
    # No image to tag: the image step logs that and goes on.
    return load_config({"container_backend": "none", **store, **overrides}, environ={})


@pytest.fixture
def prepared(tmp_path):
    return write_prepared(tmp_path / "prepared", SPLIT, digest="d" * 64)


def _candidate(config, tmp_path, prepared, answers: int) -> str:
    return register(config, training_run(config, tmp_path, answers), prepared)


def _promoted(config, tmp_path, prepared, answers: int) -> str:
    uri = _candidate(config, tmp_path, prepared, answers)
    promote(config, uri, f"cifar10-classifier:v{uri[-1]}", by=f"airflow:cifar10_pipeline/run-{uri[-1]}")
    return uri


def _moves(config) -> list[tuple[str, str, str, str]]:
    return [(r.data.tags["action"], r.data.tags["from_version"], r.data.tags["to_version"], r.info.status)
            for r in champion_moves(config)]


@pytest.fixture
def fail_after_next_alias_move(monkeypatch):
    """Call it, and the next alias move happens and then its call fails (a worker lost right after the move)."""
    original = MlflowClient.set_registered_model_alias
    armed = []

    def move_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if armed:
            armed.clear()
            raise ConnectionError("injected: lost the connection right after the alias moved")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", move_then_fail)
    return lambda: armed.append(True)


# --- promote ---------------------------------------------------------------------------

def test_promote_writes_every_record_before_it_moves_the_alias(store, tmp_path, prepared, monkeypatch):
    config = _config(store)
    first = _promoted(config, tmp_path, prepared, answers=2)
    second = _candidate(config, tmp_path, prepared, answers=0)
    seen = {}
    original = MlflowClient.set_registered_model_alias

    def look_then_move(self, name, alias, version):
        seen["tags"] = dict(model_version(config, second).tags)
        seen["previous"] = dict(model_version(config, first).tags)
        seen["moves"] = _moves(config)
        seen["champion"] = champion_number(config)
        original(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", look_then_move)
    assert promote(config, second, "cifar10-classifier:abc", by="airflow:cifar10_pipeline/manual__1") == second
    # When the alias moved, everything else was already written.
    assert seen["champion"] == "1"
    tags = seen["tags"]
    assert tags["gate_decision"] == PROMOTED and tags["bento_tag"] == "cifar10-classifier:abc"
    assert tags["champion_by"] == "airflow:cifar10_pipeline/manual__1" and tags["champion_previous"] == "1"
    assert tags["champion_action"] == "promote" and "beats the champion's 0.2000" in tags["champion_reason"]
    assert seen["previous"]["champion_until"] == tags["champion_since"]
    assert seen["moves"][-1] == ("promote", "1", "2", "FINISHED")
    assert champion_number(config) == "2"
    assert registry_client(config).get_run(model_version(config, second).run_id).data.tags["gate_decision"] == PROMOTED
    run = champion_moves(config)[-1]
    assert run.data.tags["by"] == "airflow:cifar10_pipeline/manual__1"
    assert run.data.tags["bento_tag"] == "cifar10-classifier:abc"


def test_a_promote_retried_after_a_failure_right_after_the_alias_move_completes(
        store, tmp_path, prepared, fail_after_next_alias_move, monkeypatch):
    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=2)
    uri = _candidate(config, tmp_path, prepared, answers=0)
    by = "airflow:cifar10_pipeline/manual__2"
    fail_after_next_alias_move()
    with pytest.raises(ConnectionError, match="injected"):
        promote(config, uri, "cifar10-classifier:v2", by=by)
    assert champion_number(config) == "2"  # the alias moved before the failure
    # Airflow's retry of the task: the same step of the same run, which must finish instead of failing.
    assert promote(config, uri, "cifar10-classifier:v2", by=by) == uri
    mv = model_version(config, uri)
    assert champion_number(config) == "2"
    assert mv.tags["gate_decision"] == PROMOTED and mv.tags["champion_by"] == by
    assert mv.tags["bento_tag"] == "cifar10-classifier:v2" and mv.tags["champion_previous"] == "1"
    assert _moves(config) == [("promote", "", "1", "FINISHED"), ("promote", "1", "2", "FINISHED")]  # recorded once
    assert "champion_until" in model_version(config, f"models:/{config.registered_model_name}/1").tags
    # The step succeeded, so publish runs: serving then finds the new champion's archive on record.
    monkeypatch.setattr(bento_store, "export_bento",
                        lambda config, tag, uri: bento_store.Archive(f"{uri}{tag.replace(':', '-')}.bento", "ef" * 32))
    publish_bento(config.replace(bento_export_uri="s3://cifar10/bentos/"), uri, "cifar10-classifier:v2")
    published = published_champion(config)
    assert (published.version, published.bento_tag) == ("2", "cifar10-classifier:v2")
    assert published.uri == "s3://cifar10/bentos/cifar10-classifier-v2.bento"


def test_a_promote_retried_after_a_failure_while_recording_records_the_move_once(store, tmp_path, prepared,
                                                                                 monkeypatch):
    from training.packaging import container

    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=2)
    uri = _candidate(config, tmp_path, prepared, answers=0)
    tries = []

    def fail_first(config, bento_tag, tag="latest"):
        tries.append(bento_tag)
        if len(tries) == 1:
            raise RuntimeError("injected: image store unavailable")

    monkeypatch.setattr(container, "tag_image", fail_first)
    with pytest.raises(RuntimeError, match="injected"):
        promote(config, uri, "cifar10-classifier:v2", by="airflow:cifar10_pipeline/manual__2")
    assert champion_number(config) == "1"  # records come first; the alias did not move
    # A promote that never moved the alias does not count as having held it.
    assert "champion_until" not in model_version(config, uri).tags
    assert str(previous_champion(registry_client(config), config.registered_model_name, "3").version) == "1"
    promote(config, uri, "cifar10-classifier:v2", by="airflow:cifar10_pipeline/manual__2")
    assert champion_number(config) == "2" and tries == ["cifar10-classifier:v2"] * 2
    assert _moves(config) == [("promote", "", "1", "FINISHED"), ("promote", "1", "2", "FINISHED")]


def test_a_stale_comparison_cannot_promote(store, tmp_path, prepared):
    """Scored against version 1, but version 2 became champion before this one was promoted."""
    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=2)
    late = _candidate(config, tmp_path, prepared, answers=1)
    _promoted(config, tmp_path, prepared, answers=0)
    with pytest.raises(RuntimeError, match=r"champion moved to version 3 after version 2 was scored against "
                                           r"version 1.*rerun this DAG run"):
        promote(config, late, "cifar10-classifier:late", by="test")
    assert champion_number(config) == "3"
    assert "champion_by" not in model_version(config, late).tags


def test_the_alias_does_not_move_when_the_champion_changed_while_the_move_was_recorded(store, tmp_path, prepared,
                                                                                       monkeypatch):
    from training.packaging import container

    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=2)
    uri = _candidate(config, tmp_path, prepared, answers=0)
    other = _candidate(config, tmp_path, prepared, answers=1)
    # Between the records and the alias, someone else moves the champion.
    monkeypatch.setattr(container, "tag_image", lambda config, tag, name="latest": registry_client(config)
                        .set_registered_model_alias(config.registered_model_name, "champion", other[-1]))
    with pytest.raises(ChampionChanged, match="moved from version 1 to 3 while this promote to version 2 was under "
                                              "way; nothing was moved"):
        promote(config, uri, "cifar10-classifier:v2", by="test")
    assert champion_number(config) == "3"
    run = champion_moves(config)[-1]
    assert (run.data.tags["to_version"], run.info.status) == ("2", "FAILED")
    assert "nothing was moved" in run.data.tags["outcome"]


# --- rollback --------------------------------------------------------------------------

@pytest.fixture
def history(store, tmp_path, prepared, monkeypatch):
    """Versions 1 and 2 promoted (2 is champion), 3 failed verify, 4 lost the gate; Bentos "in the store"."""
    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=2)
    _promoted(config, tmp_path, prepared, answers=0)
    failed = _candidate(config, tmp_path, prepared, answers=1)
    mark_failed_serving(config, failed, "served-artifact check failed: p99 latency over the budget")
    rejected = _candidate(config, tmp_path, prepared, answers=2)
    assert model_version(config, rejected).tags["gate_decision"] == "rejected"
    rebuilt = []
    monkeypatch.setattr(champion, "ensure_bento", lambda config, uri: rebuilt.append(uri) or
                        (f"cifar10-classifier:v{uri[-1]}", False))
    return config, rebuilt


@pytest.mark.parametrize("version, why", [
    ("3", "failed the served-artifact check (gate_decision=failed_serving: served-artifact check failed: p99"),
    ("4", "lost the quality gate (gate_decision=rejected: test_accuracy"),
], ids=["failed_serving", "rejected"])
def test_rollback_refuses_a_version_that_failed_a_gate_unless_forced_with_a_reason(history, version, why):
    config, rebuilt = history
    with pytest.raises(RollbackRefused, match=rf"version {version} {why.replace('(', '[(]')}.*force it with a reason: "
                                              r"--force --reason TEXT \(make rollback FORCE=1 REASON="):
        rollback(config, version, "the newest model misbehaves", by="test")
    with pytest.raises(RollbackRefused, match=rf"forcing a rollback to version {version} needs a reason"):
        rollback(config, version, "", by="test", force=True)
    assert champion_number(config) == "2" and rebuilt == []  # refused before any rebuild
    assert "champion_by" not in model_version(config, f"models:/{config.registered_model_name}/{version}").tags

    done = rollback(config, version, "v2 breaks on night images; v3's latency is acceptable", by="test", force=True)
    assert (done.version, done.previous, done.bento_tag) == (version, "2", f"cifar10-classifier:v{version}")
    assert champion_number(config) == version
    tags = model_version(config, f"models:/{config.registered_model_name}/{version}").tags
    assert tags["champion_forced"] == "true" and tags["champion_action"] == "rollback"
    assert tags["champion_reason"] == "v2 breaks on night images; v3's latency is acceptable"
    assert champion_moves(config)[-1].data.tags["forced"] == "true"


def test_rollback_to_a_promoted_version_needs_no_force(history):
    config, _ = history
    done = rollback(config, None, "", by="cli:someone@host")  # the previous champion
    assert (done.version, done.previous) == ("1", "2") and champion_number(config) == "1"
    assert _moves(config)[-1] == ("rollback", "2", "1", "FINISHED")
    assert model_version(config, f"models:/{config.registered_model_name}/1").tags["champion_forced"] == "false"


def test_rollback_stops_and_moves_nothing_when_the_champion_changed_while_its_bento_was_rebuilt(
        history, tmp_path, prepared, monkeypatch):
    config, _ = history
    newer = _candidate(config.replace(force_promote=True), tmp_path, prepared, answers=1)
    moves_before = _moves(config)

    def promoted_meanwhile(config_, uri):
        promote(config.replace(force_promote=True), newer, "cifar10-classifier:v5", by="airflow:cifar10_pipeline/x")
        return "cifar10-classifier:v1", True

    monkeypatch.setattr(champion, "ensure_bento", promoted_meanwhile)
    with pytest.raises(ChampionChanged, match="moved from version 2 to 5 while this rollback prepared its Bento; "
                                              "nothing was moved"):
        rollback(config, "1", "v2 misclassifies trucks", by="test")
    assert champion_number(config) == "5"
    assert _moves(config) == [*moves_before, ("promote", "2", "5", "FINISHED")]  # no rollback recorded
    v1 = model_version(config, f"models:/{config.registered_model_name}/1").tags
    assert v1["champion_action"] == "promote" and v1["bento_tag"] == "cifar10-classifier:v1"  # untouched


def test_the_cli_says_why_a_rollback_was_refused(history, monkeypatch, capsys):
    config, _ = history
    monkeypatch.setattr("training.config.load_config", lambda *a, **k: config)
    assert champion.main(["rollback", "--to", "3", "--reason", "x"]) == 1
    assert "error: version 3 failed the served-artifact check" in capsys.readouterr().err
    assert champion.main(["rollback", "--to", "3", "--reason", "x", "--force"]) == 0
    assert "champion: version 2 -> 3" in capsys.readouterr().out


# --- challenger: where a front door follows the aliases ---------------------------------

def _front_door_looks(config, at: float | None = None) -> None:
    import time

    from training.registry.promotion import client_for, front_door_beat

    front_door_beat(client_for(config), config.registered_model_name, 5.0, time.time() if at is None else at)


def test_with_a_front_door_watching_promote_names_a_challenger_and_champion_waits(store, tmp_path, prepared):
    config = _config(store, shadow_requests=50, shadow_min_agreement=0.9)
    _promoted(config, tmp_path, prepared, answers=1)
    client = registry_client(config)
    _front_door_looks(config)
    uri = _candidate(config, tmp_path, prepared, answers=0)
    promote(config, uri, "cifar10-classifier:v2", by="airflow:cifar10_pipeline/run-2")
    assert champion_number(config) == "1"  # champion moves only after the shadow
    mv = client.get_model_version_by_alias(config.registered_model_name, "challenger")
    assert str(mv.version) == "2" and mv.tags["gate_decision"] == "shadowed" and mv.tags["shadow_champion"] == "1"
    assert (mv.tags["shadow_requests"], mv.tags["shadow_min_agreement"]) == ("50", "0.9")  # the run's thresholds
    assert _moves(config) == [("promote", "", "1", "FINISHED")]

    # It passed: champion moves, recorded as a promotion by the front door, and challenger is gone.
    figures = {"requests": 50, "agreement": 0.96}
    assert champion.conclude_shadow(config, "2", True, "shadow passed on 50 requests", figures)
    assert champion_number(config) == "2"
    mv = model_version(config, f"models:/{config.registered_model_name}/2")
    assert (mv.tags["gate_decision"], mv.tags["shadow_decision"]) == ("promoted", "passed")
    assert "challenger" not in client.get_registered_model(config.registered_model_name).aliases
    assert client.get_run(mv.run_id).data.metrics["shadow_agreement"] == 0.96
    assert _moves(config)[-1] == ("promote", "1", "2", "FINISHED")


def test_a_failed_shadow_leaves_champion_and_records_why(store, tmp_path, prepared):
    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=1)
    _front_door_looks(config)
    promote(config, _candidate(config, tmp_path, prepared, answers=0), "cifar10-classifier:v2", by="run-2")
    reason = "shadow failed (agreement 0.100 < 0.75) on 200 requests"
    assert not champion.conclude_shadow(config, "2", False, reason, {"agreement": 0.1, "p99_s": None})
    assert champion_number(config) == "1"
    mv = model_version(config, f"models:/{config.registered_model_name}/2")
    assert (mv.tags["gate_decision"], mv.tags["shadow_decision"], mv.tags["shadow_reason"]) == (
        "failed_shadow", "failed", reason)
    assert "challenger" not in registry_client(config).get_registered_model(config.registered_model_name).aliases
    # A rollback to it is refused, saying why.
    with pytest.raises(RollbackRefused, match="failed its shadow.*agreement 0.100"):
        rollback(config, "2")


def test_a_shadow_that_passed_moves_nothing_when_the_champion_moved_meanwhile(store, tmp_path, prepared):
    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=1)
    _front_door_looks(config)
    promote(config, _candidate(config, tmp_path, prepared, answers=0), "cifar10-classifier:v2", by="run-2")
    meanwhile = _candidate(config, tmp_path, prepared, answers=2)  # moved there by hand while version 2 is shadowed
    registry_client(config).set_registered_model_alias(config.registered_model_name, "champion", meanwhile.rsplit("/", 1)[1])
    assert not champion.conclude_shadow(config, "2", True, "shadow passed on 200 requests", {})
    assert champion_number(config) == "3"
    assert "champion moved from version 1" in model_version(config, f"models:/{config.registered_model_name}/2").tags["shadow_reason"]


@pytest.mark.parametrize("beat, share", [(None, 0.25), (-3600.0, 0.25), (0.0, 0.0)],
                         ids=["no front door", "its heartbeat is stale", "shadow_share=0"])
def test_promote_moves_champion_at_once_without_a_watching_front_door_or_with_shadow_off(
        store, tmp_path, prepared, beat, share):
    import time

    config = _config(store, shadow_share=share)
    _promoted(config, tmp_path, prepared, answers=1)
    if beat is not None:
        _front_door_looks(config, time.time() + beat)
    promote(config, _candidate(config, tmp_path, prepared, answers=0), "cifar10-classifier:v2", by="run-2")
    assert champion_number(config) == "2"
    assert "challenger" not in registry_client(config).get_registered_model(config.registered_model_name).aliases


def test_a_passed_shadow_whose_promotion_stopped_part_way_is_finished_by_concluding_again(
        store, tmp_path, prepared, monkeypatch):
    config = _config(store)
    _promoted(config, tmp_path, prepared, answers=1)
    _front_door_looks(config)
    promote(config, _candidate(config, tmp_path, prepared, answers=0), "cifar10-classifier:v2", by="run-2")
    real = champion._record

    def lost(*args, **kwargs):
        monkeypatch.setattr(champion, "_record", real)
        raise ConnectionError("injected: the registry went away while the move was recorded")

    monkeypatch.setattr(champion, "_record", lost)
    with pytest.raises(ConnectionError):
        champion.conclude_shadow(config, "2", True, "shadow passed on 200 requests", {})
    mv = model_version(config, f"models:/{config.registered_model_name}/2")
    assert champion_number(config) == "1" and mv.tags["shadow_decision"] == "passed"
    assert "challenger" in registry_client(config).get_registered_model(config.registered_model_name).aliases
    # What the follower does at its next look (Follower._finish): conclude again.
    assert champion.conclude_shadow(config, "2", True, mv.tags["shadow_reason"], {})
    assert champion_number(config) == "2"
    assert [m for m in _moves(config) if m[2] == "2"] == [("promote", "1", "2", "FINISHED")]
