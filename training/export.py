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
    import keras

    if keras.backend.backend() == "tensorflow":
        model.export(str(path), format="onnx", verbose=False)
    else:
        _export_from_tensorflow(model, path)
    diff = check_parity(onnx_session(path), reference, pixels)
    log.info("ONNX export %s: max |diff| vs Keras = %.2e on %d images", path, diff, len(pixels))
    return diff


def _export_from_tensorflow(model, path: Path) -> None:
    """ONNX export of a model trained under another backend (JAX), by a TensorFlow child process.

    Keras exports JAX models only through ``jax2onnx``, which brings flax, optax, orbax and
    more; the ``.keras`` file is backend-neutral, so a child process with
    ``KERAS_BACKEND=tensorflow`` loads it and exports with tf2onnx, as the default path
    does. The parity check that follows compares ONNX with the JAX model's outputs.
    """
    import os
    import subprocess
    import sys
    import tempfile

    root = str(Path(__file__).resolve().parent.parent)
    # A loaded model must be called once before Keras exports it.
    code = ("import sys; sys.path.insert(0, sys.argv[3]); import keras, numpy, training.model; "
            "m = keras.saving.load_model(sys.argv[1]); m(numpy.zeros((1, 32, 32, 3), 'float32')); "
            "m.export(sys.argv[2], format='onnx', verbose=False)")
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = str(Path(tmp) / "model.keras")
        model.save(keras_path)
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run([sys.executable, "-c", code, keras_path, str(path), root], env=env,
                              capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"ONNX export of {model.name} in a TensorFlow child process failed (exit "
                           f"{done.returncode}); a model trained under JAX needs TensorFlow and tf2onnx "
                           f"installed for its ONNX export:\n{done.stderr[-3000:]}")
