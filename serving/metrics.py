"""The service's own Prometheus metrics, next to BentoML's request metrics on ``/metrics``.

- ``cifar10_batch_size``: images per ONNX Runtime call (histogram).
- ``cifar10_predictions_total{class}``: answers per predicted class (counter).
- ``cifar10_prediction_confidence``: the top-class probability of each answer (histogram).
- ``cifar10_drift_score``: the drift score of the worker's last ``CIFAR10_DRIFT_WINDOW`` images
  against the model's training data (:mod:`serving.drift`; gauge, one series per worker, ``pid``
  label), updated once a second.
- ``cifar10_drift_window_images``: how many images that worker's window holds (gauge, same labels).
- ``cifar10_reference_low_confidence_share``: the share of validation images the model answered with
  confidence under 0.5 (from its drift reference), so an alert can compare the served share with it.

The metrics are made where a worker starts, not at import: BentoML gives each worker a
Prometheus multiprocess folder, and ``prometheus_client`` must be imported after it is set.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from serving.drift import DriftWindow

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Fine near 1, where a trained model's answers gather; 0.5 is a bucket bound, so the share of
# unsure answers (confidence <= 0.5) is a ratio of two series.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    """The service's metrics; :meth:`observe` records one batch of answers. Thread-safe.

    Counts are recorded as answers go out. The drift score is not: :meth:`observe` only queues the
    images, and :meth:`publish` (a background thread, once every ``publish_s``) scores them all in
    one call, so a request pays nothing for it; the gauges lag by at most that interval.
    """

    def __init__(self, class_names: list[str], drift: DriftWindow | None, registry=None):
        import prometheus_client as prom

        registry = prom.REGISTRY if registry is None else registry
        self.class_names = class_names
        self.drift = drift
        self.batch_size = prom.Histogram("cifar10_batch_size", "Images per ONNX Runtime call (in-process batching)",
                                         buckets=BATCH_BUCKETS, registry=registry)
        self.predictions = prom.Counter("cifar10_predictions", "Answers per predicted class", ["class"],
                                        registry=registry)
        self.confidence = prom.Histogram("cifar10_prediction_confidence", "Top-class probability of each answer",
                                         buckets=CONFIDENCE_BUCKETS, registry=registry)
        # The drift series exist only with a window: a series at 0 would read as "no drift" (and, for the
        # reference share, "this model is never unsure"). liveall: a worker that exits takes its window
        # with it, instead of reporting its last score forever.
        if drift is not None:
            self.drift_score = prom.Gauge("cifar10_drift_score", "Drift of this worker's recent inputs from the "
                                          "training data: largest Jensen-Shannon distance of a statistic, 0 to 1",
                                          multiprocess_mode="liveall", registry=registry)
            self.window_images = prom.Gauge("cifar10_drift_window_images", "Images in this worker's drift window",
                                            multiprocess_mode="liveall", registry=registry)
        if drift is not None and drift.low_confidence_share is not None:
            prom.Gauge("cifar10_reference_low_confidence_share", "Share of validation images the model answered "
                       "with confidence under 0.5 (its drift reference)", multiprocess_mode="max",
                       registry=registry).set(drift.low_confidence_share)
        # Every class has a series from the start, so rate() and ratios work before its first answer.
        self._class_counters = [self.predictions.labels(name) for name in class_names]
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_images = 0
        self._lock = threading.Lock()

    def observe(self, images: np.ndarray, probs: np.ndarray) -> None:
        """Record a batch: uint8 images (n, 32, 32, 3) and their probabilities (n, classes)."""
        import numpy as np

        confidences = probs.max(axis=1)
        for class_id, count in enumerate(np.bincount(probs.argmax(axis=1), minlength=len(self.class_names))):
            if count:
                self._class_counters[class_id].inc(int(count))
        for value in confidences.tolist():
            self.confidence.observe(value)
        if self.drift is not None:
            with self._lock:
                self._pending.append((images, confidences))
                self._pending_images += len(images)
                # Only the window's last `size` images can count: older queued ones are dropped unscored.
                while self._pending_images - len(self._pending[0][0]) >= self.drift.size:
                    self._pending_images -= len(self._pending.pop(0)[0])

    def publish(self) -> None:
        """Score the queued images into the drift window and set the drift gauges."""
        import numpy as np

        with self._lock:
            pending, self._pending, self._pending_images = self._pending, [], 0
        if self.drift is None or not pending:
            return
        images = np.concatenate([p[0] for p in pending])
        self.drift_score.set(self.drift.add(images, np.concatenate([p[1] for p in pending])))
        self.window_images.set(len(self.drift))

    def start_publishing(self, every_s: float = 1.0) -> None:
        """Run :meth:`publish` every ``every_s`` seconds in a daemon thread (nothing to do without a window)."""
        if self.drift is None:
            return

        def loop() -> None:
            while True:
                time.sleep(every_s)
                try:
                    self.publish()
                except Exception:  # a failed update must not stop the later ones
                    log.exception("updating the drift score failed")

        threading.Thread(target=loop, name="drift-score", daemon=True).start()


def drift_window(metadata: dict, size: int) -> DriftWindow | None:
    """The model's drift window, or ``None`` (logged once) when it is off or the model has no reference."""
    from serving.drift import DriftWindow, ReferenceError

    if size == 0:
        log.info("drift scoring is off (CIFAR10_DRIFT_WINDOW=0)")
        return None
    reference = metadata.get("drift_reference")
    if not reference:
        log.warning("the model has no drift_reference in its metadata (trained before drift monitoring): "
                    "cifar10_drift_score is not reported; retrain to get one")
        return None
    try:
        return DriftWindow(reference, size)
    except ReferenceError as exc:
        log.warning("cifar10_drift_score is not reported: %s", exc)
        return None
