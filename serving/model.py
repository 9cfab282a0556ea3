"""The served model: an ONNX Runtime session, its warm-up, and the API's answer for one image."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def onnx_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session; ``threads`` > 0 caps intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # No memory pattern: ONNX Runtime would plan and cache one memory block per input shape,
    # and a server sees every batch size from 1 to 64, so its memory would grow for minutes
    # under load; from the arena tensor by tensor it stays flat (docs/reliability.md).
    options.enable_mem_pattern = False
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def warm_up(infer: Callable[[np.ndarray], np.ndarray], max_batch_size: int, concurrency: int) -> None:
    """Run ``concurrency`` full batches side by side, as a loaded worker does.

    ONNX Runtime's arena then reaches most of its working size before the server says
    ready rather than under the first load (docs/decisions/onnx-memory.md).
    """
    import numpy as np

    images = np.zeros((max_batch_size, 32, 32, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(infer, [images] * concurrency))


def prediction(probs: np.ndarray, class_names: list[str]) -> dict:
    """The API's answer for one image from its class probabilities."""
    import numpy as np

    class_id = int(np.argmax(probs))
    return {"label": class_names[class_id], "class_id": class_id, "confidence": float(probs[class_id]),
            "probabilities": {name: float(p) for name, p in zip(class_names, probs)}}
