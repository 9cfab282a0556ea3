"""The service's Prometheus metrics, recorded into a private registry."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from serving.drift import DriftWindow, reference_statistics
from serving.metrics import ServiceMetrics, drift_window
from tests.helpers import CLASSES, natural_images


def probabilities(classes: list[int], confidence: float) -> np.ndarray:
    probs = np.full((len(classes), len(CLASSES)), (1 - confidence) / (len(CLASSES) - 1))
    probs[np.arange(len(classes)), classes] = confidence
    return probs


def test_observe_counts_classes_confidence_and_drift():
    registry = CollectorRegistry()
    window = DriftWindow(reference_statistics(natural_images(100)), 64)
    metrics = ServiceMetrics(CLASSES, window, registry=registry)
    value = registry.get_sample_value
    assert value("cifar10_predictions_total", {"class": "truck"}) == 0  # every class reported from the start
    metrics.observe(natural_images(3, seed=5), probabilities([1, 1, 9], 0.9))
    metrics.observe(255 - natural_images(2, seed=6), probabilities([3, 1], 0.4))
    assert not value("cifar10_drift_window_images")  # scored by publish, off the request path
    metrics.publish()
    assert value("cifar10_predictions_total", {"class": "automobile"}) == 3
    assert value("cifar10_predictions_total", {"class": "truck"}) == 1
    assert value("cifar10_predictions_total", {"class": "cat"}) == 1
    assert value("cifar10_prediction_confidence_count") == 5
    assert value("cifar10_prediction_confidence_bucket", {"le": "0.5"}) == 2
    assert value("cifar10_prediction_confidence_sum") == pytest.approx(3 * 0.9 + 2 * 0.4)
    assert value("cifar10_drift_window_images") == 5
    assert value("cifar10_drift_score") == pytest.approx(window.score())
    assert value("cifar10_drift_score") > 0
    assert value("cifar10_reference_low_confidence_share") is None  # the reference has no confidences


def test_reference_low_confidence_share_is_exported():
    registry = CollectorRegistry()
    reference = reference_statistics(natural_images(20), np.array([0.3] * 5 + [0.95] * 15))
    ServiceMetrics(CLASSES, DriftWindow(reference, 8), registry=registry)
    assert registry.get_sample_value("cifar10_reference_low_confidence_share") == pytest.approx(0.25)


def test_only_the_last_window_of_queued_images_is_scored():
    window = DriftWindow(reference_statistics(natural_images(100)), 10)
    metrics = ServiceMetrics(CLASSES, window, registry=CollectorRegistry())
    for seed in range(8):
        metrics.observe(natural_images(4, seed=seed), probabilities([0] * 4, 0.9))
    assert metrics._pending_images < 10 + 4  # older batches dropped before they were ever scored
    metrics.publish()
    assert len(window) == 10 and metrics._pending == []


def test_without_a_window_no_drift_series_is_set():
    registry = CollectorRegistry()
    ServiceMetrics(CLASSES, None, registry=registry).observe(natural_images(2), probabilities([0, 0], 0.8))
    assert registry.get_sample_value("cifar10_predictions_total", {"class": "airplane"}) == 2
    assert registry.get_sample_value("cifar10_drift_window_images") is None
    assert registry.get_sample_value("cifar10_drift_score") is None


def test_drift_window_from_model_metadata(caplog):
    reference = reference_statistics(natural_images(20))
    assert drift_window({"drift_reference": reference}, 32).size == 32
    assert drift_window({"drift_reference": reference}, 0) is None
    with caplog.at_level(logging.WARNING):
        assert drift_window({}, 32) is None
        assert drift_window({"drift_reference": {**reference, "version": 7}}, 32) is None
    assert "no drift_reference" in caplog.text and "version 7" in caplog.text
