"""Train the CNN in one MLflow run: fit, evaluate, export, log everything.

``train(config, prepared_dir)`` is what the DAG's train task calls; it returns the
MLflow run id. The model and the loop use ``keras``/``keras.ops`` only, so the same
code runs under TensorFlow (default) and JAX.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from training.attempts import TaskAttempt, end_orphaned_runs
from training.config import PipelineConfig

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30  # most seconds between progress lines inside an epoch


def prefer_onednn() -> None:
    """Turn on TensorFlow's oneDNN kernels (``TF_ENABLE_ONEDNN_OPTS=1``) unless the user chose.

    TensorFlow enables them by default only on some Intel CPUs; on this project's AMD
    (AVX2) machine a training step ran 1.4x faster with them (101 -> 148 img/s, batch
    512). The variable is read when TensorFlow is imported, so this must run first; it
    is harmless under other backends.
    """
    import sys

    if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        return
    if "tensorflow" in sys.modules:
        log.warning("TensorFlow was imported before training started: set TF_ENABLE_ONEDNN_OPTS=1 "
                    "in the environment for ~1.4x faster CPU training")
        return
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"


def _augment(x: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
    """Random horizontal flip and random translation by up to ``pad`` pixels (reflect padding)."""
    n = len(x)
    flip = rng.random(n) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if pad <= 0:
        return x
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    dx, dy = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    out = np.empty_like(x)
    # One vectorised copy per offset, not one per image: (2*pad+1)^2 copies per batch.
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, oy:oy + 32, ox:ox + 32]
    return out


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, num_classes: int, translate: int, seed: int):
    """The training input pipeline: shuffled, augmented, one-hot batches, reshuffled per epoch.

    A Keras ``PyDataset`` over numpy arrays, so it feeds ``fit`` on any backend. Partial
    last batches are dropped (airbench does the same): a tiny last batch would give
    BatchNorm noisy statistics.
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
    """Nesterov SGD on the triangle schedule, BatchNorm biases at ``bias_lr_scale`` x the rate.

    airbench trains BatchNorm biases 64x faster than the weights (its ablation: 94% in
    18 instead of 22 epochs). Keras optimizers have no parameter groups, so the scale
    is applied in ``update_step``; decoupled weight decay stays lr x wd for every
    variable, as airbench keeps it (it divides the biases' decay by the same factor).
    """
    import keras

    scale = float(config.bias_lr_scale)

    class BiasScaledSGD(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            # TensorFlow passes its own tf.Variable here (name "..._bn/beta:0"), JAX the Keras one.
            name = getattr(variable, "path", None) or variable.name
            if scale != 1.0 and name.split(":")[0].endswith("_bn/beta"):
                learning_rate = keras.ops.multiply(learning_rate, scale)
            return super().update_step(gradient, variable, learning_rate)

    return BiasScaledSGD(learning_rate=_triangle_schedule(config.learning_rate, total_steps),
                         momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)


def record_epoch(history: dict[str, list[float]], epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    """One epoch's bookkeeping, shared by both training loops: append ``metrics`` to
    ``history`` (for the learning-curve plot), send them to the active MLflow run, if
    any, and log one progress line (visible in the Airflow task log)."""
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


def choose_loop(requested: str, backend: str) -> str:
    """The training loop to use: ``fit`` (Keras ``model.fit``) or ``jit`` (:mod:`training.jax_loop`).

    ``auto`` picks ``jit`` under the JAX backend (on a GPU ``fit`` spends 12-14 s per
    epoch where the jitted loop needs 0.2-0.35 s, see KNOWLEDGE.md) and ``fit`` otherwise.
    """
    if requested == "auto":
        return "jit" if backend == "jax" else "fit"
    if requested not in ("fit", "jit"):
        raise ValueError(f"unknown loop {requested!r}; use auto, fit or jit")
    if requested == "jit" and backend != "jax":
        raise ValueError(f"loop=jit needs the JAX backend (KERAS_BACKEND=jax, set before Keras is imported); "
                         f"the backend is {backend!r}: use loop=auto or loop=fit")
    return requested


def compile_model(config: PipelineConfig, x_train: np.ndarray, num_classes: int, steps_per_epoch: int):
    """The model (whitening set from ``x_train``), its optimizer and its loss, as both loops use them."""
    import keras

    from training.model import build_model, set_whitening

    model = build_model(config.width_tuple, num_classes, config.seed,
                        dtype="mixed_bfloat16" if config.mixed_precision else "float32")
    set_whitening(model, x_train[:5000])
    optimizer = make_optimizer(config, steps_per_epoch * config.epochs)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model, optimizer, loss


def build_and_fit(config: PipelineConfig, splits: dict, num_classes: int):
    """Build and fit the model on ``splits`` with the loop ``config.loop`` selects.

    Returns the float32 model for evaluation and export (with flip test-time
    augmentation inside when ``config.tta``) and the per-epoch history.
    """
    prefer_onednn()
    import keras

    from training.lookahead import lookahead_callback
    from training.model import float32_copy, with_flip_tta

    if choose_loop(config.loop, keras.backend.backend()) == "jit":
        from training.jax_loop import fit_jax

        return fit_jax(config, splits, num_classes)
    x_train, y_train = splits["train"]
    x_val, y_val = splits["val"]
    data = _batches(x_train, y_train, config.batch_size, num_classes, config.translate, config.seed)
    model, _, _ = compile_model(config, x_train, num_classes, len(data))
    history: dict[str, list[float]] = {}
    model.fit(
        data,
        validation_data=(x_val.astype(np.float32), np.eye(num_classes, dtype=np.float32)[y_val]),
        validation_batch_size=512,
        epochs=config.epochs,
        callbacks=[_progress_callback(config.epochs, history),
                   *([lookahead_callback(len(data) * config.epochs)] if config.lookahead else [])],
        verbose=0,
    )
    final = float32_copy(model, config.width_tuple, num_classes)
    return (with_flip_tta(final) if config.tta else final), history


def predict_probabilities(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Probabilities for uint8 images, calling the model directly (no ``predict`` overhead)."""
    import keras

    if keras.backend.backend() == "jax":
        from training.jax_loop import predict_jax

        return predict_jax(model, x, batch_size)
    out = [np.asarray(model(x[i:i + batch_size].astype(np.float32), training=False))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def keras_backend() -> str:
    import keras

    return keras.backend.backend()


# What loading the logged Keras model needs, per Keras backend (MLflow adds itself).
MODEL_DISTRIBUTIONS = {"tensorflow": ("keras", "tensorflow-cpu", "tensorflow", "numpy"),
                       "jax": ("keras", "jax", "jaxlib", "numpy")}


def model_requirements(backend: str) -> list[str]:
    """Exact pins of the distributions the logged model needs, as installed from ``uv.lock``.

    MLflow would otherwise guess them: it runs ``uv export`` over the whole project (the
    pipeline's Airflow and BentoML too) or, without uv, captures imports in a subprocess
    and falls back to an unpinned ``keras``.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in MODEL_DISTRIBUTIONS[backend]:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # tensorflow-cpu or tensorflow, whichever this platform has
            pass
    return pins


def _log_keras_model(model, **kwargs):
    """``mlflow.keras.log_model(model, name="model", **kwargs)``, working around MLflow 3.17.2.

    Its Keras flavor writes ``input_example.json`` before it creates the model folder
    and fails with FileNotFoundError; creating the folder first is all it needs.
    """
    import mlflow
    from mlflow.keras import save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model, example, path, *args, **kw):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kw)

    keras_save._save_example = save_example
    try:
        return mlflow.keras.log_model(model, name="model", **kwargs)
    finally:
        keras_save._save_example = original


def log_evaluation(x_test: np.ndarray, y_test: np.ndarray, probs: np.ndarray, class_names: list[str],
                   history: dict[str, list[float]], folder: Path) -> dict[str, float]:
    """Write and log the evaluation pictures and tables; return the test metrics.

    Artifacts: ``plots/learning_curves.png``, ``plots/confusion_matrix.png``,
    ``plots/test_samples.png``, ``evaluation/per_class_accuracy.json`` and
    ``evaluation/confusion_matrix.json``; metrics ``test_accuracy`` and
    ``test_accuracy_<class>`` for every class.
    """
    import mlflow

    from training import plots

    y_pred = probs.argmax(1)
    matrix = plots.confusion_matrix(y_test, y_pred, len(class_names))
    per_class = plots.per_class_accuracy(matrix, class_names)
    metrics = {"test_accuracy": float(np.mean(y_pred == y_test))}
    metrics |= {f"test_accuracy_{name}": acc for name, acc in per_class.items()}
    folder = Path(folder)
    plots.learning_curves(history, folder / "plots" / "learning_curves.png")
    plots.confusion_matrix_plot(matrix, class_names, folder / "plots" / "confusion_matrix.png")
    # A fixed, seeded choice of test images so grids of different runs are comparable.
    pick = np.sort(np.random.default_rng(0).choice(len(x_test), size=min(32, len(x_test)), replace=False))
    plots.sample_grid(x_test[pick], y_test[pick], y_pred[pick], class_names, folder / "plots" / "test_samples.png")
    (folder / "evaluation").mkdir(parents=True, exist_ok=True)
    (folder / "evaluation" / "per_class_accuracy.json").write_text(json.dumps(per_class, indent=2))
    (folder / "evaluation" / "confusion_matrix.json").write_text(
        json.dumps({"class_names": class_names, "rows_true_columns_predicted": matrix.tolist()}))
    mlflow.log_metrics(metrics)
    mlflow.log_artifacts(str(folder / "plots"), "plots")
    mlflow.log_artifacts(str(folder / "evaluation"), "evaluation")
    return metrics


def train(config: PipelineConfig, prepared_dir: Path, attempt: TaskAttempt | None = None) -> str:
    """Train on the prepared data in one MLflow run; return the run id.

    ``attempt`` (the Airflow task try, from the DAG) tags the run; runs that earlier,
    killed tries of the task left RUNNING are marked KILLED first (see ``training.attempts``).
    """
    prefer_onednn()
    import mlflow
    from mlflow.models import infer_signature

    from training.export import export_onnx
    from training.prepare import load_prepared
    from training.tracking import configure_mlflow, git_commit

    splits, manifest = load_prepared(Path(prepared_dir))
    class_names = manifest["class_names"]
    experiment_id = configure_mlflow(config)
    if attempt is not None:
        end_orphaned_runs(mlflow.MlflowClient(), experiment_id, attempt)
    with mlflow.start_run(log_system_metrics=True, tags=attempt.tags() if attempt else None) as run:
        mlflow.set_tags({"git_commit": git_commit(), "dataset_digest": manifest["digest"],
                         "source_url": manifest["source_url"]})
        mlflow.log_params(config.as_params() | {"num_classes": len(class_names),
                                                **{f"n_{k}": v for k, v in manifest["sizes"].items()}})
        x_train, y_train = splits["train"]
        mlflow.log_input(mlflow.data.from_numpy(x_train, targets=y_train, source=manifest["source_url"],
                                                name="cifar10-train", digest=manifest["digest"][:32]),
                         context="training")
        mlflow.log_dict(manifest, "data/manifest.json")

        start = time.monotonic()
        model, history = build_and_fit(config, splits, len(class_names))
        train_seconds = time.monotonic() - start
        mlflow.log_metric("train_seconds", train_seconds)

        x_test, y_test = splits["test"]
        probs = predict_probabilities(model, x_test)
        with tempfile.TemporaryDirectory() as tmp:
            metrics = log_evaluation(x_test, y_test, probs, class_names, history, Path(tmp))
        log.info("test accuracy %.4f after %.1f s of training", metrics["test_accuracy"], train_seconds)

        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            diff = export_onnx(model, onnx_path, x_test[:64])
            (Path(tmp) / "classes.json").write_text(json.dumps(class_names))
            mlflow.log_metric("onnx_max_abs_diff", diff)
            mlflow.log_artifacts(tmp, "onnx")

        example = x_test[:2].astype(np.float32)
        info = _log_keras_model(model, signature=infer_signature(example, probs[:2]), input_example=example,
                                pip_requirements=model_requirements(keras_backend()))
        mlflow.set_tag("logged_model_uri", info.model_uri)
        return run.info.run_id
