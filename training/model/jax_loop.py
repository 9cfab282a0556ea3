"""The training loop under JAX: jitted steps, the uint8 data on the device, airbench94's Lookahead.

Keras ``fit`` under JAX feeds every batch from the host, which on a GPU costs far more than the model
(docs/gpu.md). Here the data goes to the device once and each compiled step gathers, flips and
translates its batch itself. The model, optimizer and loss are the ones ``fit`` uses
(:func:`training.model.fit.compile_model`). JAX is imported inside the functions only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from training.config import PipelineConfig

log = logging.getLogger(__name__)

# As fit's validation_batch_size; the last batch is padded and masked so one compiled shape serves all.
VAL_BATCH = 512
# airbench94's Lookahead: every LOOKAHEAD_EVERY steps the weights are pulled to a slow copy.
LOOKAHEAD_EVERY = 5


def decay_at(step: int, total_steps: int) -> float:
    """airbench94's Lookahead decay: ``0.95**5 * (step / total_steps)**3``, nothing early, averaging late."""
    return 0.95 ** 5 * (min(step, total_steps) / max(1, total_steps)) ** 3


def augment(key, images, pad: int):
    """Random flips and translations by up to ``pad`` pixels (reflect padding) of uint8 NHWC images, as fit's."""
    import jax
    import jax.numpy as jnp

    n, h, w, _ = images.shape
    flip_key, shift_key = jax.random.split(key)
    flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    shifts = jax.random.randint(shift_key, (n, 2), 0, 2 * pad + 1)
    crop = lambda image, s: jax.lax.dynamic_slice(image, (s[0], s[1], 0), (h, w, image.shape[2]))  # noqa: E731
    return jax.vmap(crop)(padded, shifts)


def lookahead_pull(state: tuple, slow: list, decay):
    """``slow = decay * slow + (1 - decay) * fast`` over the model's float variables (BatchNorm statistics
    too), then the model takes the slow copy; returns ``(state, slow)``. Optimizer variables are untouched."""
    import jax.numpy as jnp

    trainable, non_trainable, opt_vars = state
    slow = [(decay * s + (1 - decay) * f).astype(f.dtype) if jnp.issubdtype(f.dtype, jnp.floating) else f
            for s, f in zip(slow, [*trainable, *non_trainable])]
    # The model gets its own copy: the step donates its state on the GPU, which must not free `slow`.
    model = [jnp.copy(v) for v in slow]
    return (model[:len(trainable)], model[len(trainable):], opt_vars), slow


def _steps(model, optimizer, loss_fn, num_classes: int, batch: int) -> tuple[Callable, Callable]:
    """The train and evaluation steps, pure functions of the state ``(trainable, non_trainable, optimizer)``.

    Each adds its batch's summed loss and hits to ``sums``; the train step also leaves the learning rate
    after it there (what fit's callback reads at the end of an epoch).
    """
    import jax
    import jax.numpy as jnp
    import keras

    from training.model.fit import TRANSLATE

    def scores(probs, labels):
        return loss_fn.call(jax.nn.one_hot(labels, num_classes), probs), jnp.argmax(probs, axis=-1) == labels

    def train_step(state, sums, order, step, epoch_key, x_all, y_all):
        trainable, non_trainable, opt_vars = state
        index = jax.lax.dynamic_slice_in_dim(order, step * batch, batch)
        images = augment(jax.random.fold_in(epoch_key, step), x_all[index], TRANSLATE).astype("float32")
        labels = y_all[index]

        def mean_loss(trainable, non_trainable):
            probs, non_trainable = model.stateless_call(trainable, non_trainable, images, training=True)
            losses, hits = scores(probs, labels)
            return jnp.mean(losses), (hits, non_trainable)

        (loss, (hits, non_trainable)), grads = jax.value_and_grad(mean_loss, has_aux=True)(trainable, non_trainable)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, opt_vars))):
            lr = keras.ops.cast(optimizer.learning_rate, "float32")
        metrics = jnp.stack([sums[0] + loss * batch, sums[1] + jnp.sum(hits, dtype=jnp.float32), lr])
        return (trainable, non_trainable, opt_vars), metrics

    def eval_step(state, sums, images, labels, mask):
        trainable, non_trainable, _ = state
        probs, _ = model.stateless_call(trainable, non_trainable, images.astype("float32"), training=False)
        losses, hits = scores(probs, labels)
        return sums + jnp.stack([jnp.sum(losses * mask), jnp.sum(hits * mask), 0.0])

    return train_step, eval_step


@dataclass
class _Loop:
    """The compiled steps and what they run on, all on the device."""

    train: Any
    evaluate: Any
    pull: Any
    x: Any  # training images (uint8) and labels
    y: Any
    val: tuple  # validation images, labels and mask, padded to whole batches of val_batch
    n_val: int
    val_batch: int
    keys: tuple  # (order, augment)
    steps: int
    batch: int
    compile_seconds: float

    def epoch(self, state, slow, epoch: int, epochs: int) -> tuple[Any, Any, dict[str, float]]:
        """One epoch of steps with Lookahead's pulls, then validation; returns its state, slow copy and metrics."""
        import jax
        import jax.numpy as jnp

        start, cpu_start = time.monotonic(), time.process_time()
        order = jax.random.permutation(jax.random.fold_in(self.keys[0], epoch), len(self.x))
        epoch_key = jax.random.fold_in(self.keys[1], epoch)
        sums = jnp.zeros(3, jnp.float32)
        for step in range(self.steps):
            state, sums = self.train(state, sums, order, np.int32(step), epoch_key, self.x, self.y)
            done = epoch * self.steps + step + 1
            if done % LOOKAHEAD_EVERY == 0:
                state, slow = self.pull(state, slow, np.float32(decay_at(done, self.steps * epochs)))
        val_sums = jnp.zeros(3, jnp.float32)
        for i in range(0, len(self.val[0]), self.val_batch):
            val_sums = self.evaluate(state, val_sums, *(part[i:i + self.val_batch] for part in self.val))
        (loss, hits, lr), (val_loss, val_hits, _) = np.asarray(sums), np.asarray(val_sums)  # waits for the device
        seen = self.steps * self.batch
        return state, slow, {"loss": float(loss / seen), "accuracy": float(hits / seen),
                             "val_loss": float(val_loss / self.n_val), "val_accuracy": float(val_hits / self.n_val),
                             "learning_rate": float(lr), "epoch_seconds": time.monotonic() - start,
                             "epoch_cpu_seconds": time.process_time() - cpu_start}


def _padded_validation(x_val: np.ndarray, y_val: np.ndarray) -> tuple[tuple, int]:
    """Validation images, labels and a mask of the real ones on the device, padded to whole batches."""
    import jax

    n_val = len(x_val)
    val_batch = min(VAL_BATCH, n_val)
    pad = -(-n_val // val_batch) * val_batch - n_val
    parts = (np.concatenate([x_val, np.zeros((pad, *x_val.shape[1:]), x_val.dtype)]),
             np.concatenate([y_val, np.zeros(pad, y_val.dtype)]).astype(np.int32),
             (np.arange(n_val + pad) < n_val).astype(np.float32))
    return tuple(jax.device_put(part) for part in parts), val_batch


def _compile(model, optimizer, loss_fn, splits: dict, num_classes: int, batch: int, seed: int, state, slow) -> _Loop:
    """Put the data on the device and compile every step ahead of time, so compile_seconds is measured."""
    import jax
    import jax.numpy as jnp

    x_train, y_train = splits["train"]
    x, y = jax.device_put(x_train), jax.device_put(y_train.astype(np.int32))
    val, val_batch = _padded_validation(*splits["val"])
    keys = jax.random.split(jax.random.key(seed))
    train_step, eval_step = _steps(model, optimizer, loss_fn, num_classes, batch)
    zeros = jnp.zeros(3, jnp.float32)
    # Donating the state lets XLA update it in place (the CPU cannot, and would warn).
    donate = (0,) if jax.default_backend() != "cpu" else ()
    start = time.monotonic()
    order = jax.random.permutation(keys[0], len(x_train))
    train = jax.jit(train_step, donate_argnums=donate).lower(state, zeros, order, np.int32(0), keys[1], x, y).compile()
    evaluate = jax.jit(eval_step).lower(state, zeros, *(part[:val_batch] for part in val)).compile()
    pull = jax.jit(lookahead_pull).lower(state, slow, np.float32(0)).compile()
    return _Loop(train, evaluate, pull, x, y, val, len(splits["val"][1]), val_batch, tuple(keys),
                 len(x_train) // batch, batch, time.monotonic() - start)


def _assign(variables: list, values: list) -> None:
    for variable, value in zip(variables, values):
        variable.assign(value)


def fit_jax(config: PipelineConfig, splits: dict, num_classes: int):
    """Train as ``fit.fit_keras`` does, in jitted steps (JAX backend); returns (float32 model, history).

    The history has fit's keys and ``compile_seconds``: all of the compilation, before epoch 1; 0 afterwards.
    """
    import jax
    import jax.numpy as jnp

    from training.model.fit import compile_model, record_epoch
    from training.model.network import float32_copy, with_flip_tta

    setup_start = time.monotonic()
    x_train = splits["train"][0]
    # Partial last batches are dropped, as in fit (which serves fewer images than a batch as one batch).
    batch = min(config.batch_size, len(x_train))
    model, optimizer, loss_fn = compile_model(config, x_train, num_classes, len(x_train) // batch)
    optimizer.build(model.trainable_variables)
    groups = (model.trainable_variables, model.non_trainable_variables, optimizer.variables)
    state = tuple([v.value for v in variables] for variables in groups)
    slow = [jnp.copy(v) for v in (*state[0], *state[1])]
    loop = _compile(model, optimizer, loss_fn, splits, num_classes, batch, config.seed, state, slow)
    # Model building runs eagerly (each new operation compiles on first use): on a 30-second budget it counts.
    log.info("jit loop: setup %.1f s (model, whitening, data to %s), compile %.1f s, %d steps/epoch of %d",
             time.monotonic() - setup_start - loop.compile_seconds, jax.default_backend(), loop.compile_seconds,
             loop.steps, batch)
    history: dict[str, list[float]] = {}
    for epoch in range(config.epochs):
        state, slow, metrics = loop.epoch(state, slow, epoch, config.epochs)
        metrics["compile_seconds"] = loop.compile_seconds if epoch == 0 else 0.0
        record_epoch(history, epoch, config.epochs, metrics)
    finish = time.monotonic()
    state, _ = loop.pull(state, slow, np.float32(1.0))  # the trained model is the slow copy
    for variables, values in zip(groups, state):
        _assign(variables, values)
    final = float32_copy(model, config.width_tuple, num_classes)
    log.info("jit loop: float32 copy ready %.1f s after the last epoch", time.monotonic() - finish)
    return (with_flip_tta(final) if config.tta else final), history


def predict_jax(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Probabilities for uint8 images from one compiled forward pass; eager calls under JAX compile each op.

    The last batch is padded so that one shape serves every batch.
    """
    import jax

    forward = jax.jit(lambda trainable, non_trainable, images: model.stateless_call(
        trainable, non_trainable, images.astype("float32"), training=False)[0])
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    batch_size = min(batch_size, len(x))
    out = []
    for i in range(0, len(x), batch_size):
        images = x[i:i + batch_size]
        pad = batch_size - len(images)
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        out.append(np.asarray(forward(trainable, non_trainable, images))[:batch_size - pad])
    return np.concatenate(out)
