"""Export the trained Keras model to ONNX and prove it computes the same thing."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from serving.model import onnx_session

log = logging.getLogger(__name__)

# Largest allowed difference between Keras and ONNX Runtime probabilities.
PARITY_TOLERANCE = 1e-4
# First ONNX opset with a Gelu operator (fuse_gelu_file moves exported models to it).
GELU_OPSET = 20


class ParityError(RuntimeError):
    """A model's answers differ from the reference's beyond the tolerance, or name another class."""


def onnx_probabilities(session, pixels: np.ndarray) -> np.ndarray:
    """ONNX Runtime ``session``'s class probabilities for raw ``pixels``, one row per image."""
    return session.run(None, {session.get_inputs()[0].name: pixels.astype(np.float32)})[0]


def check_parity(got: np.ndarray, expected: np.ndarray, what: str, classes: np.ndarray | None = None,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |got - expected| over rows of class probabilities; raises :class:`ParityError`, saying ``what``
    was compared, above ``tolerance`` or where an image's class (``classes``, else ``got``'s top one)
    is worse than ``expected``'s top one by more than ``tolerance`` (closer is a tie within noise)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    classes = got.argmax(1) if classes is None else np.asarray(classes)
    diff = float(np.max(np.abs(got - expected), initial=0.0))
    wrong = np.flatnonzero(expected.max(1) - expected[np.arange(len(expected)), classes] > tolerance)
    problems = [f"probabilities differ by up to {diff:.3g} (> {tolerance:g})"] if not diff <= tolerance else []
    if wrong.size:
        i = wrong[0]
        problems.append(f"{wrong.size} of {len(expected)} images get another class (image {i}: class "
                        f"{classes[i]}, expected {expected[i].argmax()})")
    if problems:
        raise ParityError(f"{what}: {'; '.join(problems)}")
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
    fused = fuse_gelu_file(path)
    diff = check_parity(onnx_probabilities(onnx_session(path), pixels), reference, f"ONNX export {path} vs Keras")
    log.info("ONNX export %s: %d GELUs fused; max |diff| vs Keras = %.2e on %d images", path, fused, diff,
             len(pixels))
    return diff


def fuse_gelu_file(path: Path) -> int:
    """Rewrite the ONNX file at ``path`` with :func:`fuse_gelu`; returns the number of GELUs fused.

    tf2onnx writes the tanh GELU as eight element-wise nodes (Pow, Tanh, Muls, Adds):
    ~20% of ONNX Runtime's time on the served net, each node a pass over the activations.
    ONNX's own ``Gelu(approximate="tanh")`` (opset 20) computes the same function in one
    pass: +17% images/s for one call, +19% for two side by side (bench/bench_gelu_fusion.py).
    The model moves to opset 20 for it (ONNX's version converter; the other ops' semantics
    are unchanged).
    """
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < GELU_OPSET:
        model = version_converter.convert_version(model, GELU_OPSET)
    fused = fuse_gelu(model)
    if fused:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return fused


def fuse_gelu(model) -> int:
    """Replace each expanded ``0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x**3)))`` in ``model`` (ModelProto,
    opset >= 20) by one ``Gelu(x, approximate="tanh")`` node, in place; returns how many.

    Only exact matches are rewritten (constants checked, and any Transposes tf2onnx puts
    around the cube must cancel); anything else is left as it is, and the parity check
    against Keras that follows every export still has the last word.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def is_scalar(name: str, value: float) -> bool:
        c = consts.get(name)
        return c is not None and c.size == 1 and abs(float(c.ravel()[0]) - value) <= 1e-6 * abs(value)

    def operand(node, op_type: str, value: float) -> str | None:
        """The other input of ``node`` (an ``op_type`` with the scalar constant ``value``), else None."""
        if node is None or node.op_type != op_type or len(node.input) != 2:
            return None
        for const, other in (node.input, node.input[::-1]):
            if is_scalar(const, value):
                return other
        return None

    def before_transposes(name: str) -> tuple[str, list[int] | None]:
        """Walk back over Transpose nodes: (their source, the composed permutation or None)."""
        perm = None
        while name in producer and producer[name].op_type == "Transpose":
            node = producer[name]
            step = list(next(a.ints for a in node.attribute if a.name == "perm"))
            perm = step if perm is None else [step[i] for i in perm]
            name = node.input[0]
        return name, perm

    rewrites = []
    for tanh in [node for node in graph.node if node.op_type == "Tanh"]:
        inner = operand(producer.get(tanh.input[0]), "Mul", math.sqrt(2 / math.pi))  # x + 0.044715*x**3
        total = producer.get(inner) if inner else None
        after = consumers.get(tanh.output[0], [])
        one_plus = after[0].output[0] if len(after) == 1 and operand(after[0], "Add", 1.0) else None
        last = consumers.get(one_plus, []) if one_plus else []
        if total is None or total.op_type != "Add" or len(last) != 1 or last[0].op_type != "Mul":
            continue
        x = operand(producer.get(next(i for i in last[0].input if i != one_plus)), "Mul", 0.5)
        if x is None or x not in total.input:
            continue
        cube_term, perm_after = before_transposes(next(i for i in total.input if i != x))
        cube = producer.get(operand(producer.get(cube_term), "Mul", 0.044715))
        if cube is None or cube.op_type != "Pow" or not is_scalar(cube.input[1], 3.0):
            continue
        source, perm_before = before_transposes(cube.input[0])
        perm = [perm_before[i] for i in perm_after] if perm_before and perm_after else perm_before or perm_after
        if source != x or (perm is not None and perm != sorted(perm)):
            continue
        rewrites.append((last[0], helper.make_node("Gelu", [x], list(last[0].output), approximate="tanh",
                                                    name=f"{tanh.name}/Gelu")))
    for old, new in rewrites:
        graph.node.insert(list(graph.node).index(old), new)
        graph.node.remove(old)
    _drop_unused(graph)
    return len(rewrites)


def _drop_unused(graph) -> None:
    """Remove nodes and initializers nothing reads any more (the rest of each rewritten chain)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


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

    # A loaded model must be called once before Keras exports it; importing the network module
    # registers its custom layers for loading.
    code = ("import sys; import keras, numpy, training.model.network; "
            "m = keras.saving.load_model(sys.argv[1]); m(numpy.zeros((1, 32, 32, 3), 'float32')); "
            "m.export(sys.argv[2], format='onnx', verbose=False)")
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = str(Path(tmp) / "model.keras")
        model.save(keras_path)
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run([sys.executable, "-c", code, keras_path, str(path)], env=env,
                              capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"ONNX export of {model.name} in a TensorFlow child process failed (exit "
                           f"{done.returncode}); a model trained under JAX needs TensorFlow and tf2onnx "
                           f"installed for its ONNX export:\n{done.stderr[-3000:]}")
