"""The training loop for the JAX backend: one ``jax.jit`` step, the data on the device.

Keras ``fit`` under JAX feeds every batch from the host, which on a GPU costs far more
than the model itself (docs/gpu.md). Here the whole uint8 dataset is
copied to the device once, and each compiled step gathers its batch, flips and
translates it (``jax.random``, seeded) and runs ``model.stateless_call`` and
``optimizer.stateless_apply``. The model, optimizer, schedule, loss and weight decay
are the very objects ``fit`` uses (:func:`training.model.fit.compile_model`), so the two
loops train the same recipe; BatchNorm statistics come back from ``stateless_call`` as
non-trainable variables. ``train.build_and_fit`` calls :func:`fit_jax` under the JAX backend.
JAX is imported only here, inside the function.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from training.config import PipelineConfig

log = logging.getLogger(__name__)

# Validation batch, as fit's validation_batch_size; the last batch is padded and masked
# so that one compiled shape serves every batch.
VAL_BATCH = 512
# airbench94's Lookahead: every LOOKAHEAD_EVERY steps the weights are pulled to a slow copy.
LOOKAHEAD_EVERY = 5


def decay_at(step: int, total_steps: int) -> float:
    """airbench94's Lookahead decay: ``0.95**5 * (step / total_steps)**3``, nothing early, averaging late."""
    return 0.95 ** 5 * (min(step, total_steps) / max(1, total_steps)) ** 3


def augment(key, images, pad: int):
    """Random horizontal flip and translation by up to ``pad`` pixels (reflect padding), on uint8
    NHWC images inside a jitted function: the same augmentation as ``train._augment``."""
    import jax
    import jax.numpy as jnp

    n, h, w, _ = images.shape
    flip_key, shift_key = jax.random.split(key)
    flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    if pad <= 0:
        return images
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    shifts = jax.random.randint(shift_key, (n, 2), 0, 2 * pad + 1)
    crop = lambda image, s: jax.lax.dynamic_slice(image, (s[0], s[1], 0), (h, w, image.shape[2]))  # noqa: E731
    return jax.vmap(crop)(padded, shifts)


def lookahead_pull(state: tuple, slow: list, decay):
    """Lookahead on the device: ``slow = decay * slow + (1 - decay) * fast``
    over the model's float variables (trainable and not: BatchNorm statistics too), then the
    model's variables become the slow copy. Returns ``(state, slow)``; the optimizer's
    variables are untouched, other variables pass through.
    """
    import jax.numpy as jnp

    trainable, non_trainable, opt_vars = state
    fast = [*trainable, *non_trainable]
    slow = [(decay * s + (1 - decay) * f).astype(f.dtype) if jnp.issubdtype(f.dtype, jnp.floating) else f
            for s, f in zip(slow, fast)]
    # The model gets its own copy: the step donates its state on the GPU, which must not free `slow`.
    model = [jnp.copy(v) for v in slow]
    return (model[:len(trainable)], model[len(trainable):], opt_vars), slow


def fit_jax(config: PipelineConfig, splits: dict, num_classes: int):
    """Train like ``train.build_and_fit`` does, with a jitted step (JAX backend only).

    Returns ``(model, history)`` as ``build_and_fit`` does: the float32 model (flip TTA
    inside when ``config.tta``) and one value per epoch for loss, accuracy, val_loss,
    val_accuracy, learning_rate, epoch_seconds, epoch_cpu_seconds and compile_seconds
    (the ahead-of-time compilation, all of it before epoch 1, so epoch 1 is not
    inflated by it; 0 afterwards).
    """
    import jax
    import jax.numpy as jnp
    import keras

    from training.model.network import float32_copy, with_flip_tta
    from training.model.fit import TRANSLATE, compile_model, record_epoch

    setup_start = time.monotonic()
    x_train, y_train = splits["train"]
    x_val, y_val = splits["val"]
    # Partial last batches are dropped, as in fit's input pipeline (which also serves
    # fewer images than one batch as one smaller batch).
    batch, epochs = min(config.batch_size, len(x_train)), config.epochs
    steps = len(x_train) // batch
    model, optimizer, loss_fn = compile_model(config, x_train, num_classes, steps)
    optimizer.build(model.trainable_variables)

    def forward(trainable, non_trainable, images, labels, training):
        probs, non_trainable = model.stateless_call(trainable, non_trainable, images.astype("float32"),
                                                    training=training)
        # Per-image loss (the same label smoothing as fit's loss object), and hits.
        losses = loss_fn.call(jax.nn.one_hot(labels, num_classes), probs)
        return losses, jnp.argmax(probs, axis=-1) == labels, non_trainable

    def train_step(state, sums, order, step, epoch_key, x_all, y_all):
        trainable, non_trainable, opt_vars = state
        index = jax.lax.dynamic_slice_in_dim(order, step * batch, batch)
        images = augment(jax.random.fold_in(epoch_key, step), x_all[index], TRANSLATE)
        labels = y_all[index]

        def mean_loss(trainable, non_trainable):
            losses, hits, non_trainable = forward(trainable, non_trainable, images, labels, True)
            return jnp.mean(losses), (hits, non_trainable)

        (loss, (hits, non_trainable)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
            trainable, non_trainable)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        # Running sums of loss and hits, and the learning rate after this step (what fit's
        # callback reads at the end of an epoch), computed here rather than eagerly.
        with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, opt_vars))):
            lr = keras.ops.cast(optimizer.learning_rate, "float32")
        metrics = jnp.stack([sums[0] + loss * batch, sums[1] + jnp.sum(hits, dtype=jnp.float32), lr])
        return (trainable, non_trainable, opt_vars), metrics

    def eval_step(state, sums, images, labels, mask):
        trainable, non_trainable, _ = state
        losses, hits, _ = forward(trainable, non_trainable, images, labels, False)
        return sums + jnp.stack([jnp.sum(losses * mask), jnp.sum(hits * mask), 0.0])

    # Everything lives on the device from here on: variables, images (uint8), labels.
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    x_dev, y_dev = jax.device_put(x_train), jax.device_put(y_train.astype(np.int32))
    n_val = len(x_val)
    val_batch = min(VAL_BATCH, n_val)
    padded = -(-n_val // val_batch) * val_batch
    xv = jax.device_put(np.concatenate([x_val, np.zeros((padded - n_val, *x_val.shape[1:]), x_val.dtype)]))
    yv = jax.device_put(np.concatenate([y_val, np.zeros(padded - n_val, y_val.dtype)]).astype(np.int32))
    mask = jax.device_put((np.arange(padded) < n_val).astype(np.float32))
    zeros = jnp.zeros(3, jnp.float32)
    seed_key = jax.random.key(config.seed)
    order_key, augment_key = jax.random.split(seed_key)

    # Compile ahead of time so compile_seconds is measured, not guessed. Donating the
    # state lets XLA update it in place (CPU cannot, and would warn).
    donate = (0,) if jax.default_backend() != "cpu" else ()
    start = time.monotonic()
    order0 = jax.random.permutation(order_key, len(x_train))
    train_c = jax.jit(train_step, donate_argnums=donate).lower(
        state, zeros, order0, np.int32(0), augment_key, x_dev, y_dev).compile()
    eval_c = jax.jit(eval_step).lower(state, zeros, xv[:val_batch], yv[:val_batch], mask[:val_batch]).compile()
    slow = [jnp.copy(v) for v in (*state[0], *state[1])]
    pull_c = jax.jit(lookahead_pull).lower(state, slow, np.float32(0)).compile()
    compile_seconds = time.monotonic() - start
    # Model building runs eagerly (under JAX each new operation compiles on first use):
    # on a 30-second budget this counts too.
    log.info("jit loop: setup %.1f s (model, whitening, data to %s), compile %.1f s, %d steps/epoch of %d",
             start - setup_start, jax.default_backend(), compile_seconds, steps, batch)

    history: dict[str, list[float]] = {}
    for epoch in range(epochs):
        start, cpu_start = time.monotonic(), time.process_time()
        order = jax.random.permutation(jax.random.fold_in(order_key, epoch), len(x_train))
        epoch_key = jax.random.fold_in(augment_key, epoch)
        sums = zeros
        for step in range(steps):
            state, sums = train_c(state, sums, order, np.int32(step), epoch_key, x_dev, y_dev)
            done = epoch * steps + step + 1
            if done % LOOKAHEAD_EVERY == 0:
                state, slow = pull_c(state, slow, np.float32(decay_at(done, steps * epochs)))
        val_sums = zeros
        for i in range(0, padded, val_batch):
            val_sums = eval_c(state, val_sums, xv[i:i + val_batch], yv[i:i + val_batch], mask[i:i + val_batch])
        (loss, hits, lr), (val_loss, val_hits, _) = np.asarray(sums), np.asarray(val_sums)  # waits for the device
        seen = steps * batch
        metrics = {"loss": loss / seen, "accuracy": hits / seen, "val_loss": val_loss / n_val,
                   "val_accuracy": val_hits / n_val,
                   "learning_rate": lr,
                   "epoch_seconds": time.monotonic() - start,
                   "epoch_cpu_seconds": time.process_time() - cpu_start,
                   "compile_seconds": compile_seconds if epoch == 0 else 0.0}
        record_epoch(history, epoch, epochs, {k: float(v) for k, v in metrics.items()})

    # Hand the trained values back to the Keras variables, then build the float32 copy.
    finish = time.monotonic()
    state, slow = pull_c(state, slow, np.float32(1.0))  # the trained model is the slow copy
    trainable, non_trainable, opt_vars = state
    for variables, values in ((model.trainable_variables, trainable),
                              (model.non_trainable_variables, non_trainable),
                              (optimizer.variables, opt_vars)):
        for variable, value in zip(variables, values):
            variable.assign(value)
    final = float32_copy(model, config.width_tuple, num_classes)
    log.info("jit loop: float32 copy ready %.1f s after the last epoch", time.monotonic() - finish)
    return (with_flip_tta(final) if config.tta else final), history



def predict_jax(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Probabilities for uint8 images from one compiled forward pass (JAX backend).

    Calling a Keras model eagerly under JAX compiles each operation on first use, which
    takes many seconds; one jitted ``stateless_call`` compiles once.
    The last batch is padded so that a single shape serves every batch.
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
