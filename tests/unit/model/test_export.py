"""ONNX export: parity with Keras is measured, and a broken export fails loudly."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import make_images

from serving.model import onnx_session

from training.model.export import ParityError, check_parity, export_onnx, onnx_probabilities
from training.model.network import build_model, set_whitening, with_flip_tta


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_model((8, 16, 16), 10)
    x, _ = make_images(2)
    set_whitening(model, x)
    model = with_flip_tta(model)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return model, path, export_onnx(model, path, x), x.astype(np.float32)


def test_export_matches_keras(exported):
    model, path, diff, x = exported
    assert path.is_file() and diff <= 1e-4
    session = onnx_session(path, threads=1)
    assert session.get_inputs()[0].shape[1:] == [32, 32, 3]
    # Batch sizes vary per call: no per-shape memory pattern (it made a server's memory grow).
    options = session.get_session_options()
    assert options.enable_mem_pattern is False and options.intra_op_num_threads == 1
    assert check_parity(onnx_probabilities(session, x), np.asarray(model(x)), "export") == pytest.approx(diff, abs=1e-7)


def test_broken_parity_raises(exported):
    model, path, _, x = exported
    wrong = np.asarray(model(x)) + 1e-3  # what a lossy conversion would look like
    with pytest.raises(ParityError, match=r"^ONNX vs Keras: probabilities differ by up to 0.001 \(> 0.0001\)$"):
        check_parity(onnx_probabilities(onnx_session(path), x), wrong, "ONNX vs Keras")


def test_parity_compares_classes_beyond_a_tie_within_the_tolerance():
    expected = np.array([[0.5, 0.49985], [0.5, 0.49995]])
    # Each probability within 1e-4; the first image's class flips though its reference leads by 1.5e-4.
    with pytest.raises(ParityError, match=r"served: 1 of 2 images get another class \(image 0: class 1, expected 0\)"):
        check_parity(np.array([[0.49993, 0.49994], [0.49998, 0.49999]]), expected, "served")
    # The second alone flips too, but its reference leads by 5e-5: a tie within the noise.
    assert check_parity(np.array([[0.5, 0.49985], [0.49998, 0.49999]]), expected, "served") <= 1e-4
    # The class answered counts, not only the probabilities' top one.
    with pytest.raises(ParityError, match="image 0: class 1, expected 0"):
        check_parity(expected, expected, "served", classes=[1, 0])


def test_export_fuses_each_gelu_into_one_node(exported):
    import onnx

    _, path, _, _ = exported
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # 7 activations (whitening + 2 per block) in each of the two TTA branches.
    assert ops.count("Gelu") == 14 and "Tanh" not in ops and "Pow" not in ops


def _gelu_chain(half: float = 0.5, exponent: float = 3.0):
    """tf2onnx's expansion of the tanh GELU (with its Transpose pair around the cube), opset 20."""
    from onnx import TensorProto, helper

    consts = {"half": half, "three": exponent, "c": 0.044715, "k": float(np.sqrt(2 / np.pi)), "one": 1.0}
    nodes = [
        helper.make_node("Mul", ["half", "x"], ["a"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]),
        helper.make_node("Pow", ["xt", "three"], ["cube"]),
        helper.make_node("Mul", ["c", "cube"], ["cc"]),
        helper.make_node("Transpose", ["cc"], ["b"], perm=[0, 3, 1, 2]),
        helper.make_node("Add", ["x", "b"], ["s"]),
        helper.make_node("Mul", ["k", "s"], ["z"]),
        helper.make_node("Tanh", ["z"], ["t"]),
        helper.make_node("Add", ["one", "t"], ["e"]),
        helper.make_node("Mul", ["a", "e"], ["y"]),
    ]
    shape = [2, 3, 4, 5]
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [helper.make_tensor(name, TensorProto.FLOAT, [], [value]) for name, value in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_fuse_gelu_rewrites_the_exact_chain_only():
    import onnx
    import onnxruntime as ort

    from training.model.export import fuse_gelu

    x = np.linspace(-6, 6, 120, dtype=np.float32).reshape(2, 3, 4, 5)
    model = _gelu_chain()
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert fuse_gelu(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Gelu"] and not model.graph.initializer
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.max(np.abs(after - before)) < 1e-6
    # Another function (wrong constant or power) is left alone.
    for other in (_gelu_chain(half=0.6), _gelu_chain(exponent=2.0)):
        assert fuse_gelu(other) == 0 and len(other.graph.node) == 10
