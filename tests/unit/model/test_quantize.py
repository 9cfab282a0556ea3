"""training/model/quantize.py: the int8 candidate and how it compares with float on the test split."""

from __future__ import annotations

import numpy as np
import onnx

from serving.model import onnx_session
from training.model.export import export_onnx, onnx_probabilities
from training.model.network import build_model, with_flip_tta
from training.model.quantize import CALIBRATION_IMAGES, calibration_sample, compare, edge_layers, quantize
from tests.helpers import CLASSES, natural_images


def test_quantize_writes_a_static_int8_model_that_compare_scores_against_float(tmp_path):
    float_path = tmp_path / "model.onnx"
    export_onnx(with_flip_tta(build_model((8, 16), num_classes=10)), float_path, natural_images(4).astype(np.float32))
    quantize(float_path, natural_images(128, seed=1), tmp_path / "model.int8.onnx")
    ops = {node.op_type for node in onnx.load(tmp_path / "model.int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: quantized weights and activations
    x = natural_images(200, seed=2)
    y = onnx_probabilities(onnx_session(float_path), x).argmax(1)  # labels float gets right by construction
    result = compare(float_path, tmp_path / "model.int8.onnx", x, y, CLASSES)
    int8 = onnx_probabilities(onnx_session(tmp_path / "model.int8.onnx"), x).argmax(1)
    assert result.float_accuracy == 1.0 and result.agreement == result.int8_accuracy == float(np.mean(int8 == y))
    assert result.float_img_s > 0 and result.int8_img_s > 0
    assert result.metrics()["precision_agreement"] == result.agreement
    assert result.accurate == (result.int8_accuracy >= 0.998 and result.agreement >= 0.99)


def test_calibration_is_a_seeded_sample_of_the_training_images():
    x = np.arange(3000)[:, None, None, None] * np.ones((1, 32, 32, 3), dtype=np.uint8)
    first, again = calibration_sample(x, seed=1), calibration_sample(x, seed=1)
    assert len(first) == CALIBRATION_IMAGES and np.array_equal(first, again)
    assert not np.array_equal(first, calibration_sample(x, seed=2))
    assert len(calibration_sample(x[:100], seed=1)) == 100


def test_the_layers_that_see_pixels_and_make_the_logits_stay_float(tmp_path):
    """The pixel side (the pixels' scaling, each test-time view's first convolution) and the logits side (every
    matrix product and what follows it) are left out of quantization: kept in float they keep float's class
    for more test images, and a quantized scaling only to be dequantized for a float convolution costs more."""
    float_path = tmp_path / "model.onnx"
    export_onnx(with_flip_tta(build_model((8, 16), num_classes=10)), float_path, natural_images(4).astype(np.float32))
    graph = onnx.load(float_path).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    kept = edge_layers(float_path)
    assert sum(n.op_type == "Conv" for n in graph.node if n.name in kept) == 2  # one per view (flip TTA)
    assert {n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")} <= set(kept)
    scaling = {n.name for n in graph.node if "standardize" in n.name}  # pixels * scale + shift
    softmax = {n.name for n in graph.node if n.op_type == "Softmax"}
    assert scaling and softmax and scaling | softmax <= set(kept)
    assert len(convs) > 2 and set(convs) - set(kept)  # the rest is quantized
    # 100 images: batches of 64 and 36, which the percentile calibrator cannot stack; quantize keeps 64.
    quantize(float_path, natural_images(100, seed=1), tmp_path / "model.int8.onnx")
    quantized = onnx.load(tmp_path / "model.int8.onnx").graph
    first = [n for n in quantized.node if n.name in kept and n.op_type == "Conv"]
    producers = {out: node for node in quantized.node for out in node.output}
    # A kept layer's weights reach it unquantized: no DequantizeLinear feeds its weight input.
    assert first and all(producers.get(n.input[1]) is None or producers[n.input[1]].op_type != "DequantizeLinear"
                         for n in first)
