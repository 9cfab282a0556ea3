"""Ray Serve: two replicas of one CPU each, each batching with ``@serve.batch``.

Each replica decodes its request's JPEG in the request handler, then awaits the batched
model call; one batch runs at a time per replica, so two run side by side. Ray's default
batch wait (10 ms) is kept. ``max_ongoing_requests`` (default 5) caps every batch, so it is
raised to the batch size. The HTTP proxy listens on 127.0.0.1 only; Ray's own token auth is
disabled by the caller's ``RAY_AUTH_MODE=disabled``. Ray's internal services (GCS, raylet,
agents, workers) still listen on every interface: Ray 2.60 has no setting that binds them
to loopback, so run this only where nothing else can reach the machine.

    python -m bench.peer_servers.ray_server MODEL_DIR PORT TEMP_DIR
"""

from __future__ import annotations

import signal
import sys

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from bench.peer_servers.common import CALLS, MAX_BATCH_SIZE, Model
from serving.images import decode_image


@serve.deployment(num_replicas=CALLS, max_ongoing_requests=MAX_BATCH_SIZE, ray_actor_options={"num_cpus": 1})
class Classifier:
    def __init__(self, model_dir: str) -> None:
        self.model = Model(model_dir, calls=1)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE)
    async def infer(self, images: list[np.ndarray]) -> list[dict]:
        return [self.model.answer(p) for p in self.model.probabilities(np.stack(images))]

    async def __call__(self, request: Request):
        if request.method == "GET":  # readiness: answered by a replica, so the model is loaded
            return PlainTextResponse("ok")
        form = await request.form()
        return await self.infer(decode_image(await form["file"].read()))


def main() -> None:
    model_dir, port, temp_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ray.init(num_cpus=CALLS, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Classifier.bind(model_dir), route_prefix="/predict")

    def stop(*_) -> None:
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
