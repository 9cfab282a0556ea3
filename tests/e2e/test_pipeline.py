"""End to end: what one real run of the DAG (``airflow dags test`` on a generated archive) leaves behind, and a
real ``bentoml serve`` of the Bento the registry's champion names.

It reads the session's ``promoted_pipeline`` (tests/conftest.py) and runs no DAG of its own. A second run on the
same state reusing the download: tests/e2e/test_faults_champion.py; a retrain that ties the champion:
tests/e2e/test_scheduled_retraining.py; more versions, the served-artifact gate and rollbacks:
tests/e2e/test_model_lifecycle.py.
"""

from __future__ import annotations

import math
import time

import pytest
import requests

from tests.helpers import CLASSES, bentoml_cli_json, encode, make_images

MODEL = "cifar10-cnn"
# Every task of a run whose model became champion, on a machine without a container builder or an export URI.
TASKS = {**{t: "success" for t in ("fetch", "prepare", "train", "register", "gate", "import_model", "build", "verify",
                                   "promote")}, "containerize": "skipped", "publish": "skipped"}


def _mlflow_client(env):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])


def test_a_promoting_run_succeeds_task_by_task_and_skips_containerize_and_publish_saying_why(promoted_pipeline):
    assert promoted_pipeline.dag_state == "success", promoted_pipeline.tasks
    assert promoted_pipeline.tasks == TASKS
    assert "skipping containerize: container_backend=none" in promoted_pipeline.log
    assert "bento_export_uri is empty: the Bento stays in this machine's store" in promoted_pipeline.log


def test_mlflow_has_the_run_its_metrics_and_version_1_as_champion(promoted_pipeline):
    client = _mlflow_client(promoted_pipeline.env)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    v1 = client.get_model_version(MODEL, "1")
    assert v1.tags["gate_decision"] == "promoted" and "no champion yet" in v1.tags["gate_reason"], v1.tags
    run = client.get_run(v1.run_id)
    epochs = promoted_pipeline.conf["epochs"]
    assert run.data.params["epochs"] == str(epochs) and run.data.params["recipe"] == "tiny"
    assert [m.step for m in client.get_metric_history(v1.run_id, "val_accuracy")] == list(range(1, epochs + 1))
    assert {a.path for a in client.list_artifacts(v1.run_id, "onnx")} == {
        "onnx/model.onnx", "onnx/classes.json", "onnx/drift_reference.json",  # what the Bento serves
        "onnx/model.int8.onnx", "onnx/precision.json"}  # and the int8 candidate, with how it compares


def test_bentoml_store_has_the_champion_with_lineage_labels_and_drift_reference(promoted_pipeline):
    env = promoted_pipeline.env
    champion = _mlflow_client(env).get_model_version_by_alias(MODEL, "champion")
    [tag] = [m["tag"] for m in bentoml_cli_json(env, "models", "list")]  # only a promoted version is imported
    model = bentoml_cli_json(env, "models", "get", tag)
    assert {k: model["labels"][k] for k in ("mlflow_model", "mlflow_version", "mlflow_run_id")} == {
        "mlflow_model": MODEL, "mlflow_version": "1", "mlflow_run_id": champion.run_id}, model["labels"]
    # The drift reference travels in the model's metadata, so every Bento of it can score its inputs.
    reference = (model.get("metadata") or {}).get("drift_reference") or {}
    assert set(reference.get("groups", {})) == {"red", "green", "blue", "contrast", "colour", "confidence"}, model


@pytest.mark.parametrize("fmt,name,mime", [("PNG", "car.png", "image/png"), ("JPEG", "car.jpg", "image/jpeg")])
def test_the_champions_bento_answers_with_a_prediction(promoted_server, fmt, name, mime):
    data = encode(make_images(1, seed=7)[0][1], fmt)
    resp = requests.post(f"{promoted_server}/predict", files={"file": (name, data, mime)}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["label"] == CLASSES[body["class_id"]]
    assert list(body["probabilities"]) == CLASSES
    assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-4)
    assert body["confidence"] == max(body["probabilities"].values())


def test_the_champions_bento_reports_a_drift_score(promoted_server):
    from training.monitor.metrics import parse

    files = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(make_images(2, seed=8)[0])]
    assert requests.post(f"{promoted_server}/predict_batch", files=files, timeout=60).status_code == 200
    deadline = time.monotonic() + 10  # the drift gauges are updated once a second
    while not (observation := parse(requests.get(f"{promoted_server}/metrics", timeout=30).text)).window_images:
        assert time.monotonic() < deadline, f"no worker reports a drift window: {observation}"
        time.sleep(0.5)
