"""The served-artifact check's parts, against a small local HTTP server that answers like a Bento would."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import QuietHandler, local_http_server

from training.model.export import PARITY_TOLERANCE
from training.packaging.verify import ServedArtifactError, check_answers

CLASSES = ["cat", "dog"]
LINEAGE = {"X-Bento-Tag": "cifar10-classifier:abc", "X-MLflow-Model-Version": "2"}


@pytest.fixture
def fake_bento():
    """A server answering /predict and /predict_batch from ``state``: probabilities and headers."""
    state = {"probs": [0.9, 0.1], "headers": dict(LINEAGE), "status": 200, "extra": 0}

    class Handler(QuietHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            files = self.body().count(b"filename=")
            answer = {"class_id": int(np.argmax(state["probs"])), "label": CLASSES[int(np.argmax(state["probs"]))],
                      "probabilities": dict(zip(CLASSES, state["probs"]))}
            body = json.dumps([answer] * (files + state["extra"]) if self.path == "/predict_batch" else answer).encode()
            self.answer(state["status"], body, headers=state["headers"])

    with local_http_server(Handler) as url:
        yield url, state


IMAGES = np.zeros((4, 32, 32, 3), np.uint8)
EXPECTED = np.tile(np.array([0.9, 0.1], np.float32), (4, 1))


def test_matching_answers_pass_with_their_latency(fake_bento):
    url, _ = fake_bento
    check = check_answers(url, IMAGES, EXPECTED, CLASSES, LINEAGE, budget_ms=5000)
    assert check.requests == 5 and 0 < check.p99_ms < 5000 and check.max_abs_diff < 1e-6


@pytest.mark.parametrize("change, says", [
    ({"probs": [0.1, 0.9]}, "/predict: probabilities differ by up to 0.8 (> 0.0001); 4 of 4 images get another "
                            "class (image 0: class 1, expected 0)"),
    ({"probs": [0.9 - 10 * PARITY_TOLERANCE, 0.1 + 10 * PARITY_TOLERANCE]}, "/predict_batch: probabilities differ"),
    ({"headers": {**LINEAGE, "X-MLflow-Model-Version": "1"}}, "header X-MLflow-Model-Version is '1', expected '2'"),
    ({"status": 500}, "HTTP 500"),
    ({"extra": 1}, "/predict_batch: 5 answers to 4 images"),
])
def test_an_answer_unlike_the_exported_models_fails_and_says_how(fake_bento, change, says):
    url, state = fake_bento
    state.update(change)
    with pytest.raises(ServedArtifactError, match="problem") as err:
        check_answers(url, IMAGES, EXPECTED, CLASSES, LINEAGE, budget_ms=5000)
    assert says in str(err.value)


def test_a_slow_server_fails_the_latency_budget(fake_bento):
    url, _ = fake_bento
    with pytest.raises(ServedArtifactError, match=r"p99 latency .* over the budget of 0.001 ms"):
        check_answers(url, IMAGES, EXPECTED, CLASSES, LINEAGE, budget_ms=0.001)
