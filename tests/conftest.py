"""Fixtures only; what tests share otherwise lives in ``tests/helpers.py``."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.helpers import CLASSES, FAKE_LABELS, FAKE_METADATA, ServingModel, make_serving_model
from tests.helpers import S3Bucket, bucket_name, s3_client, seaweed_s3, shared_store, store_overrides


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
