"""The service's runtime settings, read from ``CIFAR10_<FIELD>`` environment variables where it starts."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field


def _cpu_share() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 quota if one is set."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


SWITCHES = ("access_log", "trace_requests")  # settings that are 0 (off) or 1 (on)
ZERO_ALLOWED = ("infer_nice", "compute_slots", "drift_window")  # other counts must be positive
# Routes left out of OpenTelemetry unless CIFAR10_TRACE_REQUESTS=1 (OpenTelemetry's
# excluded_urls: comma-separated regular expressions searched in the request URL).
UNTRACED = "/predict,/predict_batch,/metadata"


@dataclass(frozen=True)
class ServingSettings:
    """Runtime settings of the service, read from ``CIFAR10_<FIELD>`` environment variables.

    They are read where the service starts (container or ``bentoml serve``), not at
    build time, so one Bento can be tuned per deployment. Defaults that depend on the
    machine (its CPU share) are computed when an instance is made, never at import.
    """

    max_batch_size: int = 64  # most images in one ONNX Runtime call
    # A request that waited longer than this in the batch queue is answered 503
    # (shed load instead of letting latency grow without bound).
    max_latency_ms: int = 1000
    max_files: int = 64  # most files in one /predict_batch request (more: 400)
    max_body_bytes: int = 10 * 1024 * 1024  # larger request bodies: 413
    max_concurrency: int = 256  # requests in flight per worker (more: 429, BentoML's limit)
    # Worker processes, each with its own event loop, model and batcher: one process's
    # request handling holds the GIL and cannot feed two cores, so one per CPU, at most 4.
    workers: int = field(default_factory=lambda: min(_cpu_share(), 4))
    # ONNX Runtime intra-op threads per model call. One: batches run side by side
    # (model_concurrency), which scales better than threads that synchronise per layer.
    model_threads: int = 1
    # Batches one worker runs at once, each in its own thread (ONNX Runtime releases
    # the GIL): the CPU share, not share/workers, so a worker holding most connections
    # can still use every core.
    model_concurrency: int = field(default_factory=lambda: max(1, _cpu_share()))
    # Niceness the model threads add to the process's (0-19). Positive: a worker's event
    # loop (parse, decode, answer) runs before model compute when both want a core, so
    # requests reach the queue sooner and batches are the larger for it.
    infer_nice: int = 10
    # Model calls running at once across all workers (serving/slots.py): the CPU share,
    # so no two calls time-share a core. 0: no machine-wide cap (each worker still runs
    # up to model_concurrency).
    compute_slots: int = field(default_factory=_cpu_share)
    access_log: int = 1  # 1: one log line per request (BentoML access log); 0: off, saves CPU under load
    # 1: OpenTelemetry spans for the API routes (set it with a tracing exporter in BentoML's
    # configuration). 0: the routes are excluded from tracing, because BentoML runs its
    # tracing middleware on every request even when nothing exports the spans.
    trace_requests: int = 0
    # Recent images per worker that cifar10_drift_score compares with the training data (serving/drift.py).
    # Fewer react sooner but score noisier (an in-distribution window of 256 stays near 0.05); 0: off.
    drift_window: int = 256

    def service_options(self) -> dict:
        """``@bentoml.service`` options these settings decide (service.py and bench/http_floor.py)."""
        options = {"workers": self.workers, "traffic": {"timeout": 30, "max_concurrency": self.max_concurrency},
                   "logging": {"access": {"enabled": bool(self.access_log)}}}
        if not self.trace_requests:
            options["tracing"] = {"excluded_urls": UNTRACED}
        return options

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServingSettings:
        """Defaults overridden by ``CIFAR10_MAX_BATCH_SIZE`` etc.; rejects non-positive counts and switches not 0/1."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, default in asdict(cls()).items():
            raw = environ.get(f"CIFAR10_{name.upper()}")
            value = default if raw is None else int(raw)
            if name in SWITCHES and value not in (0, 1):
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be 0 (off) or 1 (on)")
            if name == "infer_nice" and not 0 <= value <= 19:
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be a niceness from 0 to 19")
            if value < 0 or value == 0 and name not in SWITCHES and name not in ZERO_ALLOWED:
                kind = "0 or a positive integer" if name in ZERO_ALLOWED else "a positive integer"
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be {kind}")
            values[name] = value
        return cls(**values)
