"""The model's life after the first deploy, for real: DAG runs, the served-artifact gate, lineage, rollback.

One state folder (real MLflow store, real BentoML store, real ``airflow dags test`` runs, real
``bentoml serve``), in order:

1. run 1 trains and promotes version 1; run 2 (more epochs, ``force_promote``) promotes version 2.
   After each, a fresh ``bentoml serve`` of the Bento the registry names answers a fixed set of
   images; its lineage headers must name what the registry holds.
2. run 3 passes the quality gate but its Bento misses the served-artifact gate's p99 budget: the
   run fails, version 3 is tagged ``failed_serving``, and ``champion``, the served Bento and the
   ``latest`` pointers are untouched.
3. A Bento whose service cannot load its model fails the served-artifact check with the server's
   own error, and nothing moves.
4. ``make rollback`` moves ``champion`` back to version 1 and the service then answers exactly as
   version 1 did; the rollback DAG moves it to version 2 after its Bento was deleted, which is
   rebuilt, and answers exactly as version 2 did. Every move is recorded.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import BIN, ROOT, TINY_DAG_CONF, bentoml_cli_json, bentoml_serve, champion_bento, encode
from tests.helpers import image_folder_zip, make_images, migrate, run_dag, state_env

MODEL = "cifar10-cnn"
LINEAGE = ("X-Bento-Tag", "X-MLflow-Model", "X-MLflow-Model-Version", "X-MLflow-Run-Id")
# One image of each class, drawn with another seed than the training archive.
IMAGES = [encode(img) for img in make_images(1, seed=7)[0]]


def _client(env):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])


def _answers(env, tmp: Path, name: str) -> dict:
    """Serve the champion's Bento afresh; its lineage headers and probabilities for :data:`IMAGES`."""
    import requests

    bento = champion_bento(env)
    with bentoml_serve(bento, env, tmp / f"serve-{name}.log") as url:
        headers, probs = set(), []
        for i, data in enumerate(IMAGES):
            resp = requests.post(f"{url}/predict/", files={"file": (f"{i}.png", data, "image/png")}, timeout=30)
            assert resp.status_code == 200, resp.text
            headers.add(tuple(resp.headers.get(h) for h in LINEAGE))
            probs.append([resp.json()["probabilities"][c] for c in sorted(resp.json()["probabilities"])])
        batch = requests.post(f"{url}/predict_batch", files=[("files", ("a.png", IMAGES[0], "image/png"))],
                              timeout=30)
        assert batch.status_code == 200, batch.text
        headers.add(tuple(batch.headers.get(h) for h in LINEAGE))
    assert len(headers) == 1, headers  # every answer names the same thing
    return {"bento": bento, "lineage": dict(zip(LINEAGE, headers.pop())), "probs": np.array(probs)}


def _expect_lineage(env, answers: dict, version: str) -> None:
    """The headers name the champion version, its run and the Bento the registry records for it."""
    mv = _client(env).get_model_version(MODEL, version)
    assert answers["lineage"] == {"X-Bento-Tag": mv.tags["bento_tag"], "X-MLflow-Model": MODEL,
                                  "X-MLflow-Model-Version": version, "X-MLflow-Run-Id": mv.run_id}
    assert answers["bento"] == mv.tags["bento_tag"]


def _bentos(env) -> list[str]:
    out = subprocess.run([str(BIN / "bentoml"), "list", "-o", "json"], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return sorted(b["tag"] for b in json.loads(out.stdout))


@pytest.fixture(scope="module")
def life(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    archive = image_folder_zip(tmp / "cifar-mini.zip", per_class=30, fmt="PNG")
    state = tmp / "state"
    # No retries: a failing check must fail the run at once, not after a retry delay.
    env = state_env(state, CIFAR10_TASK_RETRIES="0")
    conf = {**TINY_DAG_CONF, "data_url": archive.as_uri()}
    seen: dict = {"env": env, "tmp": tmp, "state": state, "conf": conf}
    migrate(env)
    for i, extra in ((1, {}), (2, {"epochs": 3, "force_promote": True})):
        result = run_dag(env, {**conf, **extra}, tmp / f"run-{i}.log")
        assert result.returncode == 0, (tmp / f"run-{i}.log").read_text()[-5000:]
        seen[f"v{i}"] = _answers(env, tmp, f"v{i}")
    return seen


def test_each_promoted_version_is_served_with_lineage_headers_that_match_the_registry(life):
    env = life["env"]
    assert str(_client(env).get_model_version_by_alias(MODEL, "champion").version) == "2"
    _expect_lineage(env, life["v1"], "1")
    _expect_lineage(env, life["v2"], "2")
    assert life["v1"]["bento"] != life["v2"]["bento"]
    assert not np.allclose(life["v1"]["probs"], life["v2"]["probs"], atol=1e-3)  # two different models
    log = (life["tmp"] / "run-1.log").read_text()
    assert "served-artifact check of the bento passed" in log
    # Promotion is recorded: why, by which Airflow run, what came before.
    v2 = _client(env).get_model_version(MODEL, "2")
    assert v2.tags["champion_action"] == "promote" and v2.tags["champion_previous"] == "1"
    assert v2.tags["champion_by"].startswith("airflow:cifar10_pipeline/")
    assert v2.tags["champion_reason"].startswith("force_promote")
    assert v2.tags["served_check"].startswith("passed: bento")


@pytest.fixture(scope="module")
def failed_gate(life):
    """Run 3: a tie is allowed through the quality gate, but the p99 budget is impossible."""
    env, tmp = life["env"], life["tmp"]
    before = {"bentos": _bentos(env), "champion": champion_bento(env)}
    conf = {**life["conf"], "epochs": 3, "min_improvement": 0, "served_p99_budget_ms": 0.001}
    result = run_dag(env, conf, tmp / "run-3.log")
    return {"result": result, "log": (tmp / "run-3.log").read_text(), "before": before}


def test_a_bento_that_fails_the_served_check_fails_the_run_and_moves_nothing(life, failed_gate):
    env = life["env"]
    assert failed_gate["result"].returncode != 0, failed_gate["log"][-3000:]
    assert "over the budget of 0.001 ms (served_p99_budget_ms)" in failed_gate["log"]
    assert "champion was not moved" in failed_gate["log"]
    client = _client(env)
    v3 = client.get_model_version(MODEL, "3")
    assert v3.tags["gate_decision"] == "failed_serving"
    assert "p99 latency" in v3.tags["gate_reason"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert "champion_since" not in v3.tags
    # The failed Bento stays in the store for inspection, but is not what serving starts.
    assert champion_bento(env) == failed_gate["before"]["champion"]
    assert len(_bentos(env)) == len(failed_gate["before"]["bentos"]) + 1


def test_a_bento_whose_service_cannot_load_its_model_fails_the_check(life, failed_gate):
    """Version 3's Bento, with its model file in the store truncated: the server cannot start."""
    env = life["env"]
    bento = next(b for b in _bentos(env) if b not in failed_gate["before"]["bentos"])
    v3_run = _client(env).get_model_version(MODEL, "3").run_id
    tags = [m["tag"] for m in bentoml_cli_json(env, "models", "list")]
    tag = next(t for t in tags
               if (bentoml_cli_json(env, "models", "get", t).get("labels") or {}).get("mlflow_run_id") == v3_run)
    name, version = tag.split(":")
    (life["state"] / "bentoml" / "models" / name / version / "model.onnx").write_bytes(b"not an onnx model")
    prepared = next((life["state"] / "data" / "prepared").glob("*/manifest.json")).parent
    # In its own process, as the DAG's task: BentoML settles on one store per process.
    code = ("import sys; from pathlib import Path; from training.config import load_config; "
            "from training.packaging.verify import verify; "
            "verify(load_config(), 'models:/cifar10-cnn/3', sys.argv[1], Path(sys.argv[2]))")
    out = subprocess.run([str(BIN / "python"), "-c", code, bento, str(prepared)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "ServedArtifactError" in out.stderr, out.stderr[-3000:]
    assert "the service exited before it was ready" in out.stderr and "INVALID_PROTOBUF" in out.stderr
    assert "champion was not moved" in out.stderr
    assert str(_client(env).get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert champion_bento(env) == failed_gate["before"]["champion"]


def test_make_rollback_serves_the_previous_version_as_it_answered(life, failed_gate):
    env, tmp = life["env"], life["tmp"]
    make_env = {k: v for k, v in env.items() if not k.startswith(("CIFAR10_", "MLFLOW_", "BENTOML_", "AIRFLOW"))}
    out = subprocess.run(["make", "rollback", f"STATE={life['state']}", "REASON=v2 misclassifies trucks"],
                         env=make_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "champion: version 2 -> 1; Bento " + life["v1"]["bento"] in out.stdout
    assert "(rebuilt)" not in out.stdout  # version 1's Bento was still in the store
    client = _client(env)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    v1 = client.get_model_version(MODEL, "1")
    assert v1.tags["champion_action"] == "rollback" and v1.tags["champion_reason"] == "v2 misclassifies trucks"
    assert v1.tags["champion_by"].startswith("cli:") and v1.tags["champion_previous"] == "2"
    now = _answers(env, tmp, "rollback-1")
    assert now["lineage"] == life["v1"]["lineage"]
    np.testing.assert_allclose(now["probs"], life["v1"]["probs"], atol=1e-6)


def test_rollback_dag_rebuilds_a_deleted_bento_and_serves_that_version(life, failed_gate):
    env, tmp = life["env"], life["tmp"]
    subprocess.run([str(BIN / "bentoml"), "delete", "-y", life["v2"]["bento"]], env=env, check=True,
                   capture_output=True, timeout=120)
    result = run_dag(env, {"version": 2, "reason": "v1 was worse"}, tmp / "rollback-dag.log", "cifar10_rollback")
    assert result.returncode == 0, (tmp / "rollback-dag.log").read_text()[-5000:]
    client = _client(env)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    v2 = client.get_model_version(MODEL, "2")
    assert v2.tags["champion_by"].startswith("airflow:cifar10_rollback/")
    assert v2.tags["bento_tag"] != life["v2"]["bento"]  # rebuilt: a new Bento of the same model
    now = _answers(env, tmp, "rollback-2")
    assert now["lineage"] == {**life["v2"]["lineage"], "X-Bento-Tag": v2.tags["bento_tag"]}
    np.testing.assert_allclose(now["probs"], life["v2"]["probs"], atol=1e-6)
    # Every move of the alias, in order, in MLflow.
    experiment = client.get_experiment_by_name("cifar10-champion")
    moves = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [(r.data.tags["action"], r.data.tags["from_version"], r.data.tags["to_version"]) for r in moves] == [
        ("promote", "", "1"), ("promote", "1", "2"), ("rollback", "2", "1"), ("rollback", "1", "2")]
