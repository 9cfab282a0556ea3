"""BentoML's own batching: one service whose ``/predict`` is ``batchable=True`` over decoded images.

The multipart field's validator decodes each upload in the request handler, so only pixels
reach BentoML's adaptive dispatcher (``CorkDispatcher``), which groups concurrent requests
into one model call per worker. Same workers, timeout, access log and tracing exclusions as
``service.py`` (``ServingSettings.service_options``); no request guard, lineage or metrics.

    bentoml serve bench.peer_servers.bentoml_batchable:Batched --arg model_tag=cifar10-cnn:...
"""

from __future__ import annotations

import gc
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel

from bench.peer_servers.common import MAX_BATCH_SIZE, Model
from serving.http import Upload
from serving.images import decode_image
from serving.settings import ServingSettings

MODEL_TAG = getattr(bentoml.use_arguments(), "model_tag", None) or "cifar10-cnn:latest"
SETTINGS = ServingSettings.from_env()


class Prediction(BaseModel):
    """One image's classification, as service.py answers it."""

    label: str
    class_id: int
    confidence: float
    probabilities: dict[str, float]


class DecodedImage(Upload):
    """A multipart file part that pydantic validation decodes: the handler gets (32, 32, 3) uint8 pixels."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(lambda value: decode_image(Upload.from_form(value).data))


@bentoml.service(**SETTINGS.service_options())
class Batched:
    """``/predict`` batched by BentoML over the decoded images of concurrent requests."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        # The dispatcher runs one batch at a time per worker: one call to warm up.
        self.model = Model(Path(self.bento_model.path), calls=1)
        gc.collect()
        gc.freeze()

    @bentoml.api(route="/predict", batchable=True, max_batch_size=MAX_BATCH_SIZE,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def predict(self, file: list[DecodedImage]) -> list[Prediction]:
        return [Prediction(**self.model.answer(p)) for p in self.model.probabilities(np.stack(file))]
