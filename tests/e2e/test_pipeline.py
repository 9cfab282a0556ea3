"""End to end: the real DAG on a generated dataset, then a real ``bentoml serve`` of its Bento.

Runs ``airflow dags test`` twice on the same state folder (the second run must reuse
the downloaded data and add a model version without breaking the first), then checks
MLflow, the BentoML store, the Bento, and HTTP answers.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.helpers import TINY_DAG_CONF, bentoml_cli_json, bentoml_serve, run_dag, state_env
from tests.helpers import CLASSES, encode, image_folder_zip, make_images

CONF = TINY_DAG_CONF


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """State folder after two DAG runs on the same generated archive."""
    tmp = tmp_path_factory.mktemp("pipeline")
    archive = image_folder_zip(tmp / "cifar-mini.zip", per_class=30, fmt="PNG")
    state = tmp / "state"
    env = state_env(state)
    conf = {**CONF, "data_url": archive.as_uri()}
    logs = []
    for i in (1, 2):
        log = tmp / f"dag-run-{i}.log"
        result = run_dag(env, conf, log)
        assert result.returncode == 0, log.read_text()[-5000:]
        logs.append(log.read_text())
    return {"state": state, "env": env, "logs": logs, "tmp": tmp}


def _mlflow_client(pipeline):
    import mlflow

    uri = pipeline["env"]["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_every_task_succeeded_but_containerize_skipped(pipeline):
    log = pipeline["logs"][0]
    for task in ["fetch", "prepare", "train", "register", "gate", "import_model", "build"]:
        assert f"task_id={task}" in log
    assert "skipping containerize: container_backend=none" in log
    assert "state=success" in log or "successful" in log


def test_second_run_reuses_download_and_prepared_data(pipeline):
    assert "cache hit" in pipeline["logs"][1]
    assert "prepared data already present" in pipeline["logs"][1]


def test_mlflow_has_runs_metrics_and_champion(pipeline):
    client = _mlflow_client(pipeline)
    versions = sorted(client.search_model_versions("name='cifar10-cnn'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    champion = client.get_model_version_by_alias("cifar10-cnn", "champion")
    assert str(champion.version) in {"1", "2"}
    for v in versions:
        run = client.get_run(v.run_id)
        assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
        assert len(client.get_metric_history(v.run_id, "val_accuracy")) == CONF["epochs"]
        assert run.data.params["epochs"] == str(CONF["epochs"])
        assert v.tags["gate_decision"] in {"promoted", "rejected"}
        assert client.list_artifacts(v.run_id, "onnx")  # the served artifact exists for every run


def test_bentoml_store_has_the_champion_with_lineage_labels(pipeline):
    client = _mlflow_client(pipeline)
    champion = client.get_model_version_by_alias("cifar10-cnn", "champion")
    tags = [m["tag"] for m in bentoml_cli_json(pipeline["env"], "models", "list")]
    models = [bentoml_cli_json(pipeline["env"], "models", "get", tag) for tag in tags]
    labels = [m.get("labels") or {} for m in models]
    assert any(lb.get("mlflow_run_id") == champion.run_id and lb.get("mlflow_version") == str(champion.version)
               and lb.get("mlflow_model") == "cifar10-cnn" for lb in labels), models
    # The drift reference travels in the model's metadata, so every Bento of it can score its inputs.
    served = next(m for m, lb in zip(models, labels) if lb.get("mlflow_run_id") == champion.run_id)
    reference = (served.get("metadata") or {}).get("drift_reference") or {}
    assert {"red", "green", "blue", "contrast", "colour", "confidence"} <= set(reference.get("groups", {})), served


def test_served_bento_reports_a_drift_score(server):
    from training.monitor.metrics import parse

    files = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(make_images(2, seed=8)[0])]
    assert requests.post(f"{server}/predict_batch", files=files, timeout=60).status_code == 200
    deadline = time.monotonic() + 10  # the drift gauges are updated once a second
    while not (observation := parse(requests.get(f"{server}/metrics", timeout=30).text)).window_images:
        assert time.monotonic() < deadline, f"no worker reports a drift window: {observation}"
        time.sleep(0.5)


def test_bento_was_built(pipeline):
    bentos = bentoml_cli_json(pipeline["env"], "list")
    assert any(b["tag"].startswith("cifar10-classifier:") for b in bentos), bentos


@pytest.fixture(scope="module")
def server(pipeline):
    with bentoml_serve("cifar10-classifier:latest", pipeline["env"], pipeline["tmp"] / "serve.log") as url:
        yield url


def _image_bytes(fmt: str) -> bytes:
    x, _ = make_images(1, seed=7)
    return encode(x[1], fmt)


@pytest.mark.parametrize("fmt,name,mime", [("PNG", "car.png", "image/png"), ("JPEG", "car.jpg", "image/jpeg")])
def test_predict_answers_with_a_valid_class(server, fmt, name, mime):
    resp = requests.post(f"{server}/predict", files={"file": (name, _image_bytes(fmt), mime)}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["label"] in CLASSES
    assert body["label"] == CLASSES[body["class_id"]]
    assert set(body["probabilities"]) == set(CLASSES)
    assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-4)
    assert body["confidence"] == max(body["probabilities"].values())


def test_predict_rejects_a_non_image_with_400(server):
    resp = requests.post(f"{server}/predict", files={"file": ("notes.png", b"this is not an image", "image/png")},
                         timeout=30)
    assert resp.status_code == 400, resp.text
    assert "image" in resp.text.lower()


def test_large_odd_image_is_resized_not_rejected(server):
    buf = io.BytesIO()
    Image.fromarray(np.full((300, 500, 4), 128, dtype=np.uint8), "RGBA").save(buf, format="PNG")
    resp = requests.post(f"{server}/predict", files={"file": ("big.png", buf.getvalue(), "image/png")}, timeout=30)
    assert resp.status_code == 200, resp.text
