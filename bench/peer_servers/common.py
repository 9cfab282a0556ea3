"""The work every peer does per image, from :mod:`serving`: decode the JPEG to 32x32 RGB uint8, run ONNX Runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from serving.images import decode_image
from serving.model import onnx_session, prediction, warm_up

MODEL_NAME = "cifar10"
MAX_BATCH_SIZE = 64
# Model calls each peer runs side by side: one per core of the 2-core machine, each on one
# intra-op thread, as service.py runs them (threads that synchronise per layer scale worse).
CALLS = 2


class Model:
    """The model in ``model_dir`` (a BentoML model folder: ``model.onnx``, ``classes.json``), warmed up.
    ``PEER_MODEL_FILE`` names another file of it (``model.int8.onnx``): every peer then runs that one."""

    def __init__(self, model_dir: str | Path, calls: int = CALLS) -> None:
        folder = Path(model_dir)
        self.class_names = json.loads((folder / "classes.json").read_text())
        self.session = onnx_session(folder / os.environ.get("PEER_MODEL_FILE", "model.onnx"), threads=1)
        self.input_name = self.session.get_inputs()[0].name
        # Full batches first, as service.py does, so the arena has its working size before any request.
        warm_up(self.probabilities, MAX_BATCH_SIZE, calls)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 32, 32, 3) uint8 -> (n, classes) float32."""
        return self.session.run(None, {self.input_name: pixels.astype("float32")})[0]

    def classify(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> (n, classes) probabilities, decoded as service.py decodes them."""
        return self.probabilities(np.stack([decode_image(data) for data in images]))

    def answer(self, probs: np.ndarray) -> dict:
        """service.py's JSON answer for one image."""
        return prediction(probs, self.class_names)
