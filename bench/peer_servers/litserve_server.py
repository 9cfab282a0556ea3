"""LitServe: two inference worker processes on the CPU, batching up to 64 requests.

``decode_request`` runs in the inference worker, per request, before the batch; LitServe's
default batch timeout (0: whatever is queued) is kept, and it starts as many HTTP server
processes as inference workers, its recommended default. Stop it by its process group:
SIGTERM to the main process alone leaves the workers holding the port.

    python -m bench.peer_servers.litserve_server MODEL_DIR PORT
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np

from bench.peer_servers.common import CALLS, MAX_BATCH_SIZE, Model
from serving.images import decode_image


class Classifier(ls.LitAPI):
    def __init__(self, model_dir: str) -> None:
        super().__init__(max_batch_size=MAX_BATCH_SIZE, api_path="/predict")
        self.model_dir = model_dir

    def setup(self, device) -> None:
        self.model = Model(self.model_dir, calls=1)

    def decode_request(self, request) -> np.ndarray:
        return decode_image(request["file"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.probabilities(pixels)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probs: np.ndarray) -> dict:
        return self.model.answer(probs)


def main() -> None:
    model_dir, port = sys.argv[1], int(sys.argv[2])
    server = ls.LitServer(Classifier(model_dir), accelerator="cpu", workers_per_device=CALLS)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
