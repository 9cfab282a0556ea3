"""The service's runtime settings, read from ``CIFAR10_<FIELD>`` environment variables where it starts."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from serving.cpu import cpu_share

SWITCHES = ("access_log", "trace_requests")  # settings that are 0 (off) or 1 (on)
ZERO_ALLOWED = ("drift_window",)  # other counts must be positive
# Niceness the model and decoding threads add to the process's: when both want a core, a worker's event loop
# (parse, answer) goes first, so requests reach the batch queue sooner and batches are the larger for it.
INFER_NICE = 10
# The garbage collector's thresholds in a worker (Python's are 700, 10, 10). A request allocates hundreds
# of objects, so those collected the young generation every few requests; collecting 30 times less often
# costs a little more per collection and far less in all (docs/serving.md).
GC_THRESHOLDS = (20_000, 50, 100)
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
    # Requests whose body has arrived and that are being answered, per server (split evenly over
    # its workers); more: 429. A request still sending its body is not counted (serving/http.py).
    max_concurrency: int = 256
    # The CPUs this server may use: its affinity mask, capped by a cgroup v2 quota (set it where the
    # quota is not visible, e.g. a cgroup v1 node). Each worker runs up to this many model calls side by
    # side, and the workers together no more (serving/slots.py), so no two calls time-share a core.
    cpus: int = field(default_factory=cpu_share)
    # Worker processes, each with its own event loop, model and batcher: one process's
    # request handling holds the GIL and cannot feed two cores, so one per CPU, at most 4.
    workers: int = field(default_factory=lambda: min(cpu_share(), 4))
    # 1: BentoML's access log, a line per request. Off by default: at hundreds of requests a second its
    # formatting is CPU the answers do not need (docs/results.md); errors and refusals are logged either way.
    access_log: int = 0
    # 1: OpenTelemetry spans for the API routes (set it with a tracing exporter in BentoML's
    # configuration). 0: the routes are excluded from tracing, because BentoML runs its
    # tracing middleware on every request even when nothing exports the spans.
    trace_requests: int = 0
    # Recent images per worker that cifar10_drift_score compares with the training data (serving/drift.py).
    # Fewer react sooner but score noisier (an in-distribution window of 256 stays near 0.05); 0: off.
    drift_window: int = 256
    # A bearer token that the prediction, metadata and metrics routes require when set (clients send
    # "Authorization: Bearer <token>"); health routes and the API document never do. Empty: open.
    api_token: str = field(default="", repr=False)

    def service_options(self) -> dict:
        """``@bentoml.service`` options these settings decide (service.py and bench/http_floor.py)."""
        # No BentoML max_concurrency: it would count requests from their first byte, so clients that
        # send their body slowly would hold every slot; the guard counts them once the body is in.
        options = {"workers": self.workers, "traffic": {"timeout": 30},
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
            if isinstance(default, str):
                values[name] = default if raw is None else raw.strip()
                continue
            value = default if raw is None else int(raw)
            if name in SWITCHES and value not in (0, 1):
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be 0 (off) or 1 (on)")
            if value < 0 or value == 0 and name not in SWITCHES and name not in ZERO_ALLOWED:
                kind = "0 or a positive integer" if name in ZERO_ALLOWED else "a positive integer"
                raise ValueError(f"CIFAR10_{name.upper()}={raw!r}: must be {kind}")
            values[name] = value
        return cls(**values)

    def per_worker(self, count: int) -> int:
        """A per-server ``count`` as each worker's share (BentoML's rule for its own limits)."""
        return math.ceil(count / self.workers)

    def limits(self) -> dict[str, int]:
        """The numeric settings, as /metadata reports them (never the token)."""
        return {name: value for name, value in asdict(self).items() if isinstance(value, int)}


def client_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """What a client of the service sends to pass its token check: the bearer header where ``CIFAR10_API_TOKEN``
    is set in the client's own environment (the pipeline's served-artifact check, the drift monitor)."""
    token = (os.environ if environ is None else environ).get("CIFAR10_API_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}
