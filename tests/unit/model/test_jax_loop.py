"""The jitted JAX training loop (training/model/jax_loop.py), on the CPU, in seconds.

Keras picks its backend once, at import, and this test process has Keras on
TensorFlow already: the loop runs in a child process (this file run as a script) with
``KERAS_BACKEND=jax``, which prints one JSON line of facts that the tests check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT

EPOCHS = 4
NUM_CLASSES = 4


def child() -> dict:
    """Runs under KERAS_BACKEND=jax: trains the tiny recipe through build_and_fit and
    reports what it saw, plus what the in-step augmentation does to a few images."""
    import jax
    import keras

    from tests.helpers import CLASSES, make_images
    from training.config import load_config
    from training.model.jax_loop import augment
    from training.model.network import build_model, whitening_kernel
    from training.model.train import build_and_fit, predict_probabilities

    x, y = make_images(60, CLASSES[:NUM_CLASSES], seed=1)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    splits = {"train": (x[:192], y[:192]), "val": (x[192:], y[192:])}
    config = load_config({"recipe": "tiny", "epochs": EPOCHS, "seed": 3}, environ={})
    model, history = build_and_fit(config, splits, NUM_CLASSES)
    probs = predict_probabilities(model, x[192:])
    inner = model.get_layer("cifar10_cnn")  # the float32 net inside the TTA wrapper (what ONNX gets)
    reference = build_model(config.width_tuple, NUM_CLASSES)

    images = x[:8]
    key = jax.random.key(7)
    out = np.asarray(augment(key, images, 2))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    # Each output must be a 32x32 window of the reflect-padded image, mirrored or not.
    windows = [{(flip, dy, dx) for flip in (0, 1) for dy in range(5) for dx in range(5)
                if np.array_equal(out[i], (padded[i, :, ::-1] if flip else padded[i])[dy:dy + 32, dx:dx + 32])}
               for i in range(len(images))]
    return {
        "backend": keras.backend.backend(),
        "history": history,
        "prob_sums": probs.sum(axis=1).tolist(),
        "val_accuracy_of_returned_model": float(np.mean(probs.argmax(1) == y[192:])),
        "shapes": {"reference": [list(w.shape) for w in reference.weights],
                   "trained": [list(w.shape) for w in inner.weights]},
        "names": {"reference": [w.path for w in reference.weights], "trained": [w.path for w in inner.weights]},
        "dtypes": sorted({str(w.dtype) for w in inner.weights}),
        "whiten_matches_data": bool(np.allclose(keras.ops.convert_to_numpy(inner.get_layer("whiten").kernel),
                                                whitening_kernel(x[:192]), atol=1e-6)),
        "bn_moving_mean_abs": float(np.abs(keras.ops.convert_to_numpy(
            inner.get_layer("block0a_bn").moving_mean)).max()),
        "augment_windows_found": [len(w) > 0 for w in windows],
        "augment_flips_seen": sorted({f for w in windows for f, _, _ in w}),
        "augment_same_key_same_output": bool(np.array_equal(out, np.asarray(augment(key, images, 2)))),
        "augment_other_key_differs": not np.array_equal(out, np.asarray(augment(jax.random.key(8), images, 2))),
    }


@pytest.fixture(scope="module")
def facts():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed: it is a dev dependency (uv sync --frozen installs it)")
    # XLA's lowest optimisation level compiles the many small eager ops of model building
    # several times faster; these tests check behaviour, not speed.
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())
    done = subprocess.run([sys.executable, "-m", "tests.unit.model.test_jax_loop"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"child failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_runs_on_the_jax_backend_with_the_jitted_loop(facts):
    result, log = facts
    assert result["backend"] == "jax"
    assert result["history"]["compile_seconds"][0] > 0 and result["history"]["compile_seconds"][1:] == [0.0] * 3
    # The same per-epoch progress line as the fit loop (train.record_epoch).
    assert sum(f"epoch {e}/{EPOCHS} " in log for e in range(1, EPOCHS + 1)) == EPOCHS, log[-2000:]


def test_history_has_every_key_for_every_epoch(facts):
    history = facts[0]["history"]
    keys = {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds",
            "epoch_cpu_seconds", "compile_seconds"}
    assert set(history) == keys
    assert all(len(history[k]) == EPOCHS for k in keys)
    # The triangle schedule (peak 0.2 in the tiny recipe) ends at 0.07 x peak.
    assert history["learning_rate"][-1] == pytest.approx(0.2 * 0.07, rel=1e-3)


def test_it_learns(facts):
    result = facts[0]
    history = result["history"]
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] > 2 / NUM_CLASSES
    assert result["val_accuracy_of_returned_model"] > 2 / NUM_CLASSES  # Lookahead's slow copy, trained
    # BatchNorm statistics came back from stateless_call (they start at zero).
    assert result["bn_moving_mean_abs"] > 0


def test_augmentation_inside_the_step_flips_and_translates(facts):
    result = facts[0]
    assert all(result["augment_windows_found"])  # every image is a shifted (mirrored) window
    assert result["augment_flips_seen"] == [0, 1]
    assert result["augment_same_key_same_output"] and result["augment_other_key_differs"]


def test_returned_model_is_the_float32_export_contract(facts):
    result = facts[0]
    assert np.allclose(result["prob_sums"], 1.0, atol=1e-4)
    assert result["shapes"]["trained"] == result["shapes"]["reference"]
    assert result["names"]["trained"] == result["names"]["reference"]
    assert result["dtypes"] == ["float32"]
    assert result["whiten_matches_data"]  # frozen: set from the data, never trained


def test_lookahead_decay_follows_airbench94_schedule():
    from training.model.jax_loop import decay_at

    assert decay_at(0, 100) == 0.0
    assert decay_at(50, 100) == pytest.approx(0.95 ** 5 * 0.125)
    assert decay_at(100, 100) == decay_at(200, 100) == pytest.approx(0.95 ** 5)


def test_lookahead_pull_moves_the_slow_copy_and_the_weights_to_it():
    """On float variables only (BatchNorm statistics too), handing the model a copy (the GPU step
    donates its state: it must not free the slow copy)."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed: it is a dev dependency (uv sync --frozen installs it)")
    import jax.numpy as jnp

    from training.model.jax_loop import lookahead_pull

    state = ([jnp.array([4.0, 2.0])], [jnp.array([1.0]), jnp.array([7], dtype=jnp.uint32)], ["opt"])
    slow = [jnp.array([0.0, 10.0]), jnp.array([3.0]), jnp.array([7], dtype=jnp.uint32)]
    (trainable, non_trainable, opt_vars), slow = lookahead_pull(state, slow, np.float32(0.75))
    np.testing.assert_allclose(slow[0], [1.0, 8.0])  # 0.75 * slow + 0.25 * weights
    np.testing.assert_allclose(trainable[0], [1.0, 8.0])
    np.testing.assert_allclose(non_trainable[0], [2.5])  # BatchNorm statistics take part too
    assert non_trainable[1].dtype == jnp.uint32 and int(non_trainable[1][0]) == 7  # non-floats pass through
    assert opt_vars == ["opt"]
    assert trainable[0].unsafe_buffer_pointer() != slow[0].unsafe_buffer_pointer()
if __name__ == "__main__":
    import logging

    import importlib.abc

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        """The GPU machine has no TensorFlow: prove the JAX path needs none (Keras would
        otherwise import it only to seed it, ~15 s here)."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ImportError("TensorFlow is hidden in this test, as on the GPU machine")

    sys.meta_path.insert(0, NoTensorFlow())
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    print(json.dumps(child()))
