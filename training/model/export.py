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
    """Write ``model`` as ONNX to ``path``; return the max difference of probabilities on ``sample`` (checked)."""
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
    """Rewrite the ONNX file at ``path`` with :func:`fuse_gelu` (opset 20 first); return the GELUs fused.

    tf2onnx writes the tanh GELU as eight element-wise nodes, each a pass over the activations; ONNX's
    ``Gelu(approximate="tanh")`` computes the same in one (the other ops' semantics are unchanged at 20).
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


class _Graph:
    """Lookups over an ONNX graph: constants, each output's producer and each value's consumers."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def is_scalar(self, name: str, value: float) -> bool:
        c = self.consts.get(name)
        return c is not None and c.size == 1 and abs(float(c.ravel()[0]) - value) <= 1e-6 * abs(value)

    def operand(self, node, op_type: str, value: float) -> str | None:
        """The other input of ``node`` when it is an ``op_type`` with the scalar constant ``value``, else None."""
        if node is None or node.op_type != op_type or len(node.input) != 2:
            return None
        for const, other in (node.input, node.input[::-1]):
            if self.is_scalar(const, value):
                return other
        return None

    def before_transposes(self, name: str) -> tuple[str, list[int] | None]:
        """Walk back over Transpose nodes: (their source, the composed permutation or None)."""
        perm = None
        while name in self.producer and self.producer[name].op_type == "Transpose":
            node = self.producer[name]
            step = list(next(a.ints for a in node.attribute if a.name == "perm"))
            perm = step if perm is None else [step[i] for i in perm]
            name = node.input[0]
        return name, perm

    def gelu_around(self, tanh) -> tuple[object, str] | None:
        """(the chain's last Mul, its input x) when ``tanh`` is the heart of ``0.5*x*(1+tanh(...))``, else None."""
        inner = self.operand(self.producer.get(tanh.input[0]), "Mul", math.sqrt(2 / math.pi))
        total = self.producer.get(inner) if inner else None  # x + 0.044715*x**3
        after = self.consumers.get(tanh.output[0], [])
        one_plus = after[0].output[0] if len(after) == 1 and self.operand(after[0], "Add", 1.0) else None
        last = self.consumers.get(one_plus, []) if one_plus else []
        if total is None or total.op_type != "Add" or len(last) != 1 or last[0].op_type != "Mul":
            return None
        x = self.operand(self.producer.get(next(i for i in last[0].input if i != one_plus)), "Mul", 0.5)
        if x is None or x not in total.input:
            return None
        cube_term, perm_after = self.before_transposes(next(i for i in total.input if i != x))
        cube = self.producer.get(self.operand(self.producer.get(cube_term), "Mul", 0.044715))
        if cube is None or cube.op_type != "Pow" or not self.is_scalar(cube.input[1], 3.0):
            return None
        source, perm_before = self.before_transposes(cube.input[0])
        perm = [perm_before[i] for i in perm_after] if perm_before and perm_after else perm_before or perm_after
        return (last[0], x) if source == x and (perm is None or perm == sorted(perm)) else None


def fuse_gelu(model) -> int:
    """Replace each expanded tanh GELU in ``model`` (ModelProto, opset >= 20) by one ``Gelu`` node, in place;
    return how many. Only exact matches are rewritten, and the parity check after every export has the last word.
    """
    from onnx import helper

    graph = model.graph
    index = _Graph(graph)
    rewrites = []
    for tanh in [node for node in graph.node if node.op_type == "Tanh"]:
        match = index.gelu_around(tanh)
        if match is not None:
            last, x = match
            rewrites.append((last, helper.make_node("Gelu", [x], list(last.output), approximate="tanh",
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
    """ONNX export of a model trained under JAX by a TensorFlow child process, through the backend-neutral
    ``.keras`` file: Keras exports JAX models only through ``jax2onnx``, which brings flax, optax, orbax."""
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
