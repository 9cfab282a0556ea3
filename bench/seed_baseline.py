"""The seed's serving style, kept only as a benchmark baseline: FastAPI + Keras ``model.predict`` per request.

Run: ``SEED_KERAS_MODEL=model.keras uvicorn --factory bench.seed_baseline:create_app --port 8000``
"""

from __future__ import annotations

import io
import os

import numpy as np
from fastapi import FastAPI, File, UploadFile
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def create_app() -> FastAPI:
    """The app serving the Keras model at ``SEED_KERAS_MODEL``, loaded before the first request."""
    import keras

    import training.model.network  # noqa: F401 (registers the model's custom activation and initializer)

    app = FastAPI(title="seed-style CIFAR-10 baseline")
    model = keras.models.load_model(os.environ["SEED_KERAS_MODEL"])

    @app.get("/readyz")
    async def readyz() -> dict:
        """Loaded: the benchmarks wait for this route, as for the Bento's."""
        return {}

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)) -> dict:
        """Decode, resize to 32x32 and call ``model.predict`` on a batch of one, as the seed did."""
        image = Image.open(io.BytesIO(await file.read())).convert("RGB").resize((32, 32))
        probs = model.predict(np.asarray(image, dtype=np.float32)[None], verbose=0)[0]
        class_id = int(np.argmax(probs))
        return {"label": CLASSES[class_id], "class_id": class_id, "confidence": float(probs[class_id]),
                "probabilities": {name: float(p) for name, p in zip(CLASSES, probs)}}

    return app
