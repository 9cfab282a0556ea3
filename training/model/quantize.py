"""An int8 candidate of the exported model, and whether it may be served in place of float32.

ONNX Runtime's static quantization (QDQ, int8 weights per channel, uint8 activations), calibrated on
training images, roughly halves the model's cost on CPUs with int8 dot-product instructions and can
be slower on others; it can also cost accuracy. So int8 is a candidate that must earn its place:
the rule (``serving.precision.decide``) serves it only when its test accuracy is within 0.2 points of
float's, it agrees with float on 99% of the test images, and it is measurably faster on the host that
measures. The accuracy conditions are judged here, where the model is trained; the speed is measured
again where the Bento starts (``serving/precision.py``), since the host that trains is not always the
one that serves.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.precision import MAX_ACCURACY_LOSS, MIN_AGREEMENT

# Training images the activation ranges are calibrated on: a seeded sample, a few per class suffice.
CALIBRATION_IMAGES = 1024


@dataclass(frozen=True)
class Comparison:
    """int8 against float32 on the test split, and their speeds on the host that measured."""

    float_accuracy: float
    int8_accuracy: float
    agreement: float
    int8_per_class: dict[str, float]
    float_img_s: float
    int8_img_s: float

    @property
    def accurate(self) -> bool:
        """Whether int8 keeps float's answers: the accuracy conditions of :func:`decide`."""
        return (self.int8_accuracy >= self.float_accuracy - MAX_ACCURACY_LOSS - 1e-12
                and self.agreement >= MIN_AGREEMENT)

    def metrics(self) -> dict[str, float]:
        values = {k: v for k, v in asdict(self).items() if k != "int8_per_class"}
        return {f"precision_{k}": v for k, v in values.items()} | {
            f"int8_test_accuracy_{name}": acc for name, acc in self.int8_per_class.items()}


def quantize(float_path: Path, calibration: np.ndarray, int8_path: Path) -> Path:
    """Write the static int8 quantization of the ONNX model at ``float_path``, calibrated on ``calibration``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from serving.model import onnx_session

    name = onnx_session(float_path).get_inputs()[0].name
    # The percentile calibrator stacks every batch's outputs into one array, so the batches must be of one size.
    size = min(64, len(calibration))
    calibration = calibration[:len(calibration) // size * size]
    batches = iter([{name: calibration[i:i + size].astype(np.float32)} for i in range(0, len(calibration), size)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        # Shapes and constant folding first, as ONNX Runtime's quantization expects; symbolic shape
        # inference would need sympy, and every shape here is static but the batch.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        # Ranges from the 99.999th percentile rather than the extremes, and the layers that see raw pixels
        # and produce the logits kept in float: together they keep float's class for the most test images
        # (docs/serving.md), at a small share of the compute. Quantizing the pixels' scaling only to
        # dequantize it for a float convolution would also cost more than it saves.
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=edge_layers(prepared))
    return int8_path


def edge_layers(path: Path) -> list[str]:
    """The nodes of the ONNX model at ``path`` kept in float: the pixel side (every node no convolution feeds: the
    scaling of the pixels and the first convolution of every test-time view) and the logits side (every matrix
    product and every node after one)."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    producer = {out: node for node in nodes for out in node.output}

    def after(node, ops: tuple[str, ...], seen=frozenset()) -> bool:
        ups = [producer[name] for name in node.input if name in producer and producer[name].name not in seen]
        return any(up.op_type in ops or after(up, ops, seen | {up.name}) for up in ups)

    products = ("MatMul", "Gemm")
    return [n.name for n in nodes if n.op_type in products or not after(n, ("Conv",)) or after(n, products)]


def images_per_second(session, images: np.ndarray, seconds: float = 1.0) -> float:
    """One thread's images/s of ``session`` on batches of 64 of ``images``, after a warm-up."""
    name = session.get_inputs()[0].name
    batch = np.resize(images, (64, *images.shape[1:])).astype(np.float32)
    for _ in range(2):
        session.run(None, {name: batch})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: batch})
        done += len(batch)
    return done / (time.perf_counter() - start)


def compare(float_path: Path, int8_path: Path, x_test: np.ndarray, y_test: np.ndarray,
            class_names: list[str]) -> Comparison:
    """Both models on the test split (accuracy, agreement, int8's per-class accuracy) and their speeds here."""
    from serving.model import onnx_session
    from training.model.export import onnx_probabilities

    paths = (float_path, int8_path)
    predicted = [np.concatenate([onnx_probabilities(session, x_test[i:i + 1024]).argmax(1)
                                 for i in range(0, len(x_test), 1024)])
                 for session in (onnx_session(path) for path in paths)]
    per_class = {name: float(np.mean(predicted[1][y_test == c] == c)) for c, name in enumerate(class_names)
                 if np.any(y_test == c)}
    # As served: one thread per call.
    float_speed, int8_speed = (images_per_second(onnx_session(path, threads=1), x_test[:64]) for path in paths)
    return Comparison(float(np.mean(predicted[0] == y_test)), float(np.mean(predicted[1] == y_test)),
                      float(np.mean(predicted[0] == predicted[1])), per_class, float_speed, int8_speed)


def calibration_sample(x_train: np.ndarray, seed: int) -> np.ndarray:
    """A seeded sample of :data:`CALIBRATION_IMAGES` training images (all of them when there are fewer)."""
    n = min(CALIBRATION_IMAGES, len(x_train))
    return x_train[np.sort(np.random.default_rng(seed).choice(len(x_train), size=n, replace=False))]
