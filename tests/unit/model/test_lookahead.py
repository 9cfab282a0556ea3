"""Lookahead: airbench94's schedule, the pull toward the slow copy, and the callback in a real fit."""

from __future__ import annotations

import numpy as np
import pytest

from training.model.lookahead import EVERY, decay_at, lookahead_callback, pull


def test_decay_follows_airbench94_schedule():
    assert decay_at(0, 100) == 0.0
    assert decay_at(50, 100) == pytest.approx(0.95 ** 5 * 0.125)
    assert decay_at(100, 100) == decay_at(200, 100) == pytest.approx(0.95 ** 5)


class _Var:
    def __init__(self, value):
        self.value, self.dtype = np.array(value, dtype=np.float32), "float32"

    def numpy(self):
        return self.value

    def assign(self, value):
        self.value = np.array(value)


def test_pull_moves_the_slow_copy_and_resets_the_weights_to_it():
    slow, var = [np.array([0.0, 10.0], dtype=np.float32)], _Var([4.0, 2.0])
    pull(slow, [var], 0.75)
    np.testing.assert_allclose(slow[0], [1.0, 8.0])  # 0.75 * slow + 0.25 * weights
    np.testing.assert_allclose(var.value, [1.0, 8.0])


def test_fit_with_lookahead_ends_on_the_slow_copy():
    import keras

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    start = [np.array(v.numpy()) for v in model.variables]
    callback = lookahead_callback(total_steps=4 * EVERY)
    model.fit(x, y, batch_size=16, epochs=EVERY, callbacks=[callback], verbose=0)  # 4 steps per epoch
    assert callback.step == 4 * EVERY
    for slow, variable, first in zip(callback.slow, model.variables, start):
        np.testing.assert_allclose(variable.numpy(), slow, rtol=1e-6)  # the model is the slow copy
        assert not np.allclose(slow, first)  # and it learned
