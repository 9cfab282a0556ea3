"""Lookahead as airbench94 uses it: a slow copy of the model's state the fast weights are pulled to.

Every ``EVERY`` optimizer steps the slow copy moves toward the current weights by
``1 - decay`` and the weights are reset to it; ``decay`` grows from 0 to 0.95**5 as
(step / total)**3, so it does nothing early and averages late. At the end of training
the weights become the slow copy. All model variables take part, BatchNorm statistics
included, as in airbench's ``LookaheadState`` over the whole ``state_dict``.
"""

from __future__ import annotations

import numpy as np

EVERY = 5


def decay_at(step: int, total_steps: int) -> float:
    """airbench94's schedule: ``0.95**5 * (step / total_steps)**3``."""
    return 0.95 ** 5 * (min(step, total_steps) / max(1, total_steps)) ** 3


def pull(slow: list[np.ndarray], variables, decay: float) -> None:
    """``slow = decay * slow + (1 - decay) * variables``, then ``variables = slow`` (in place)."""
    for copy, variable in zip(slow, variables):
        copy *= decay
        copy += (1.0 - decay) * np.asarray(variable.numpy(), dtype=copy.dtype)
        variable.assign(copy.astype(variable.dtype))


def lookahead_callback(total_steps: int):
    """A Keras callback applying Lookahead during ``model.fit`` (any backend)."""
    import keras

    class Lookahead(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.step = 0
            self.variables = [v for v in self.model.variables if "float" in str(v.dtype)]
            self.slow = [np.array(v.numpy(), dtype=np.float32) for v in self.variables]

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step % EVERY == 0:
                pull(self.slow, self.variables, decay_at(self.step, total_steps))

        def on_train_end(self, logs=None):
            pull(self.slow, self.variables, 1.0)  # the trained model is the slow copy

    return Lookahead()
