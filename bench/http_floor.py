"""(e) of bench/bench_serving.py: BentoML's request path alone, no image decode and no model.

Same API shape as ``service.py`` (multipart ``file`` as an in-memory ``Upload``, a JSON
object back), same workers, access-log and tracing settings, and a
fixed answer: what one request costs in BentoML itself on this machine, the floor under (a).
"""

from __future__ import annotations

import bentoml
from pydantic import Field

from serving.http import Upload
from serving.settings import ServingSettings

SETTINGS = ServingSettings.from_env()


@bentoml.service(**SETTINGS.service_options())
class HTTPFloor:
    """Answers every upload with the same prediction."""

    def __init__(self) -> None:
        import gc

        # As service.py does after loading, so the floor's tail is BentoML's, not the garbage collector's.
        gc.collect()
        gc.freeze()

    @bentoml.api(route="/predict")
    async def predict(self, file: Upload = Field(description="Any file; it is not read")) -> dict:
        return {"label": "cat", "class_id": 3, "confidence": 1.0}
