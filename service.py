"""CIFAR-10 classifier service (BentoML 1.4): decode and validate per request, batch in process.

Each upload is decoded in its own handler, so a bad one gets its own 400; only valid
32x32 pixels reach ``serving.batcher.MicroBatcher``, which groups concurrent requests
into one ONNX Runtime call. Why not BentoML's batchable API behind ``bentoml.depends``:
docs/decisions/batching.md.

Client call: ``curl -X POST http://localhost:3000/predict/ -F file=@car2.png``
"""

from __future__ import annotations

import gc
from dataclasses import asdict
import json
from pathlib import Path
from typing import TYPE_CHECKING

import bentoml
from bentoml.exceptions import BadInput, ServiceUnavailable
from pydantic import BaseModel, Field

from serving.batcher import MicroBatcher, Overloaded
from serving.decoding import MAX_REQUEST_PIXELS, Decoder, Refused
from serving.http import RequestGuard, Upload
from serving.images import MAX_PIXELS
from serving.lineage import answer_headers, lineage_headers
from serving.metrics import ServiceMetrics, drift_window
from serving.model import onnx_session, prediction, warm_up
from serving.precision import choose as choose_precision, measurement_key
from serving.settings import GC_THRESHOLDS, INFER_NICE, ServingSettings
from serving.slots import ComputeSlots, server_key

if TYPE_CHECKING:  # numpy is imported where it is used: the `bentoml serve` CLI process needs none of it
    import numpy as np

# The Bento pins its model through a build argument; a plain `bentoml serve
# service.py` uses the newest model in the local store.
MODEL_TAG = getattr(bentoml.use_arguments(), "model_tag", None) or "cifar10-cnn:latest"
# Read where the service starts, not where the Bento is built: @bentoml.service needs the worker
# count and limits when this module is imported.
SETTINGS = ServingSettings.from_env()

DESCRIPTION = f"""Classifies an image into one of the ten CIFAR-10 classes (airplane, automobile, bird, cat,
deer, dog, frog, horse, ship, truck) with a CNN trained by the cifar10-mlops pipeline and run in ONNX Runtime.

- `POST /predict` with multipart field `file` (PNG, JPEG, BMP, GIF, WebP; any size and colour mode up to the
  pixel limits below):
  `curl -X POST http://localhost:3000/predict -F file=@car.png`
- `POST /predict_batch` with repeated field `files` (at most {SETTINGS.max_files}): a list, in input order.
- `POST /metadata`: which model is served (BentoML and MLflow identifiers, test accuracy, dataset digest, and
  whether this server runs its float or its int8 file, and why).

Every prediction answer names what produced it in headers: `X-Bento-Tag` (the Bento's name:version, or
`not a bento` when served from source), `X-BentoML-Model`, `X-MLflow-Model`, `X-MLflow-Model-Version`,
`X-MLflow-Run-Id` and `X-Model-Precision` (float or int8), the values `/metadata` gives. `/predict`'s answer
also gives its label and confidence in `X-Predicted-Class` and `X-Confidence`.

Pixel limits: {MAX_PIXELS:,} decoded pixels per image (a JPEG decodes at down to 1/8 of its width and height)
and {MAX_REQUEST_PIXELS:,} per request.

Errors are one JSON object, `{{"error": "what was wrong and what to do"}}`:
- 400: not a PNG, JPEG, BMP, GIF or WebP image, over the pixel limits, a JPEG of over 64 scans or arithmetic-coded,
  a missing or unknown field, too many files;
- 401: no or a wrong bearer token, where the server has one (`Authorize` above);
- 408: a body that does not arrive in time;
- 413: a body over {SETTINGS.max_body_bytes:,} bytes;
- 429: over {SETTINGS.max_concurrency} requests being answered; 503: overloaded.

A trailing slash (`/predict/`) is the same route.
"""

class Prediction(BaseModel):
    """One image's classification."""

    label: str = Field(description="Predicted class name", examples=["automobile"])
    class_id: int = Field(description="Index of the predicted class", examples=[1])
    confidence: float = Field(description="Probability of the predicted class", examples=[0.93])
    probabilities: dict[str, float] = Field(description="Probability of every class; they sum to 1",
                                            examples=[{"airplane": 0.01, "automobile": 0.93, "truck": 0.06}])


class Metadata(BaseModel):
    """What is being served and how it is batched."""

    bento_tag: str = Field(description="Bento name:version, or 'not a bento' when served from source")
    bentoml_model_tag: str
    mlflow_model: str
    mlflow_version: str
    mlflow_run_id: str
    test_accuracy: float | None
    dataset_digest: str
    git_commit: str
    class_names: list[str]
    batching: dict[str, int] = Field(description="Batching and limit settings (CIFAR10_* environment variables)")
    precision: dict[str, str | float | None] = Field(
        description="The model file this server runs (served: float or int8), why, and the speeds it measured")


@bentoml.service(description=DESCRIPTION, resources={"cpu": "1"}, **SETTINGS.service_options())
class CIFAR10Classifier:
    """CIFAR-10 image classifier."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        model_dir = Path(self.bento_model.path)
        self.class_names = json.loads((model_dir / "classes.json").read_text())
        # float32, or the int8 candidate where it keeps float's answers and is faster on this host, as
        # measured by the first server of this model here.
        self.precision = choose_precision(model_dir, self.bento_model.info.metadata,
                                          measurement_key(str(self.bento_model.tag)))
        # One intra-op thread per call: calls run side by side (CIFAR10_CPUS of them), which scales better
        # than threads that synchronise at every layer.
        self.session = onnx_session(model_dir / self.precision.file, threads=1)
        # The other file must load too, or the Bento is broken: another host may choose it.
        if (model_dir / self.precision.other_file).exists():
            onnx_session(model_dir / self.precision.other_file, threads=1)
        self.input_name = self.session.get_inputs()[0].name
        # Every prediction answer carries these, so a client (and the served-artifact check) can tell
        # which Bento and model produced it without a second request.
        bento = CIFAR10Classifier.bento
        self.lineage = lineage_headers(self.bento_model.info.labels, str(self.bento_model.tag),
                                       str(bento.tag) if bento is not None else None, self.precision.served)
        self.decode = Decoder(threads=SETTINGS.cpus, nice=INFER_NICE)
        self.decode.warm_up()
        # Full batches side by side, as under load, before /readyz says ready: they prove the
        # model runs, and ONNX Runtime's arena reaches its working size now rather than under traffic.
        warm_up(self._infer, SETTINGS.max_batch_size, SETTINGS.cpus)
        # After the warm-up, so its blank batches count neither as answers nor as inputs that drifted.
        self.metrics = ServiceMetrics(self.class_names,
                                      drift_window(self.bento_model.info.metadata, SETTINGS.drift_window))
        self.metrics.start_publishing()
        self.batcher = MicroBatcher(self._infer_and_observe, SETTINGS.max_batch_size, SETTINGS.max_latency_ms,
                                    on_batch=self.metrics.batch_size.observe, concurrency=SETTINGS.cpus,
                                    nice=INFER_NICE, gate=ComputeSlots(server_key(), SETTINGS.cpus))
        # Everything loaded so far lives as long as the worker: out of the garbage collector's
        # reach, full collections under load scan only what requests create.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels.astype("float32")})[0]

    def _infer_and_observe(self, pixels: np.ndarray) -> np.ndarray:
        probs = self._infer(pixels)
        self.metrics.observe(pixels, probs)
        return probs

    async def _classify(self, files: list[Upload]) -> list[Prediction]:
        try:
            pixels = await self.decode([file.data for file in files])
        except Refused as exc:
            raise BadInput(str(exc)) from exc
        try:
            probs = await self.batcher.submit(pixels)
        except Overloaded as exc:
            raise ServiceUnavailable(str(exc)) from exc
        return [Prediction(**prediction(p, self.class_names)) for p in probs]

    @bentoml.api(route="/predict")
    async def predict(self, ctx: bentoml.Context,
                      file: Upload = Field(description="An image: PNG, JPEG, BMP, GIF or WebP")) -> Prediction:
        """Classify one uploaded image (multipart field `file`)."""
        answer = (await self._classify([file]))[0]
        ctx.response.headers.update({**self.lineage, **answer_headers(answer.label, answer.confidence)})
        return answer

    # maxItems only documents the file limit: the guard enforces it before BentoML parses the form.
    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, ctx: bentoml.Context,
                            files: list[Upload] = Field(description="Images, repeated field `files`", min_length=1,
                                                        json_schema_extra={"maxItems": SETTINGS.max_files})
                            ) -> list[Prediction]:
        """Classify several images (repeated multipart field `files`); answers in input order."""
        ctx.response.headers.update(self.lineage)
        return await self._classify(files)

    @bentoml.api(route="/metadata")
    def metadata(self) -> Metadata:
        """The served model: Bento and BentoML model tags, MLflow lineage, accuracy, batching settings."""
        meta, ids = self.bento_model.info.metadata, self.lineage
        return Metadata(
            bento_tag=ids["X-Bento-Tag"], bentoml_model_tag=ids["X-BentoML-Model"], mlflow_model=ids["X-MLflow-Model"],
            mlflow_version=ids["X-MLflow-Model-Version"], mlflow_run_id=ids["X-MLflow-Run-Id"],
            test_accuracy=_finite(meta.get("test_accuracy")), dataset_digest=meta.get("dataset_digest", ""),
            git_commit=meta.get("git_commit", ""), class_names=self.class_names,
            batching=SETTINGS.limits(), precision=asdict(self.precision),
        )


def _finite(value) -> float | None:
    """JSON has no NaN: an unknown accuracy (NaN in the model's metadata) is null."""
    return None if value is None or value != value else float(value)


# The guard also serves /docs.json with the real error answers and DESCRIPTION as Swagger's page text
# (not BentoML's README with remote badges).
CIFAR10Classifier.add_asgi_middleware(
    RequestGuard, max_body_bytes=SETTINGS.max_body_bytes, max_concurrency=SETTINGS.per_worker(SETTINGS.max_concurrency),
    token=SETTINGS.api_token, description=DESCRIPTION, workers=SETTINGS.workers,
    fields={"/predict": {"file": 1}, "/predict_batch": {"files": SETTINGS.max_files}, "/metadata": {}})
