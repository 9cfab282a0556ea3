"""CIFAR-10 classifier service (BentoML 1.4).

Two services in one Bento:

- ``CIFAR10Classifier`` (the entry point, what clients call): takes an upload,
  decodes and validates it *before* batching, so a bad upload fails alone with 400.
- ``CIFAR10Model``: a batchable API over decoded pixels, running the ONNX export of
  the trained Keras model in ONNX Runtime; BentoML's adaptive batching groups
  concurrent requests into one model call.

Client call: ``curl -X POST http://localhost:3000/predict -F file=@car.png``
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import BadInput
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

# The Bento pins its model through a build argument; a plain `bentoml serve
# service.py` uses the newest model in the local store.
MODEL_TAG = getattr(bentoml.use_arguments(), "model_tag", None) or "cifar10-cnn:latest"
MAX_BATCH_SIZE = int(os.environ.get("CIFAR10_MAX_BATCH_SIZE", "64"))
MAX_LATENCY_MS = int(os.environ.get("CIFAR10_MAX_LATENCY_MS", "100"))
# ONNX Runtime threads per model worker: its CPU share, not the whole machine.
MODEL_THREADS = int(os.environ.get("CIFAR10_MODEL_THREADS", "1"))


class Prediction(BaseModel):
    """One image's classification."""

    label: str = Field(description="Predicted class name", examples=["automobile"])
    class_id: int = Field(description="Index of the predicted class", examples=[1])
    confidence: float = Field(description="Probability of the predicted class", examples=[0.93])
    probabilities: dict[str, float] = Field(description="Probability of every class; they sum to 1")


@bentoml.service(resources={"cpu": "1"}, workers=1, traffic={"timeout": 30})
class CIFAR10Model:
    """Batched ONNX Runtime inference over (N, 32, 32, 3) uint8 pixels."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from training.export import onnx_session

        self.session = onnx_session(Path(self.bento_model.path) / "model.onnx", threads=MODEL_THREADS)
        self.input_name = self.session.get_inputs()[0].name
        self.classify(np.zeros((1, 32, 32, 3), dtype=np.uint8))  # warm up before /readyz says ready

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities, (N, classes) float32, for raw uint8 pixels."""
        return self.session.run(None, {self.input_name: pixels.astype(np.float32)})[0]


@bentoml.service(resources={"cpu": "1"}, workers=1, traffic={"timeout": 30})
class CIFAR10Classifier:
    """Classify one image into the ten CIFAR-10 classes."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)
    model = bentoml.depends(CIFAR10Model)

    def __init__(self) -> None:
        self.class_names = json.loads((Path(self.bento_model.path) / "classes.json").read_text())

    @bentoml.api(route="/predict")
    async def predict(self, file: Annotated[Path, ContentType("image/*")]) -> Prediction:
        """Classify an uploaded image (PNG, JPEG, BMP, GIF, WebP; any size)."""
        from training.images import InvalidImage, decode_image

        try:
            pixels = decode_image(Path(file).read_bytes())
        except InvalidImage as exc:
            raise BadInput(f"{exc}") from exc
        probs = (await self.model.to_async.classify(pixels[None]))[0]
        class_id = int(np.argmax(probs))
        return Prediction(
            label=self.class_names[class_id], class_id=class_id, confidence=float(probs[class_id]),
            probabilities={name: float(p) for name, p in zip(self.class_names, probs)},
        )
