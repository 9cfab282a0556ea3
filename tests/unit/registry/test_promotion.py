"""The registry gate: pure decisions, and the champion alias in a real (temporary) MLflow store."""

from __future__ import annotations

import pytest
from tests.helpers import shared_store, store_overrides

from training.config import load_config
from training.registry.promotion import CHAMPION, decide, is_champion, register


def _config(**overrides):
    return load_config(overrides, environ={})


@pytest.mark.parametrize(
    ("accuracy", "champion", "overrides", "promote", "phrase"),
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
def test_decide(accuracy, champion, overrides, promote, phrase):
    decision = decide(accuracy, champion, _config(**overrides))
    assert decision.promote is promote
    assert phrase in decision.reason


@pytest.fixture
def store(tmp_path_factory, request):
    """Config overrides for the shared store with a registered-model name unique to this test."""
    return store_overrides(shared_store(tmp_path_factory), request.node.name.replace("[", "-").strip("]"))


def _fake_training_run(config, accuracy: float) -> str:
    """A run shaped like train()'s output (test_accuracy metric, logged_model_uri tag), without training."""
    import mlflow

    from training.registry.tracking import configure_mlflow

    configure_mlflow(config)
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model(name="model")
        mlflow.log_metric("test_accuracy", accuracy)
        mlflow.set_tag("logged_model_uri", f"models:/{model.model_id}")
        return run.info.run_id


def _version(config, uri):
    from mlflow import MlflowClient

    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    return MlflowClient(tracking_uri=config.tracking_uri).get_model_version(name, version)


def _champion_version(config) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    return str(client.get_model_version_by_alias(config.registered_model_name, CHAMPION).version)


def test_gate_promotes_better_and_keeps_champion_on_worse(store):
    from mlflow import MlflowClient

    config = _config(**store)
    first = register(config, _fake_training_run(config, 0.80))
    better = register(config, _fake_training_run(config, 0.90))
    worse = register(config, _fake_training_run(config, 0.85))
    assert [uri.rsplit("/", 1)[1] for uri in (first, better, worse)] == ["1", "2", "3"]
    assert _champion_version(config) == "2"

    promoted, rejected = _version(config, better), _version(config, worse)
    assert promoted.tags["gate_decision"] == "promoted"
    assert "0.9000 >= min_accuracy" in promoted.tags["gate_reason"]
    assert rejected.tags["gate_decision"] == "rejected"
    assert rejected.tags["gate_reason"] == ("test_accuracy 0.8500 does not beat the champion's 0.9000 "
                                            "by min_improvement 0.0020")
    assert rejected.tags["test_accuracy"] == "0.850000"
    run_tags = MlflowClient(tracking_uri=config.tracking_uri).get_run(rejected.run_id).data.tags
    assert run_tags["gate_decision"] == "rejected" and run_tags["gate_reason"] == rejected.tags["gate_reason"]
    # What the DAG's short-circuit gate task reads:
    assert is_champion(config, better) == (True, promoted.tags["gate_reason"])
    assert is_champion(config, worse) == (False, rejected.tags["gate_reason"])


def test_min_accuracy_blocks_even_the_first_model(store):
    config = _config(min_accuracy=0.9, **store)
    uri = register(config, _fake_training_run(config, 0.5))
    promoted, reason = is_champion(config, uri)
    assert not promoted
    assert reason == "test_accuracy 0.5000 < min_accuracy 0.9000"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        MlflowClient(tracking_uri=config.tracking_uri).get_model_version_by_alias(
            config.registered_model_name, CHAMPION)


def test_force_promote_overrides_a_worse_model(store):
    config = _config(**store)
    register(config, _fake_training_run(config, 0.9))
    forced = _config(force_promote=True, **store)
    uri = register(forced, _fake_training_run(forced, 0.3))
    assert is_champion(config, uri)[0]
    assert _champion_version(config) == uri.rsplit("/", 1)[1]
    assert _version(config, uri).tags["gate_reason"].startswith("force_promote set by operator")


def test_importing_a_version_that_lost_the_champion_alias_fails_before_packaging_it(store, tmp_path):
    from training.packaging.bento import import_champion

    config = _config(state_dir=str(tmp_path), **store)
    old = register(config, _fake_training_run(config, 0.80))
    register(config, _fake_training_run(config, 0.90))  # promoted while the first run was still going
    with pytest.raises(RuntimeError, match=rf"{old} is not the champion any more .*version 2 is.*rerun this DAG run"):
        import_champion(config, old)
    assert not (tmp_path / "bentoml").exists()  # refused before the BentoML store was touched
