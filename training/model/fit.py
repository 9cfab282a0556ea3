"""The Keras ``fit`` loop and what the jitted loop shares with it: recipe, schedule, optimizer, epoch records.

``keras``/``keras.ops`` only, so the same model trains under TensorFlow (``fit``, the CPU) and JAX
(:mod:`training.model.jax_loop`, a GPU).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from training.config import PipelineConfig

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30  # most seconds between progress lines inside an epoch

# airbench's recipe, which a user of the recipe has no reason to change (docs/training.md says why).
MOMENTUM = 0.85  # Nesterov
# Decoupled decay per unit of learning rate (each step multiplies the weights by 1 - lr * wd): airbench's
# coupled decay, amplified by Nesterov momentum (1 / (1 - 0.85)), shrinks by 0.0133 a step at lr 1.5.
WEIGHT_DECAY = 0.0089
LABEL_SMOOTHING = 0.2
BIAS_LR_SCALE = 64.0  # BatchNorm biases learn this much faster (airbench's bias_scaler)
TRANSLATE = 2  # random translation by up to this many pixels (reflect padding), plus flips

# /proc/cpuinfo flags of CPUs that compute bf16 dot products natively (oneDNN uses them).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def prefer_onednn() -> None:
    """Set ``TF_ENABLE_ONEDNN_OPTS=1`` unless the user chose: TensorFlow leaves oneDNN off on AMD CPUs,
    where it trains ~1.4x faster. TensorFlow reads it at import, so this must run first."""
    import sys

    if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        return
    if "tensorflow" in sys.modules:
        log.warning("TensorFlow was imported before training started: set TF_ENABLE_ONEDNN_OPTS=1 "
                    "in the environment for ~1.4x faster CPU training")
        return
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this (Linux) CPU has bf16 instructions; False where that cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def use_mixed_precision(setting: str, backend: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """``config.mixed_precision`` for the Keras ``backend``: "auto" is on only for TensorFlow on a CPU with
    native bf16 (AVX2-only CPUs emulate it many times slower; on a GPU the longer compile costs more)."""
    value = str(setting).strip().lower()
    if value in TRUE_WORDS | FALSE_WORDS:
        return value in TRUE_WORDS
    if value != "auto":
        raise ValueError(f"mixed_precision={setting!r}: use auto, true or false")
    return backend == "tensorflow" and cpu_has_native_bf16(cpuinfo)


def _augment(x: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Random horizontal flips and translations by up to ``pad`` pixels (reflect padding)."""
    n = len(x)
    flip = rng.random(n) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    dx, dy = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    out = np.empty_like(x)
    # One vectorised copy per offset, not one per image.
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, oy:oy + 32, ox:ox + 32]
    return out


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, num_classes: int, translate: int, seed: int):
    """Shuffled, augmented, one-hot batches, reshuffled each epoch, as a Keras ``PyDataset`` (any backend).

    Partial last batches are dropped, as airbench does: a tiny batch gives BatchNorm noisy statistics.
    """
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(x))

        def __len__(self):
            return max(1, len(x) // batch_size)

        def __getitem__(self, i):
            idx = self.order[i * batch_size:(i + 1) * batch_size]
            xb = _augment(x[idx], self.rng, translate).astype(np.float32)
            return xb, np.eye(num_classes, dtype=np.float32)[y[idx]]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(x))

    return Batches()


def _triangle_schedule(peak: float, total_steps: int, warmup_fraction: float = 0.23,
                       start: float = 0.2, end: float = 0.07):
    """airbench's learning rate: linear from start*peak up to peak, then down to end*peak."""
    import keras

    warmup = max(1, int(total_steps * warmup_fraction))

    class Triangle(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            up = start + (1 - start) * step / warmup
            down = 1 + (end - 1) * (step - warmup) / max(1, total_steps - warmup)
            return peak * keras.ops.where(step < warmup, up, keras.ops.maximum(down, end))

        def get_config(self):
            return {"peak": peak, "total_steps": total_steps, "warmup_fraction": warmup_fraction}

    return Triangle()


def make_optimizer(config: PipelineConfig, total_steps: int):
    """Nesterov SGD on the triangle schedule, BatchNorm biases at ``BIAS_LR_SCALE`` x the rate.

    Keras optimizers have no parameter groups, so the scale is applied in ``update_step``; weight
    decay stays lr x wd for every variable, as airbench keeps it.
    """
    import keras

    scale = BIAS_LR_SCALE

    class BiasScaledSGD(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            # TensorFlow passes its own tf.Variable here (name "..._bn/beta:0"), JAX the Keras one.
            name = getattr(variable, "path", None) or variable.name
            if scale != 1.0 and name.split(":")[0].endswith("_bn/beta"):
                learning_rate = keras.ops.multiply(learning_rate, scale)
            return super().update_step(gradient, variable, learning_rate)

    return BiasScaledSGD(learning_rate=_triangle_schedule(config.learning_rate, total_steps),
                         momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)


def record_epoch(history: dict[str, list[float]], epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    """Both loops' epoch bookkeeping: ``history`` (the learning curves), the active MLflow run, a log line."""
    try:
        import mlflow
    except ImportError:  # the GPU machine's bare benchmark runs without MLflow
        mlflow = None
    for key, value in metrics.items():
        history.setdefault(key, []).append(value)
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_metrics(metrics, step=epoch + 1)
    log.info("epoch %d/%d %.1fs %s", epoch + 1, epochs, metrics["epoch_seconds"],
             " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def _progress_callback(epochs: int, history: dict[str, list[float]]):
    """A Keras callback that times each epoch and hands its logs to :func:`record_epoch`."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            self.start = self.last_report = time.monotonic()
            self.cpu_start = time.process_time()

        def on_train_batch_end(self, batch, logs=None):
            # A CPU epoch takes minutes: say how far it got, so a long run does not look hung.
            now = time.monotonic()
            if now - self.last_report >= PROGRESS_EVERY_S:
                self.last_report = now
                steps = self.params.get("steps") or 0
                done = f"{batch + 1}/{steps} batches ({100 * (batch + 1) / steps:.0f}%)" if steps else \
                    f"{batch + 1} batches"
                log.info("epoch %d/%d: %s, %.0f s", self.epoch + 1, epochs, done, now - self.start)

        def on_epoch_end(self, epoch, logs=None):
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            # CPU seconds next to wall seconds show how much of the machine the run got.
            metrics = {k: float(v) for k, v in (logs or {}).items()} | {
                "learning_rate": lr, "epoch_seconds": time.monotonic() - self.start,
                "epoch_cpu_seconds": time.process_time() - self.cpu_start}
            record_epoch(history, epoch, epochs, metrics)

    return Progress()


def compile_model(config: PipelineConfig, x_train: np.ndarray, num_classes: int, steps_per_epoch: int):
    """The model (whitening set from ``x_train``), its optimizer and its loss, as both loops use them."""
    import keras

    from training.model.network import build_model, set_whitening

    backend = keras.backend.backend()
    mixed = use_mixed_precision(config.mixed_precision, backend)
    if not mixed and backend == "tensorflow" and str(config.mixed_precision).lower() == "auto":
        log.warning("this CPU has no native bf16 (avx512_bf16/AMX): training in float32, several times slower "
                    "per epoch; the default recipe then takes well over its 20 minutes (epochs=6 fits them)")
    model = build_model(config.width_tuple, num_classes, config.seed, dtype="mixed_bfloat16" if mixed else "float32")
    set_whitening(model, x_train[:5000])
    optimizer = make_optimizer(config, steps_per_epoch * config.epochs)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=LABEL_SMOOTHING)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model, optimizer, loss


def fit_keras(config: PipelineConfig, splits: dict, num_classes: int):
    """Keras ``model.fit`` on the augmented batches; returns (float32 model for export, history)."""
    from training.model.network import float32_copy, with_flip_tta

    x_train, y_train = splits["train"]
    x_val, y_val = splits["val"]
    model, _, _ = compile_model(config, x_train, num_classes, len(x_train) // config.batch_size or 1)
    history: dict[str, list[float]] = {}
    model.fit(_batches(x_train, y_train, config.batch_size, num_classes, TRANSLATE, config.seed),
              validation_data=(x_val.astype(np.float32), np.eye(num_classes, dtype=np.float32)[y_val]),
              validation_batch_size=512, epochs=config.epochs, callbacks=[_progress_callback(config.epochs, history)],
              verbose=0)
    final = float32_copy(model, config.width_tuple, num_classes)
    return (with_flip_tta(final) if config.tta else final), history
