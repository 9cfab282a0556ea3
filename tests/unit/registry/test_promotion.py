"""The registry gate: pure decisions, then fair scoring and candidates in a real (temporary) MLflow store,
with real ONNX models scored on a real prepared split. Promotion and rollback: tests/unit/deploy/test_champion.py."""

from __future__ import annotations

import json

import pytest
from tests.helpers import champion_number, model_version, registry_client, training_run, write_prepared

from training.config import load_config
from training.deploy.champion import promote
from training.registry.promotion import (CANDIDATE, FAILED_SERVING, REJECTED, decide, is_candidate,
                                         mark_failed_serving, previous_champion, register)

# A test split where class 0 is 50% of the images, class 1 30%, class 2 20%: a model that always
# answers class k scores exactly that share.
SPLIT = [0] * 50 + [1] * 30 + [2] * 20


def _config(**overrides):
    # No image to tag: promotion's image step logs that and goes on.
    return load_config({"container_backend": "none", **overrides}, environ={})


@pytest.mark.parametrize(
    ("accuracy", "champion", "overrides", "promote_", "phrase"),
    [
        (0.50, None, {}, True, "no champion yet"),
        (0.91, 0.90, {}, True, "beats the champion's 0.9000 by >= 0.0020"),
        (0.902, 0.90, {}, True, "beats the champion's"),  # exactly the margin passes
        # A tie never replaces the champion: a retrain on the same data must not redeploy.
        (0.90, 0.90, {}, False, "does not beat the champion's 0.9000 by min_improvement 0.0020"),
        (0.901, 0.90, {}, False, "does not beat"),
        (0.90, 0.90, {"min_improvement": 0.0}, True, "beats the champion's 0.9000 by >= 0.0000"),
        (0.89, 0.90, {}, False, "does not beat the champion's 0.9000"),
        (0.80, None, {"min_accuracy": 0.85}, False, "< min_accuracy 0.8500"),
        (0.95, 0.90, {"min_accuracy": 0.96}, False, "< min_accuracy"),
        (0.10, 0.90, {"min_accuracy": 0.5, "force_promote": True}, True, "force_promote"),
    ],
)
def test_decide(accuracy, champion, overrides, promote_, phrase):
    decision = decide(accuracy, champion, _config(**overrides))
    assert decision.promote is promote_
    assert phrase in decision.reason


@pytest.fixture
def prepared(tmp_path):
    return write_prepared(tmp_path / "prepared", SPLIT, digest="d" * 64)


def _register_and_promote(config, tmp_path, prepared, answers: int, **kw) -> str:
    uri = register(config, training_run(config, tmp_path, answers, **kw), prepared)
    assert is_candidate(config, uri)[0], model_version(config, uri).tags
    promote(config, uri, f"cifar10-classifier:v{uri[-1]}", by="test")
    return uri


def test_register_makes_a_candidate_and_moves_nothing(store, tmp_path, prepared):
    config = _config(**store)
    uri = register(config, training_run(config, tmp_path, answers=1), prepared)
    assert uri.endswith("/1")
    passed, reason = is_candidate(config, uri)
    assert passed and "0.3000 >= min_accuracy" in reason and "no champion yet" in reason
    assert model_version(config, uri).tags["gate_decision"] == CANDIDATE
    assert champion_number(config) is None  # only promote() moves the alias, after the served check


def test_the_champion_is_rescored_on_the_challengers_split_not_trusted(store, tmp_path, prepared):
    """The champion claims 0.99 on the data it was trained on; on this run's split it scores 0.2."""
    config = _config(**store)
    other = write_prepared(tmp_path / "other", [2] * 10, digest="e" * 64)
    _register_and_promote(config, tmp_path, other, answers=2, stored_accuracy=0.99, digest="e" * 64)
    uri = register(config, training_run(config, tmp_path, answers=1), prepared)  # 0.3 on SPLIT
    mv = model_version(config, uri)
    assert mv.tags["gate_decision"] == CANDIDATE, mv.tags
    assert mv.tags["gate_champion_version"] == "1"
    assert mv.tags["gate_champion_accuracy"] == "0.200000" and mv.tags["gate_challenger_accuracy"] == "0.300000"
    assert mv.tags["gate_dataset_digest"] == "d" * 64
    run = registry_client(config).get_run(mv.run_id)
    assert run.data.metrics["gate_champion_accuracy"] == pytest.approx(0.2)
    assert run.data.metrics["gate_champion_accuracy_bird"] == 1.0  # per class: the champion answers bird
    assert run.data.metrics["gate_challenger_accuracy_automobile"] == 1.0
    assert "gate_champion_accuracy_cat" not in run.data.metrics  # no cats in the split: no number
    comparison = json.loads(_download(config, mv.run_id, tmp_path))
    assert comparison["champion"]["accuracy"] == pytest.approx(0.2)
    assert comparison["champion_dataset_digest"] == "e" * 64
    assert any("trained on other data" in note for note in comparison["notes"])


def _download(config, run_id, folder) -> str:
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="gate/comparison.json",
                                               dst_path=str(folder))
    return open(path).read()


def test_a_tie_and_a_worse_model_are_rejected(store, tmp_path, prepared):
    config = _config(**store)
    _register_and_promote(config, tmp_path, prepared, answers=0)  # 0.5
    tie = register(config, training_run(config, tmp_path, answers=0, stored_accuracy=0.9), prepared)
    worse = register(config, training_run(config, tmp_path, answers=2), prepared)
    assert is_candidate(config, tie) == (False, "test_accuracy 0.5000 does not beat the champion's 0.5000 "
                                                "by min_improvement 0.0020")
    assert model_version(config, worse).tags["gate_decision"] == REJECTED
    assert registry_client(config).get_run(model_version(config, worse).run_id).data.tags["gate_decision"] == REJECTED
    assert champion_number(config) == "1"


def test_min_accuracy_blocks_even_the_first_model(store, tmp_path, prepared):
    config = _config(min_accuracy=0.9, **store)
    uri = register(config, training_run(config, tmp_path, answers=0), prepared)
    assert is_candidate(config, uri) == (False, "test_accuracy 0.5000 < min_accuracy 0.9000")


def test_force_promote_makes_a_worse_model_a_candidate(store, tmp_path, prepared):
    config = _config(**store)
    _register_and_promote(config, tmp_path, prepared, answers=0)
    forced = _config(force_promote=True, **store)
    uri = register(forced, training_run(forced, tmp_path, answers=2), prepared)
    assert is_candidate(config, uri)[0]
    assert model_version(config, uri).tags["gate_reason"].startswith("force_promote set by operator")


def test_failed_serving_is_recorded_and_keeps_it_out_of_rollbacks(store, tmp_path, prepared):
    config = _config(**store)
    _register_and_promote(config, tmp_path, prepared, answers=2)
    broken = register(config, training_run(config, tmp_path, answers=1), prepared)
    mark_failed_serving(config, broken, "served-artifact check failed: HTTP 500")
    assert model_version(config, broken).tags["gate_decision"] == FAILED_SERVING
    assert not is_candidate(config, broken)[0]
    assert champion_number(config) == "1"
    third = _register_and_promote(config, tmp_path, prepared, answers=0)
    # The version before the champion that held the alias: 1, never the one that failed its check.
    assert str(previous_champion(registry_client(config), config.registered_model_name, third[-1]).version) == "1"
    assert previous_champion(registry_client(config), config.registered_model_name, "1") is None
