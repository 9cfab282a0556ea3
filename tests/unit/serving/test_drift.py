"""The drift score: in-distribution windows stay under the default threshold, strongly shifted ones pass it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.drift import BINS, PIXEL_GROUPS, DriftWindow, ReferenceError, js_distance, reference_statistics
from tests.helpers import STRONG_SHIFTS, image_shifts, natural_images
from training.config import PipelineConfig

THRESHOLD = PipelineConfig().drift_threshold


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_statistics(natural_images(400, seed=0))


def window_score(reference: dict, images: np.ndarray, size: int = 256) -> float:
    window = DriftWindow(reference, size)
    for start in range(0, len(images), 64):  # batches, as the service adds them
        score = window.add(images[start:start + 64], np.full(len(images[start:start + 64]), 0.9))
    return score


def test_reference_is_json_with_normalised_groups(reference):
    loaded = json.loads(json.dumps(reference))
    assert loaded["images"] == 400 and loaded["bins"] == BINS
    assert list(loaded["groups"]) == list(PIXEL_GROUPS)  # no confidences given: no confidence group
    for hist in loaded["groups"].values():
        assert len(hist) == BINS and sum(hist) == pytest.approx(1.0, abs=1e-6)


def test_reference_with_confidences_has_that_group():
    ref = reference_statistics(natural_images(20), np.array([0.95] * 10 + [0.3] * 5 + [0.8] * 5))
    assert ref["groups"]["confidence"][:4] == pytest.approx([0.25, 0, 0.25, 0.5])  # <0.5, <0.75, <0.9, >=0.9
    assert sum(ref["groups"]["confidence"][4:]) == 0


@pytest.mark.parametrize("size", [PipelineConfig().drift_min_images, 256])  # the fewest the monitor judges, the default
def test_in_distribution_windows_stay_under_the_threshold(reference, size):
    for seed in range(11, 16):
        score = window_score(reference, natural_images(size, seed=seed), size)
        assert score < THRESHOLD / 2, f"seed {seed}: an in-distribution window scored {score:.3f}"


@pytest.mark.parametrize("shift", STRONG_SHIFTS)
def test_strong_shifts_pass_the_threshold(reference, shift):
    images = image_shifts(np.random.default_rng(1))[shift](natural_images(256, seed=11))
    assert window_score(reference, images) > THRESHOLD


def test_window_keeps_only_the_last_images(reference):
    calm, shifted = natural_images(100, seed=11), 255 - natural_images(100, seed=12)
    window = DriftWindow(reference, 100)
    window.add(calm, np.full(100, 0.9))
    mixed = window.add(shifted[:50], np.full(50, 0.9))
    assert len(window) == 100
    final = window.add(shifted[50:], np.full(50, 0.9))
    assert len(window) == 100
    assert final == pytest.approx(window_score(reference, shifted, 100))  # the calm images are all gone
    assert window_score(reference, calm, 100) < mixed < final


def test_confidence_group_moves_with_the_models_certainty():
    images = natural_images(256, seed=11)
    ref = reference_statistics(natural_images(400, seed=0), np.full(400, 0.97))
    sure, unsure = DriftWindow(ref, 256), DriftWindow(ref, 256)
    assert sure.add(images, np.full(256, 0.97)) < THRESHOLD / 2
    unsure.add(images, np.full(256, 0.35))
    assert unsure.distances()["confidence"] == pytest.approx(1.0)
    assert unsure.score() == pytest.approx(1.0)


def test_empty_window_scores_zero(reference):
    assert DriftWindow(reference, 10).score() == 0.0


def test_js_distance_bounds():
    assert js_distance([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize("change, message", [({"version": 99}, "version 99"),
                                             ({"groups": {"red": [1.0] * BINS}}, "lacks the groups")])
def test_unusable_reference_says_what_to_do(reference, change, message):
    with pytest.raises(ReferenceError, match=message) as info:
        DriftWindow({**reference, **change}, 10)
    assert "retrain" in str(info.value)
