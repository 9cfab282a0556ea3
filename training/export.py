"""Export the trained Keras model to ONNX and prove it computes the same thing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Largest allowed difference between Keras and ONNX Runtime probabilities.
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """ONNX Runtime's output differs from Keras beyond the tolerance."""


def onnx_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session; ``threads`` > 0 caps intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def check_parity(session, reference: np.ndarray, pixels: np.ndarray, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |ONNX - reference| over ``pixels``; raises :class:`ParityError` above ``tolerance``."""
    name = session.get_inputs()[0].name
    got = session.run(None, {name: pixels.astype(np.float32)})[0]
    diff = float(np.max(np.abs(got - reference)))
    if not diff <= tolerance:
        raise ParityError(f"ONNX output differs from Keras by {diff:.3g} (> {tolerance:g}); the export "
                          "is not faithful: check for layers tf2onnx converts approximately")
    return diff


def export_onnx(model, path: Path, sample: np.ndarray) -> float:
    """Write ``model`` as ONNX to ``path`` and check parity on ``sample`` (raw pixels).

    Returns the measured max absolute difference of probabilities.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = sample.astype(np.float32)
    reference = np.asarray(model(pixels, training=False))
    model.export(str(path), format="onnx", verbose=False)
    diff = check_parity(onnx_session(path), reference, pixels)
    log.info("ONNX export %s: max |diff| vs Keras = %.2e on %d images", path, diff, len(pixels))
    return diff
