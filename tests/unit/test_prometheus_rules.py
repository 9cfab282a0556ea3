"""deploy/prometheus/cifar10-rules.yaml: valid PromQL, on series the service exports, at the pipeline's thresholds."""

from __future__ import annotations

import re

import numpy as np
import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry

from serving.drift import DriftWindow, reference_statistics
from serving.metrics import ServiceMetrics
from tests.helpers import CLASSES, ROOT, natural_images
from training.config import PipelineConfig

RULES = ROOT / "deploy" / "prometheus" / "cifar10-rules.yaml"


def _rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _exported_series() -> set[str]:
    """Sample names a worker's /metrics has after one answer."""
    registry = CollectorRegistry()
    reference = reference_statistics(natural_images(10), np.full(10, 0.9))  # as train makes it, with confidences
    metrics = ServiceMetrics(CLASSES, DriftWindow(reference, 8), registry=registry)
    metrics.observe(natural_images(1), np.full((1, len(CLASSES)), 0.1))
    metrics.publish()
    return {sample.name for family in registry.collect() for sample in family.samples}


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_each_rule_parses_and_is_complete(rule):
    promql_parser.parse(rule["expr"])  # raises ValueError naming the syntax error
    assert rule["for"] and rule["labels"]["severity"] and rule["annotations"]["summary"], rule


def test_rules_read_only_series_the_service_exports():
    exported = _exported_series()
    used = {name for rule in _rules() for name in re.findall(r"\bcifar10_[a-z_]+", rule["expr"])}
    assert used and used <= exported, f"not exported by serving/metrics.py: {sorted(used - exported)}"


def test_drift_alert_fires_where_the_monitor_retrains():
    config = PipelineConfig()
    (drift,) = [rule for rule in _rules() if rule["alert"] == "CIFAR10InputDrift"]
    assert re.search(r"cifar10_drift_score >= ([\d.]+)", drift["expr"]).group(1) == str(config.drift_threshold)
    assert re.search(r"cifar10_drift_window_images >= (\d+)", drift["expr"]).group(1) == str(config.drift_min_images)
