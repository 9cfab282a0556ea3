"""The service's ``/metrics`` (Prometheus text) and ``/metadata``, read into one record. The drift gauges
have one series per worker (each keeps its own window); the names are ``serving/drift.py``'s and service.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DRIFT_SCORE = "cifar10_drift_score"
WINDOW_IMAGES = "cifar10_drift_window_images"
PREDICTIONS = "cifar10_predictions_total"
CONFIDENCE = "cifar10_prediction_confidence"
# Answers at or below this top-class probability count as unsure (a bucket bound of the histogram).
LOW_CONFIDENCE = 0.5
TIMEOUT_S = 10.0  # for each request to the service


class MonitorError(RuntimeError):
    """The service could not be read."""


@dataclass(frozen=True)
class Worker:
    """One worker's window: its drift score and how many images it holds."""

    labels: tuple[tuple[str, str], ...]
    score: float
    images: int


@dataclass(frozen=True)
class Observation:
    """One scrape of the service. Counts are cumulative since the service started."""

    workers: tuple[Worker, ...]
    predictions: dict[str, float] = field(default_factory=dict)
    confidence_count: float = 0.0
    confidence_sum: float = 0.0
    low_confidence: float = 0.0  # answers with confidence <= LOW_CONFIDENCE
    bento_tag: str = ""
    model_version: str = ""

    def evidence(self, min_images: int) -> list[Worker]:
        """Workers whose window holds enough images for their score to mean something."""
        return [w for w in self.workers if w.images >= min_images]

    def drift_score(self, min_images: int) -> float | None:
        """The worst score among workers with enough images; ``None`` when none has enough."""
        scores = [w.score for w in self.evidence(min_images)]
        return max(scores) if scores else None

    @property
    def window_images(self) -> int:
        return max((w.images for w in self.workers), default=0)


def parse(text: str) -> Observation:
    """An :class:`Observation` from Prometheus text; series of other metrics are ignored."""
    from prometheus_client.parser import text_string_to_metric_families

    scores, images, predictions, buckets = {}, {}, {}, {}
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            if sample.name == DRIFT_SCORE:
                scores[labels] = sample.value
            elif sample.name == WINDOW_IMAGES:
                images[labels] = int(sample.value)
            elif sample.name == PREDICTIONS:
                predictions[sample.labels.get("class", "")] = sample.value
            elif sample.name == f"{CONFIDENCE}_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{CONFIDENCE}_count":
                count = sample.value
            elif sample.name == f"{CONFIDENCE}_sum":
                total = sample.value
    workers = tuple(Worker(labels, scores[labels], images.get(labels, 0)) for labels in sorted(scores))
    low = max((v for le, v in buckets.items() if le <= LOW_CONFIDENCE), default=0.0)
    return Observation(workers, predictions, count, total, low)


def scrape(url: str, timeout: float = TIMEOUT_S) -> Observation:
    """GET ``url``/metrics and POST ``url``/metadata; :class:`MonitorError` saying what to fix otherwise."""
    import dataclasses

    import requests

    from serving.settings import client_headers

    where = f"{url} (CIFAR10_MONITOR_URL)"
    try:
        metrics = requests.get(f"{url}/metrics", timeout=timeout, headers=client_headers())
        metadata = requests.post(f"{url}/metadata", json={}, timeout=timeout, headers=client_headers())
    except requests.RequestException as exc:
        raise MonitorError(f"the service at {where} did not answer: {type(exc).__name__}: {exc}. "
                           "Start it (make serve, make up) or point the setting at it.") from exc
    for resp in (metrics, metadata):
        if resp.status_code != 200:
            raise MonitorError(f"{resp.url} answered HTTP {resp.status_code}: {resp.text[:300]}; is {where} "
                               "the CIFAR-10 service (and, where it has a token, CIFAR10_API_TOKEN set here too)?")
    observation = parse(metrics.text)
    info = metadata.json()
    return dataclasses.replace(observation, bento_tag=str(info.get("bento_tag", "")),
                               model_version=str(info.get("mlflow_version", "")))
