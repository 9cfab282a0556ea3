"""Fixtures, and the time limits of the long modules; what tests share otherwise lives in ``tests/helpers.py``."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.helpers import CLASSES, FAKE_LABELS, FAKE_METADATA, PipelineRun, ServingModel, make_serving_model
from tests.helpers import S3Bucket, bucket_name, s3_client, seaweed_s3, shared_store, store_overrides
from tests.helpers import ROOT, bentoml_serve, champion_bento, run_learning_pipeline

# Seconds each test of these modules may take (pytest-timeout), over pyproject.toml's default of 600: their
# first test also pays for the module's or the session's DAG runs, stacks and servers. Each is a few times
# what the module takes on the 2-core VM, so that only a hang reaches it, and fails one test, not the CI job.
LONG_MODULES = {
    "tests/e2e/test_container_image.py": 2400,  # the base image, a DAG run that builds the image
    "tests/e2e/test_drift_retraining.py": 1800,  # its scenario alone may take 900 s
    "tests/e2e/test_faults_champion.py": 1800,  # the session's promoted pipeline, a retrain, two servers
    "tests/e2e/test_faults_training.py": 1800,  # a killed run and its rerun; an outage outlasted by retries
    "tests/e2e/test_jax_export.py": 900,  # its child process may take 600 s
    "tests/e2e/test_model_lifecycle.py": 1800,  # three DAG runs, a rollback run, five servers
    "tests/e2e/test_pipeline.py": 1200,  # the session's promoted pipeline, a server
    "tests/e2e/test_private_by_default.py": 1800,  # make up may take 1200 s
    "tests/e2e/test_scaleout.py": 2400,  # the distributed stack up, a run of up to 900 s, the stack down
    "tests/e2e/test_scheduled_retraining.py": 2400,  # its scenario alone may take 1500 s
}


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory) -> ServingModel:
    """A tiny ONNX CIFAR-10 model in a temporary BentoML store (built once per test session)."""
    home = tmp_path_factory.mktemp("bentoml-home")
    tag = make_serving_model(home)
    return ServingModel(home=home, tag=tag, labels=dict(FAKE_LABELS), metadata={**FAKE_METADATA, "class_names": CLASSES})


@pytest.fixture(scope="session")
def int8_serving_model(tmp_path_factory) -> ServingModel:
    """Like :func:`serving_model`, with an int8 candidate that its precision setting forces."""
    home = tmp_path_factory.mktemp("bentoml-home-int8")
    tag = make_serving_model(home, precision="int8")
    return ServingModel(home=home, tag=tag, labels=dict(FAKE_LABELS), metadata={**FAKE_METADATA, "class_names": CLASSES})


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """One SeaweedFS S3 server for the whole session (its endpoint URL); each test takes its own bucket."""
    with seaweed_s3(root=tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server, request) -> S3Bucket:
    """A new, empty bucket on the session's S3 server, named after the test."""
    bucket = S3Bucket(s3_server, bucket_name(request.node.name))
    s3_client(s3_server).create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture
def store(tmp_path_factory, request) -> dict[str, str]:
    """Config overrides for the session's MLflow store with an experiment and model name unique to this test."""
    import re

    return store_overrides(shared_store(tmp_path_factory), re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-"))


@pytest.fixture(scope="session")
def promoted_pipeline(tmp_path_factory) -> PipelineRun:
    """One real DAG run (``airflow dags test``) that trained a model that learns, promoted it as version 1 and
    built its Bento, shared by the e2e files that read it rather than run their own.

    A test may add to its state only what must leave the champion, the BentoML store and the Bentos as
    they were (tests/e2e/test_faults_champion.py's rejected retrain, which asserts exactly that).
    """
    return run_learning_pipeline(tmp_path_factory.mktemp("promoted-pipeline"))


@pytest.fixture(scope="module")
def promoted_server(promoted_pipeline, tmp_path_factory) -> Iterator[str]:
    """A real ``bentoml serve`` of the Bento the registry's champion names in :func:`promoted_pipeline`; its URL."""
    env = promoted_pipeline.env
    with bentoml_serve(champion_bento(env), env, tmp_path_factory.mktemp("promoted-serve") / "serve.log") as url:
        yield url


def pytest_collection_modifyitems(items) -> None:
    """Each test of :data:`LONG_MODULES` gets its module's time limit, unless it sets its own."""
    gone = [module for module in LONG_MODULES if not (ROOT / module).is_file()]
    if gone:
        raise pytest.UsageError(f"tests/conftest.py LONG_MODULES names {gone}, which do not exist: update it")
    for item in items:
        seconds = LONG_MODULES.get(item.path.relative_to(ROOT).as_posix())
        if seconds and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds))
