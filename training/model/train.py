"""The DAG's train task: fit, evaluate, export and log everything in one MLflow run."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from training.config import PipelineConfig
from training.model.fit import fit_keras, prefer_onednn
from training.registry.attempts import TaskAttempt, end_orphaned_runs

log = logging.getLogger(__name__)

# Logged next to model.onnx; the import into the BentoML store copies it into the model's metadata.
DRIFT_REFERENCE = "drift_reference.json"
# Validation images kept out of the fit: enough for the learning curve and the drift reference's
# confidences; the rest of validation is worth more as training data (docs/training.md).
VALIDATION_HOLDOUT = 1000


def fitting_splits(config: PipelineConfig, splits: dict) -> dict:
    """The splits the model is fitted on: validation joins training except a seeded, stratified
    slice of :data:`VALIDATION_HOLDOUT` images, the new validation split; test is never touched.

    Without validation images to spare, the splits come back as they are.
    """
    x_val, y_val = splits["val"]
    if len(y_val) <= VALIDATION_HOLDOUT:
        return splits
    classes = np.unique(y_val)
    per_class = max(1, VALIDATION_HOLDOUT // len(classes))
    order = np.random.default_rng(config.seed).permutation(len(y_val))
    keep = np.sort(np.concatenate([order[y_val[order] == c][:per_class] for c in classes]))
    moved = np.setdiff1d(np.arange(len(y_val)), keep)
    x_train, y_train = splits["train"]
    return splits | {"train": (np.concatenate([x_train, x_val[moved]]), np.concatenate([y_train, y_val[moved]])),
                     "val": (x_val[keep], y_val[keep])}


def build_and_fit(config: PipelineConfig, splits: dict, num_classes: int):
    """The float32 model for export (flip TTA inside with ``config.tta``) and its per-epoch history."""
    prefer_onednn()
    import keras

    if keras.backend.backend() == "jax":  # fit would feed every batch from the host: slow on a GPU
        from training.model.jax_loop import fit_jax

        return fit_jax(config, splits, num_classes)
    return fit_keras(config, splits, num_classes)


def predict_probabilities(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Probabilities for uint8 images, calling the model directly (no ``predict`` overhead)."""
    import keras

    if keras.backend.backend() == "jax":
        from training.model.jax_loop import predict_jax

        return predict_jax(model, x, batch_size)
    out = [np.asarray(model(x[i:i + batch_size].astype(np.float32), training=False))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def drift_reference(model, splits: dict) -> dict:
    """What the service's drift score compares with: the training images' statistics and the model's
    confidences on held-out images (validation, else test)."""
    from serving.drift import reference_statistics

    held = splits["val"][0] if len(splits["val"][0]) else splits["test"][0]
    confidences = predict_probabilities(model, held).max(axis=1) if len(held) else None
    return reference_statistics(splits["train"][0], confidences)


def keras_backend() -> str:
    import keras

    return keras.backend.backend()


# What loading the logged Keras model needs, per Keras backend (MLflow adds itself).
MODEL_DISTRIBUTIONS = {"tensorflow": ("keras", "tensorflow-cpu", "tensorflow", "numpy"),
                       "jax": ("keras", "jax", "jaxlib", "numpy")}


def model_requirements(backend: str) -> list[str]:
    """Exact pins of what the logged model needs, as installed from ``uv.lock``: MLflow's own guess
    pins the whole project (Airflow, BentoML) or, without uv, an unpinned ``keras``."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in MODEL_DISTRIBUTIONS[backend]:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # tensorflow-cpu or tensorflow, whichever this platform has
            pass
    return pins


# mlflow.keras writes input_example.json before it creates the model folder (FileNotFoundError): the
# workaround applies up to the pinned release only, so an upgrade shows whether it is still needed.
MLFLOW_EXAMPLE_BUG_UNTIL = "3.17.2"


def _log_keras_model(model, **kwargs):
    """``mlflow.keras.log_model(model, name="model", **kwargs)``, with the folder made first where needed."""
    import mlflow
    from packaging.version import Version

    if Version(mlflow.__version__) > Version(MLFLOW_EXAMPLE_BUG_UNTIL):
        return mlflow.keras.log_model(model, name="model", **kwargs)
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
    """Log ``plots/`` (learning curves, confusion matrix, samples) and ``evaluation/`` (per-class accuracy,
    confusion matrix); return and log ``test_accuracy`` and ``test_accuracy_<class>``."""
    import mlflow

    from training.model import plots

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


def _log_inputs(config: PipelineConfig, splits: dict, manifest: dict) -> dict:
    """Log the config, the data and its manifest; return the splits the model is fitted on."""
    import mlflow

    from training.registry.tracking import git_commit

    mlflow.set_tags({"git_commit": git_commit(), "dataset_digest": manifest["digest"],
                     "source_url": manifest["source_url"]})
    mlflow.log_params(config.as_params() | {"num_classes": len(manifest["class_names"]),
                                            **{f"n_{k}": v for k, v in manifest["sizes"].items()}})
    splits = fitting_splits(config, splits)
    mlflow.log_params({"n_fit_train": len(splits["train"][1]), "n_fit_val": len(splits["val"][1])})
    x_train, y_train = splits["train"]
    mlflow.log_input(mlflow.data.from_numpy(x_train, targets=y_train, source=manifest["source_url"],
                                            name="cifar10-train", digest=manifest["digest"][:32]), context="training")
    mlflow.log_dict(manifest, "data/manifest.json")
    return splits


def _log_onnx(model, splits: dict, class_names: list[str]) -> None:
    """Export ``onnx/model.onnx`` (parity checked), its classes and the drift reference."""
    import mlflow

    from training.model.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        diff = export_onnx(model, Path(tmp) / "model.onnx", splits["test"][0][:64])
        (Path(tmp) / "classes.json").write_text(json.dumps(class_names))
        (Path(tmp) / DRIFT_REFERENCE).write_text(json.dumps(drift_reference(model, splits)))
        mlflow.log_metric("onnx_max_abs_diff", diff)
        mlflow.log_artifacts(tmp, "onnx")


def train(config: PipelineConfig, prepared_dir: Path, attempt: TaskAttempt | None = None) -> str:
    """Train on the prepared data in one MLflow run; return its id.

    ``attempt`` (the Airflow task try) tags the run, after the runs dead tries left RUNNING are marked KILLED.
    """
    prefer_onednn()
    import mlflow
    from mlflow.models import infer_signature

    from training.data.prepare import load_prepared
    from training.registry.tracking import configure_mlflow

    splits, manifest = load_prepared(Path(prepared_dir))
    class_names = manifest["class_names"]
    experiment_id = configure_mlflow(config)
    if attempt is not None:
        end_orphaned_runs(mlflow.MlflowClient(), experiment_id, attempt)
    with mlflow.start_run(log_system_metrics=True, tags=attempt.tags() if attempt else None) as run:
        splits = _log_inputs(config, splits, manifest)
        start = time.monotonic()
        model, history = build_and_fit(config, splits, len(class_names))
        train_seconds = time.monotonic() - start
        mlflow.log_metric("train_seconds", train_seconds)
        x_test, y_test = splits["test"]
        probs = predict_probabilities(model, x_test)
        with tempfile.TemporaryDirectory() as tmp:
            metrics = log_evaluation(x_test, y_test, probs, class_names, history, Path(tmp))
        log.info("test accuracy %.4f after %.1f s of training", metrics["test_accuracy"], train_seconds)
        _log_onnx(model, splits, class_names)
        example = x_test[:2].astype(np.float32)
        info = _log_keras_model(model, signature=infer_signature(example, probs[:2]), input_example=example,
                                pip_requirements=model_requirements(keras_backend()))
        mlflow.set_tag("logged_model_uri", info.model_uri)
        return run.info.run_id
