"""Fault: a retrain that is worse than the champion changes nothing that is served.

The session's ``promoted_pipeline`` (tests/conftest.py) is run 1: the ``tiny`` recipe, run longer, learns the
generated classes; its version became champion, was imported into the BentoML store and built into a Bento.
Its answers are read from a real ``bentoml serve`` of the Bento the registry's champion names; then, on the
same state folder, run 2 is the same DAG with ``CIFAR10_LEARNING_RATE=0``: every SGD update (weight decay
included, Keras scales it by the learning rate) is multiplied by zero, so the weights stay at their seeded
random initialisation and the model is a chance-level classifier (about 1 in 10 on 10 balanced classes).
Deterministic: same seed, same initial weights, no learning at all.

Then: run 2 reused run 1's download and prepared data; the new version is registered and tagged "rejected"
with the reason, the ``champion`` alias has not moved, the Bento tasks were skipped (not failed) and the run
succeeded, the BentoML model store and the Bento list are byte-for-byte the same listing, and a fresh
``bentoml serve`` of what the registry's champion names now (what ``make serve`` starts) answers /metadata
and /predict exactly as run 1's did (while the rejected model, run on the same images, answers differently).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import requests

from tests.helpers import bentoml_cli_json, bentoml_serve, champion_bento, last_dag_run, run_dag, state_env
from tests.helpers import encode, make_images

MODEL = "cifar10-cnn"
BENTO_TASKS = ("import_model", "build", "containerize", "verify", "promote", "publish")
# One image of each class, drawn with another seed than the training archive.
IMAGES = [encode(img) for img in make_images(1, seed=7)[0]]


def _mlflow(env: dict[str, str]):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])


def _served(url: str) -> tuple[dict, list[dict]]:
    """What the server says it serves, and its answer for each of :data:`IMAGES`."""
    meta = requests.post(f"{url}/metadata", json={}, timeout=30)
    assert meta.status_code == 200, meta.text
    answers = []
    for i, data in enumerate(IMAGES):
        resp = requests.post(f"{url}/predict", files={"file": (f"{i}.png", data, "image/png")}, timeout=30)
        assert resp.status_code == 200, resp.text
        answers.append(resp.json())
    return meta.json(), answers


def _store(env: dict[str, str]) -> tuple[list, list]:
    """``bentoml models list`` and ``bentoml list`` (tags, sizes, creation times).

    A Bento's own size is left out: serving it compiles its Python sources into
    ``__pycache__`` inside the Bento's folder (unless PYTHONDONTWRITEBYTECODE is set).
    """
    bentos = [{k: v for k, v in b.items() if k != "size"} for b in bentoml_cli_json(env, "list")]
    return bentoml_cli_json(env, "models", "list"), bentos


def _rejected_model_answers(env: dict[str, str], run_id: str) -> np.ndarray:
    """The rejected version's own ONNX model on :data:`IMAGES`: what it would have served."""
    import mlflow

    from serving.model import onnx_session
    from serving.images import decode_image

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        onnx = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx/model.onnx",
                                                        dst_path=tmp))
        session = onnx_session(onnx)
        pixels = np.stack([decode_image(data) for data in IMAGES]).astype(np.float32)
        return session.run(None, {session.get_inputs()[0].name: pixels})[0]


def _served_by_the_champion(env: dict[str, str], log) -> tuple[str, dict, list[dict]]:
    """A fresh ``bentoml serve`` of the Bento the registry's champion names: that Bento, and what it answers."""
    bento = champion_bento(env)
    with bentoml_serve(bento, env, log) as url:
        meta, answers = _served(url)
    # Each start times float and int8 afresh; which one it chose is identity, the timings are not.
    for measured in ("float_img_s", "int8_img_s"):
        meta["precision"].pop(measured)
    return bento, meta, answers


def test_a_worse_retrain_leaves_champion_store_and_served_model_untouched(promoted_pipeline, tmp_path):
    state, env, conf = promoted_pipeline.state, promoted_pipeline.env, promoted_pipeline.conf

    # --- run 1: a model that learns; it became champion, and its Bento answers ----------------
    client = _mlflow(env)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    champion_accuracy = float(client.get_run(champion.run_id).data.metrics["test_accuracy"])
    assert str(champion.version) == "1" and champion.tags["gate_decision"] == "promoted"
    assert champion_accuracy >= 0.5, f"the model should learn the generated classes; got {champion_accuracy}"
    models_before, bentos_before = _store(env)
    assert len(models_before) == 1, models_before
    labels = bentoml_cli_json(env, "models", "get", models_before[0]["tag"])["labels"]
    assert labels["mlflow_version"] == "1" and labels["mlflow_run_id"] == champion.run_id
    assert len(bentos_before) == 1, bentos_before
    bento_before, meta_before, answers_before = _served_by_the_champion(env, tmp_path / "serve-run-1.log")
    assert bento_before == bentos_before[0]["tag"] == champion.tags["bento_tag"]
    assert meta_before["bento_tag"] == bento_before and meta_before["mlflow_version"] == "1"
    assert meta_before["bentoml_model_tag"] == models_before[0]["tag"]

    # --- run 2: the same DAG with a learning rate of 0, on the same state ------------------------
    log2 = tmp_path / "run-2.log"
    second = run_dag(state_env(state, CIFAR10_LEARNING_RATE="0"), conf, log2)
    text2 = log2.read_text()
    assert second.returncode == 0, text2[-5000:]
    # It fetched and prepared nothing: run 1's download and prepared data are reused.
    assert "cache hit" in text2 and "prepared data already present" in text2, text2[-5000:]

    # The new version exists and says it was not promoted, and why.
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(versions) == ["1", "2"]
    worse = versions["2"]
    worse_run = client.get_run(worse.run_id)
    worse_accuracy = float(worse_run.data.metrics["test_accuracy"])
    assert worse_run.data.params["learning_rate"] == "0.0"  # the override reached training
    assert worse_accuracy < champion_accuracy - 0.3, (worse_accuracy, champion_accuracy)
    assert worse.tags["gate_decision"] == "rejected"
    # Both were scored by the gate on this run's test split (the same split as run 1's here).
    rescored = float(worse.tags["gate_champion_accuracy"])
    assert worse.tags["gate_champion_version"] == "1" and abs(rescored - champion_accuracy) < 0.02
    assert worse.tags["gate_reason"] == (f"test_accuracy {float(worse.tags['gate_challenger_accuracy']):.4f} "
                                         f"does not beat the champion's {rescored:.4f} by min_improvement 0.0020")
    assert worse_run.data.tags["gate_decision"] == "rejected"  # the experiment view says so too

    # The alias did not move.
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert "champion" not in (client.get_model_version(MODEL, "2").aliases or [])

    # The run succeeded; the Bento tasks were skipped by the gate, not failed, not run.
    dag_state, tasks = last_dag_run(env)
    assert dag_state == "success", tasks
    for task in ("fetch", "prepare", "train", "register", "gate"):
        assert tasks[task] == "success", tasks
    for task in BENTO_TASKS:
        assert tasks[task] == "skipped", tasks
    assert "did NOT pass the gate" in text2 and "skipping the Bento tasks" in text2
    # Run 1's containerize ran and skipped itself (no builder); run 2's never started.
    assert "skipping containerize: container_backend=none" in promoted_pipeline.log
    assert "skipping containerize" not in text2

    # The BentoML store and the Bento list are exactly as they were.
    assert _store(env) == (models_before, bentos_before)

    # What the registry's champion names now is what run 1 served, and it answers exactly as it did ...
    bento_after, meta_after, answers_after = _served_by_the_champion(env, tmp_path / "serve-after-run-2.log")
    assert bento_after == bento_before
    assert meta_after == meta_before
    assert answers_after == answers_before
    # ... which is not what the rejected model would answer (so the check above has teeth).
    rejected = _rejected_model_answers(env, worse.run_id)
    served = np.array([[a["probabilities"][name] for name in meta_before["class_names"]]
                       for a in answers_before])
    assert not np.allclose(rejected, served, atol=1e-3)
