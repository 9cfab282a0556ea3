"""Fixtures only; what tests share otherwise lives in ``tests/helpers.py``."""

from __future__ import annotations

import pytest

from tests.helpers import CLASSES, FAKE_LABELS, FAKE_METADATA, ServingModel, make_serving_model


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory) -> ServingModel:
    """A tiny ONNX CIFAR-10 model in a temporary BentoML store (built once per test session)."""
    home = tmp_path_factory.mktemp("bentoml-home")
    tag = make_serving_model(home)
    return ServingModel(home=home, tag=tag, labels=dict(FAKE_LABELS), metadata={**FAKE_METADATA, "class_names": CLASSES})
