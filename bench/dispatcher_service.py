"""BentoML's own batching, for ``bench/bentoml_batching.py``: the alternatives to ``service.py``'s batcher.

Two services that batch with BentoML's adaptive dispatcher (``CorkDispatcher``) instead of
``serving.batcher.MicroBatcher``, on the same ONNX model and with the product's request
path otherwise: ``RequestGuard`` in front, uploads as in-memory ``Upload``s decoded by
``serving.images.decode_image``, the same ``@bentoml.service`` options
(``ServingSettings.service_options``: workers, limits, access log, tracing exclusions),
``gc.freeze()`` after loading, one intra-op thread per ONNX Runtime call and model threads
at the product's niceness.

- ``Front`` (variant b, BentoML's documented pattern): decodes and validates each upload,
  then calls ``Model.classify`` through ``bentoml.depends``; ``Model`` is a second service
  (its own worker processes) whose API is ``batchable=True``. Its ``runner_connection``
  limits are raised so that the front's client never replaces its aiohttp session under
  load: with BentoML 1.4.40's defaults (100 requests, 300 s) the old session is closed
  while requests are still in flight on it, and those requests fail with 500
  (bentoml/BentoML#5540, #5544, #4971). ``BENCH_RUNNER_DEFAULTS=1`` keeps the defaults.
- ``Batched`` (variant c): one service whose ``/predict`` is itself ``batchable=True``
  over a list of decoded images; the multipart field's validator decodes each upload in
  the request handler, so only pixels reach the dispatcher. It answers a list of one.

Environment (read where the server starts; the workers inherit it): ``BENCH_MODEL_WORKERS``
(worker processes of ``Model``, default 2), ``BENCH_MAX_LATENCY_MS`` (the dispatcher's
``max_latency_ms``, default 1000 like ``CIFAR10_MAX_LATENCY_MS``), ``BENCH_MAX_BATCH_SIZE``
(default 64), ``BENCH_RUNNER_DEFAULTS``; ``CIFAR10_*`` as for ``service.py``.

    bentoml serve bench.dispatcher_service:Front --arg model_tag=cifar10-cnn:...
    bentoml serve bench.dispatcher_service:Batched --arg model_tag=cifar10-cnn:...
"""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel, Field

from serving.http import RequestGuard, Upload
from serving.settings import ServingSettings

MODEL_TAG = getattr(bentoml.use_arguments(), "model_tag", None) or "cifar10-cnn:latest"
SETTINGS = ServingSettings.from_env()
MAX_BATCH_SIZE = int(os.environ.get("BENCH_MAX_BATCH_SIZE", "64"))
MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", str(SETTINGS.max_latency_ms)))
MODEL_WORKERS = int(os.environ.get("BENCH_MODEL_WORKERS", "2"))
# Far beyond any benchmark run: the front's inter-service session is never replaced under load.
RUNNER_CONNECTION = ({} if os.environ.get("BENCH_RUNNER_DEFAULTS") == "1"
                     else {"runner_connection": {"max_requests": 1_000_000_000, "max_age": 1e9}})
_reniced = threading.local()


class Prediction(BaseModel):
    """One image's classification, as service.py answers it."""

    label: str
    class_id: int
    confidence: float
    probabilities: dict[str, float]


class OnnxModel:
    """The served model as service.py loads it: ONNX Runtime session, classes, warm-up."""

    def __init__(self, bento_model) -> None:
        from serving.model import onnx_session, warm_up

        folder = Path(bento_model.path)
        self.class_names = json.loads((folder / "classes.json").read_text())
        self.session = onnx_session(folder / "model.onnx", threads=SETTINGS.model_threads)
        self.input_name = self.session.get_inputs()[0].name
        warm_up(self.infer, MAX_BATCH_SIZE, 1)  # the dispatcher runs one batch at a time per worker

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        if not getattr(_reniced, "done", False):  # BentoML's model thread, at the product's niceness
            from serving.cpu import renice

            renice(SETTINGS.infer_nice)
            _reniced.done = True
        return self.session.run(None, {self.input_name: pixels.astype("float32")})[0]


def _decode(data: bytes) -> np.ndarray:
    from serving.images import decode_image

    return decode_image(data)


@bentoml.service(workers=MODEL_WORKERS, traffic={"timeout": 30}, logging={"access": {"enabled": False}},
                 tracing={"excluded_urls": "/classify"}, **RUNNER_CONNECTION)
class Model:
    """The model alone, batched by BentoML: (k, 32, 32, 3) uint8 in, (k, classes) probabilities out."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.model = OnnxModel(self.bento_model)
        gc.collect()
        gc.freeze()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: np.ndarray) -> np.ndarray:
        return self.model.infer(images)


@bentoml.service(**SETTINGS.service_options())
class Front:
    """Decode and validate per request, then one call to ``Model`` per image."""

    model = bentoml.depends(Model)
    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        folder = Path(self.bento_model.path)
        self.class_names = json.loads((folder / "classes.json").read_text())
        gc.collect()
        gc.freeze()

    @bentoml.api(route="/predict")
    async def predict(self, file: Upload = Field(description="An image")) -> Prediction:
        from bentoml.exceptions import BadInput

        from serving.images import InvalidImage
        from serving.model import prediction

        try:
            pixels = _decode(file.data)
        except InvalidImage as exc:
            raise BadInput(f"file: {exc}") from exc
        probs = await self.model.to_async.classify(pixels[None])
        return Prediction(**prediction(probs[0], self.class_names))


class DecodedImage(Upload):
    """A multipart file part that pydantic validation decodes: the handler gets (32, 32, 3) uint8 pixels."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        # InvalidImage is a ValueError: a bad upload is a validation error (400), in its own request.
        return core_schema.no_info_plain_validator_function(lambda value: _decode(Upload.from_form(value).data))


@bentoml.service(**SETTINGS.service_options())
class Batched:
    """One service: ``/predict`` is batchable over the decoded images of concurrent requests."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.model = OnnxModel(self.bento_model)
        gc.collect()
        gc.freeze()

    @bentoml.api(route="/predict", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, file: list[DecodedImage]) -> list[Prediction]:
        from serving.model import prediction

        probs = self.model.infer(np.stack(file))
        return [Prediction(**prediction(p, self.model.class_names)) for p in probs]


for _service in (Front, Batched):
    _service.add_asgi_middleware(RequestGuard, max_body_bytes=SETTINGS.max_body_bytes, fields={"/predict": {"file": 1}})
