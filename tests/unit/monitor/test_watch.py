"""The drift monitor's check: parse the service's metrics, decide, record in a real MLflow store.

A small local HTTP server answers /metrics and /metadata as the service does, so ``observe`` runs
whole: scrape, decision, the MLflow run of the served Bento, its metric history and plot.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from training.config import load_config
from training.monitor.metrics import MonitorError, Observation, Worker, parse
from training.monitor.watch import decide, event_extra, interval_metrics, observe
from tests.helpers import QuietHandler, free_port, local_http_server, shared_store, store_overrides

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def metrics_text(workers: list[tuple[float, int]], predictions: dict[str, int], low: int = 0) -> str:
    """Prometheus text as a multi-worker service exports it (one gauge series per worker)."""
    lines = ["# HELP cifar10_drift_score Drift of the recent inputs", "# TYPE cifar10_drift_score gauge"]
    lines += [f'cifar10_drift_score{{worker="{i}"}} {s}' for i, (s, _) in enumerate(workers)]
    lines += ["# HELP cifar10_drift_window_images Images in the window", "# TYPE cifar10_drift_window_images gauge"]
    lines += [f'cifar10_drift_window_images{{worker="{i}"}} {n}' for i, (_, n) in enumerate(workers)]
    lines += ["# HELP cifar10_predictions_total Answers by class", "# TYPE cifar10_predictions_total counter"]
    lines += [f'cifar10_predictions_total{{class="{c}"}} {n}' for c, n in predictions.items()]
    total = sum(predictions.values())
    lines += ["# HELP cifar10_prediction_confidence Top-class probability",
              "# TYPE cifar10_prediction_confidence histogram",
              f'cifar10_prediction_confidence_bucket{{le="0.5"}} {low}',
              f'cifar10_prediction_confidence_bucket{{le="1.0"}} {total}',
              f'cifar10_prediction_confidence_bucket{{le="+Inf"}} {total}',
              f"cifar10_prediction_confidence_count {total}", f"cifar10_prediction_confidence_sum {0.8 * total}",
              "# HELP bentoml_service_request_total other metrics are ignored",
              "# TYPE bentoml_service_request_total counter", 'bentoml_service_request_total{endpoint="/predict"} 9']
    return "\n".join(lines) + "\n"


def test_parse_pairs_each_workers_score_with_its_window():
    obs = parse(metrics_text([(0.1, 300), (0.7, 20)], {"cat": 5, "dog": 15}, low=4))
    assert [(w.score, w.images) for w in obs.workers] == [(0.1, 300), (0.7, 20)]
    assert obs.predictions == {"cat": 5.0, "dog": 15.0}
    assert (obs.confidence_count, obs.low_confidence) == (20.0, 4.0)
    # The worker with 20 images is below drift_min_images: its high score is not evidence.
    assert obs.drift_score(min_images=50) == 0.1 and obs.drift_score(min_images=10) == 0.7
    assert obs.drift_score(min_images=500) is None and obs.window_images == 300


def _obs(score: float, images: int = 200) -> Observation:
    return Observation((Worker((("worker", "0"),), score, images),))


@pytest.mark.parametrize("obs, last, drifted, retrain, says", [
    (_obs(0.05), None, False, False, "under drift_threshold 0.3"),
    (_obs(0.9, images=10), None, False, False, "too few to judge"),
    (_obs(0.3), None, True, True, "retraining"),  # at the threshold counts
    (_obs(0.9), NOW - timedelta(hours=2), True, False, "within drift_cooldown_hours=24"),
    (_obs(0.9), NOW - timedelta(hours=25), True, True, "retraining"),
])
def test_decide(obs, last, drifted, retrain, says):
    decision = decide(load_config({"drift_threshold": 0.3}, environ={}), obs, last, NOW)
    assert (decision.drifted, decision.retrain) == (drifted, retrain)
    assert says in decision.reason


def test_class_mix_is_of_the_answers_since_the_last_check_and_survives_a_restart():
    first = interval_metrics(parse(metrics_text([(0.1, 60)], {"cat": 30, "dog": 10})), {})
    assert first["class_share_cat"] == 0.75 and first["predictions_interval"] == 40
    second = interval_metrics(parse(metrics_text([(0.1, 60)], {"cat": 30, "dog": 50})), first)
    assert second["class_share_dog"] == 1.0 and second["predictions_interval"] == 40
    # A restarted service counts from zero: its counts are all new, not negative.
    restarted = interval_metrics(parse(metrics_text([(0.1, 60)], {"cat": 2, "dog": 2})), second)
    assert restarted["class_share_cat"] == 0.5 and restarted["predictions_interval"] == 4
    quiet = interval_metrics(parse(metrics_text([(0.1, 60)], {"cat": 2, "dog": 2})), restarted)
    assert quiet["predictions_interval"] == 0 and "class_share_cat" not in quiet


@pytest.fixture
def service():
    """/metrics and /metadata of a one-worker service; the test sets what /metrics says."""
    state = {"metrics": metrics_text([(0.05, 200)], {"cat": 10, "dog": 10})}

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.answer(200, state["metrics"].encode(), "text/plain; version=0.0.4")

        def do_POST(self):  # noqa: N802
            self.body()
            self.answer(200, json.dumps({"bento_tag": "cifar10-classifier:abc", "mlflow_version": "3"}).encode())

    with local_http_server(Handler) as url:
        yield url, state


def test_each_check_is_a_point_of_the_served_bentos_run_with_a_plot(service, tmp_path_factory, request):
    from mlflow import MlflowClient

    url, state = service
    config = load_config({**store_overrides(shared_store(tmp_path_factory), request.node.name),
                          "monitor_url": url}, environ={})
    assert observe(config) == ""  # in distribution: no retraining
    state["metrics"] = metrics_text([(0.62, 200)], {"cat": 10, "dog": 60})
    uri = observe(config)
    assert uri.startswith("runs:/")
    assert observe(config, last_event_at=datetime.now(timezone.utc)) == ""  # in the cooldown

    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(f"{config.experiment_name}-monitoring")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["bento_tag"] == "cifar10-classifier:abc"
    run_id = runs[0].info.run_id
    assert [m.value for m in client.get_metric_history(run_id, "drift_score")] == [0.05, 0.62, 0.62]
    assert [m.value for m in client.get_metric_history(run_id, "drift_event")] == [0, 1, 0]
    assert [m.value for m in client.get_metric_history(run_id, "class_share_dog")] == [0.5, 1.0]
    assert "cooldown" in runs[0].data.tags["last_check"]
    plot = client.download_artifacts(run_id, "drift.png", str(tmp_path_factory.mktemp("plot")))
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    extra = event_extra(config, uri)
    assert extra["drift_score"] == 0.62 and extra["window_images"] == 200
    assert extra["bento_tag"] == "cifar10-classifier:abc" and extra["mlflow_model_version"] == "3"
    json.dumps(extra)  # an asset event's extra must be JSON


def test_a_service_that_does_not_answer_fails_the_check_naming_the_setting():
    config = load_config({"monitor_url": f"http://127.0.0.1:{free_port()}"}, environ={})
    with pytest.raises(MonitorError, match="CIFAR10_MONITOR_URL"):
        observe(config)


def test_the_check_sends_the_services_token_from_its_environment(monkeypatch):
    """A service started with CIFAR10_API_TOKEN answers /metrics and /metadata only with it."""
    from training.monitor.metrics import scrape

    seen = []

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != "Bearer s3cret":
                return self.answer(401, b'{"error": "missing or wrong bearer token"}')
            self.answer(200, metrics_text([(0.05, 200)], {"cat": 1}).encode(), "text/plain; version=0.0.4")

        def do_POST(self):  # noqa: N802
            self.body()
            seen.append(self.headers.get("Authorization"))
            self.answer(200, json.dumps({"bento_tag": "cifar10-classifier:abc", "mlflow_version": "3"}).encode())

    with local_http_server(Handler) as url:
        monkeypatch.delenv("CIFAR10_API_TOKEN", raising=False)
        with pytest.raises(MonitorError, match="answered HTTP 401.*CIFAR10_API_TOKEN set here too"):
            scrape(url, timeout=5)
        monkeypatch.setenv("CIFAR10_API_TOKEN", "s3cret")
        assert scrape(url, timeout=5).bento_tag == "cifar10-classifier:abc"
    assert seen[-2:] == ["Bearer s3cret", "Bearer s3cret"]
