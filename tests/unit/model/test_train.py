"""Tiny-data training runs (seconds): every artifact and metric a run promises is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import ROOT, shared_store, store_overrides
from PIL import Image
from tests.helpers import CLASSES, image_folder_zip

from training.config import load_config
from training.data.prepare import prepare


EPOCHS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the tests below: (config, run_id, prepared_dir)."""
    import mlflow  # noqa: F401  (fail early with a clear import error)

    from training.model.train import train

    tmp = tmp_path_factory.mktemp("train")
    config = load_config({"state_dir": str(tmp / "state"), "recipe": "tiny", "epochs": EPOCHS,
                          **store_overrides(shared_store(tmp_path_factory), "train")}, environ={})
    archive = image_folder_zip(tmp / "data.zip", per_class=20)
    prepared = prepare(archive, config)
    return config, train(config, prepared), prepared


def _client(config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking_uri)


def test_metrics_exist_for_every_epoch(trained):
    config, run_id, _ = trained
    client = _client(config)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), f"{key}: {steps}"
    metrics = client.get_run(run_id).data.metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    for name in CLASSES:
        assert 0.0 <= metrics[f"test_accuracy_{name}"] <= 1.0
    assert metrics["onnx_max_abs_diff"] <= 1e-4


def test_params_and_tags_describe_the_run(trained):
    config, run_id, _ = trained
    run = _client(config).get_run(run_id)
    for key, value in config.as_params().items():
        assert run.data.params[key] == str(value)[:6000]
    assert run.data.tags["git_commit"]
    assert run.data.tags["logged_model_uri"].startswith("models:/")
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest


def test_png_artifacts_are_valid_images(trained, tmp_path):
    import mlflow

    config, run_id, _ = trained
    mlflow.set_tracking_uri(config.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots", dst_path=str(tmp_path))
    for name in ("learning_curves.png", "confusion_matrix.png", "test_samples.png"):
        with Image.open(f"{folder}/{name}") as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    table = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evaluation/per_class_accuracy.json", dst_path=str(tmp_path))).read())
    assert sorted(table) == sorted(CLASSES)


def test_onnx_artifact_matches_keras_model(trained, tmp_path):
    import mlflow

    from serving.model import onnx_session

    from training.model.export import check_parity, onnx_probabilities
    from training.data.prepare import load_prepared

    config, run_id, prepared = trained
    mlflow.set_tracking_uri(config.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx", dst_path=str(tmp_path))
    assert json.loads(open(f"{folder}/classes.json").read()) == CLASSES
    model_uri = _client(config).get_run(run_id).data.tags["logged_model_uri"]
    model = mlflow.keras.load_model(model_uri)
    pixels = load_prepared(prepared)[0]["test"][0][:16].astype(np.float32)
    reference = np.asarray(model(pixels, training=False))
    assert np.allclose(reference.sum(axis=1), 1.0, atol=1e-4)
    assert check_parity(onnx_probabilities(onnx_session(f"{folder}/model.onnx"), pixels), reference, "run") <= 1e-4


def test_drift_reference_describes_the_training_split(trained, tmp_path):
    import mlflow

    from serving.drift import PIXEL_GROUPS, DriftWindow, reference_statistics
    from training.data.prepare import load_prepared

    config, run_id, prepared = trained
    mlflow.set_tracking_uri(config.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx", dst_path=str(tmp_path))
    reference = json.loads(open(f"{folder}/drift_reference.json").read())
    splits = load_prepared(prepared)[0]
    assert reference["images"] == len(splits["train"][0])
    expected = reference_statistics(splits["train"][0])["groups"]
    assert {g: reference["groups"][g] for g in PIXEL_GROUPS} == expected
    # The model's confidence on held-out images: one value per validation image.
    assert sum(reference["groups"]["confidence"]) == pytest.approx(1.0, abs=1e-6)
    DriftWindow(reference, 16)  # the service can use it


def test_logged_model_requirements_are_the_locked_versions(trained):
    """MLflow's requirements.txt pins keras and TensorFlow exactly as uv.lock does: no guessing."""
    import tomllib

    import mlflow

    config, run_id, _ = trained
    mlflow.set_tracking_uri(config.tracking_uri)
    model_uri = _client(config).get_run(run_id).data.tags["logged_model_uri"]
    lines = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text().split()
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    assert f"keras=={locked['keras']}" in lines, lines
    assert any(f"{name}=={locked[name]}" in lines for name in ("tensorflow-cpu", "tensorflow")), lines
    assert all("==" in line for line in lines), f"unpinned requirement in {lines}"


@pytest.mark.parametrize("scale", [1.0, 64.0])
def test_batchnorm_biases_learn_bias_lr_scale_times_faster(scale, monkeypatch):
    """One SGD step moves BatchNorm biases ``BIAS_LR_SCALE`` x further than scale 1 would,
    and conv kernels exactly as far either way."""
    import keras

    from training.model import fit
    from training.model.network import build_model

    def step(bias_lr_scale):
        monkeypatch.setattr(fit, "BIAS_LR_SCALE", bias_lr_scale)
        model = build_model((8, 16, 16), 10, seed=0)
        model.compile(optimizer=fit.make_optimizer(load_config({"recipe": "tiny"}, environ={}), total_steps=10),
                      loss="categorical_crossentropy")
        before = [np.array(v) for v in (model.get_layer("block0a_bn").beta, model.get_layer("block0a_conv").kernel)]
        x = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3)).astype(np.float32)
        model.train_on_batch(x, keras.utils.to_categorical(np.arange(32) % 10, 10))
        after = [np.array(v) for v in (model.get_layer("block0a_bn").beta, model.get_layer("block0a_conv").kernel)]
        return [a - b for a, b in zip(after, before)]

    (beta_1, kernel_1), (beta_s, kernel_s) = step(1.0), step(scale)
    assert np.abs(beta_1).max() > 0
    np.testing.assert_allclose(beta_s, scale * beta_1, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(kernel_s, kernel_1, rtol=1e-6, atol=1e-9)


def test_prefer_onednn_sets_the_flag_only_before_tensorflow_and_never_over_the_user(monkeypatch, caplog):
    import os
    import sys

    from training.model.fit import prefer_onednn

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # the user's choice wins
    prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"

    # Too late to matter once TensorFlow is loaded: say what to do instead of pretending.
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    with caplog.at_level("WARNING"):
        prefer_onednn()
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ
    assert "set TF_ENABLE_ONEDNN_OPTS=1 in the environment" in caplog.text


def test_fitting_splits_move_validation_into_training_but_a_stratified_holdout(monkeypatch):
    from training.model import train
    from training.model.train import fitting_splits

    rng = np.random.default_rng(0)
    x = lambda n: rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    y_val = np.repeat(np.arange(10), 50)  # archive (class) order, as prepare stores it
    splits = {"train": (x(300), np.arange(300) % 10), "val": (x(500), y_val), "test": (x(40), np.arange(40) % 10)}
    monkeypatch.setattr(train, "VALIDATION_HOLDOUT", 100)
    config = load_config(environ={})
    fitted = fitting_splits(config, splits)
    assert len(fitted["train"][1]) == 300 + 400 and len(fitted["val"][1]) == 100
    assert np.bincount(fitted["val"][1]).tolist() == [10] * 10
    assert fitted["test"] is splits["test"]
    # Every validation image is either held out or trained on, never both.
    held = {img.tobytes() for img in fitted["val"][0]}
    assert not held & {img.tobytes() for img in fitted["train"][0]}
    assert len(held | {img.tobytes() for img in fitted["train"][0][300:]}) == 500
    assert fitting_splits(config, splits)["val"][1].tolist() == fitted["val"][1].tolist()  # seeded
    monkeypatch.setattr(train, "VALIDATION_HOLDOUT", 500)
    assert fitting_splits(config, splits) is splits  # no validation images to spare
