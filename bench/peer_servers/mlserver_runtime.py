"""MLServer: a custom runtime over V2 inference requests whose BYTES input holds base64 JPEGs.

MLServer has no multipart route: the client sends each JPEG base64-encoded in V2 JSON.
Adaptive batching merges requests in the main process and hands each batch to one of the
parallel worker processes, which decodes and runs it. ``bench/peers.py`` writes the
settings (``settings.json``, ``model-settings.json``) and starts ``mlserver start``.
"""

from __future__ import annotations

import base64

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from bench.peer_servers.common import Model


class Classifier(MLModel):
    async def load(self) -> bool:
        self.model = Model(self.settings.parameters.uri, calls=1)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = [base64.b64decode(item) for item in payload.inputs[0].data]
        probs = self.model.classify(images)
        return InferenceResponse(model_name=self.name, outputs=[ResponseOutput(
            name="probabilities", shape=list(probs.shape), datatype="FP32", data=probs.ravel().tolist())])
