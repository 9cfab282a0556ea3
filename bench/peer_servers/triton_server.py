"""Triton through PyTriton: dynamic batching over a BYTES input that carries the JPEG's bytes.

Two model instances (PyTriton runs each callable in its own thread of this process) share
one ONNX Runtime session, so two batches run side by side, one per core. The dynamic
batcher keeps Triton's default queue delay of 0: a batch is whatever is queued when an
instance is free, as in service.py. Every listener is bound to 127.0.0.1 (Triton binds
0.0.0.0 otherwise). SIGTERM stops it as SIGINT does, so PyTriton removes its workspace.

    python -m bench.peer_servers.triton_server MODEL_DIR HTTP_PORT GRPC_PORT METRICS_PORT
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peer_servers.common import CALLS, MAX_BATCH_SIZE, MODEL_NAME, Model


def main() -> None:
    model_dir, http_port, grpc_port, metrics_port = sys.argv[1], *map(int, sys.argv[2:5])
    model = Model(model_dir)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        # Dynamic batching hands over (n, 1) encoded images, one row per request.
        return {"probabilities": model.classify([row[0] for row in image])}

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    # Triton starts the Python backend's instances side by side, and PyTriton's second one connects to
    # the first's handshake socket once the file exists, which can be before it listens (refused) or
    # after the 1 s it waits (under load): one at a time, as Triton's own override allows
    # (https://github.com/triton-inference-server/pytriton/issues/109).
    os.environ["TRITON_PARALLEL_INSTANCE_LOADING"] = "0"
    config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                          grpc_port=grpc_port, metrics_address="127.0.0.1", metrics_port=metrics_port)
    with Triton(config=config) as triton:
        triton.bind(model_name=MODEL_NAME, infer_func=[infer] * CALLS,
                    inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
                    outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(len(model.class_names),))],
                    config=ModelConfig(max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher()))
        triton.serve()


if __name__ == "__main__":
    main()
