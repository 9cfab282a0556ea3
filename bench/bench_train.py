"""Benchmark the training recipes: test accuracy against wall-clock training minutes.

Full runs (what the README's table reports; run them on an otherwise idle machine):

    .venv/bin/python -m bench.bench_train --recipe default --recipe quick

Each recipe trains through ``training.model.train.train`` (the DAG's code path, with MLflow
in a private state folder) on ``/work/shared/data/cifar10-train-jpeg.zip`` with 10,000
images held out as the test split (``test_fraction=0.2``), and prints one line:
recipe, test accuracy, training minutes (``model.fit`` only), epochs, load average.

On the GPU machine (JAX, no TensorFlow or MLflow there): ``bench/gpu_train.sh`` stages
what travels and runs, with the Keras JAX backend and the jitted loop,

    KERAS_BACKEND=jax python3 -m bench.bench_train --backend jax --bare --recipe airbench94

``--backend`` sets ``KERAS_BACKEND`` before Keras is imported; ``--bare`` trains and
evaluates without MLflow and ONNX (same split, same ``build_and_fit``, test accuracy
of the returned model). The RESULT line then also gives the compile seconds and the
training seconds without them. The backend (and, under JAX, the device) is initialised
before the clock starts.

Probes (seconds to a minute; for shared machines): ``--probe-steps N`` times N
optimizer steps per recipe on real images after one warm-up epoch and prints images per
second, the loss trend and the projected minutes of a full run.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_ARCHIVE = Path("/work/shared/data/cifar10-train-jpeg.zip")


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def _warm_backend() -> str:
    """Import Keras (and start JAX's device) outside the timed training; return the device."""
    from training.model.fit import prefer_onednn

    prefer_onednn()  # before TensorFlow is imported (harmless under JAX)
    start = time.monotonic()
    import keras

    device = "cpu"
    if keras.backend.backend() == "jax":
        import jax

        device = str(jax.devices()[0])
    print(f"backend {keras.backend.backend()} on {device} ready in {time.monotonic() - start:.1f} s", flush=True)
    return device


def _result(config, accuracy: float, train_seconds: float, compile_seconds: float | None, run_id: str) -> None:
    import keras

    from training.model.fit import use_mixed_precision

    backend = keras.backend.backend()
    mixed = use_mixed_precision(config.mixed_precision, backend)
    compiled = "n/a" if compile_seconds is None else f"{compile_seconds:.1f}"
    without = "n/a" if compile_seconds is None else f"{train_seconds - compile_seconds:.1f}"
    print(f"RESULT recipe={config.recipe} test_accuracy={accuracy:.4f} "
          f"train_minutes={train_seconds / 60:.2f} epochs={config.epochs} "
          f"widths={config.widths} tta={config.tta} mixed_precision={mixed} "
          f"backend={backend} loop={'jit' if backend == 'jax' else 'fit'} train_seconds={train_seconds:.1f} "
          f"compile_seconds={compiled} train_seconds_without_compile={without} "
          f"run_id={run_id} ({_load()})", flush=True)


def full_run(config, prepared: Path) -> None:
    from mlflow import MlflowClient

    from training.model.train import train

    run_id = train(config, prepared)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    compiled = client.get_metric_history(run_id, "compile_seconds")
    _result(config, metrics["test_accuracy"], metrics["train_seconds"],
            sum(m.value for m in compiled) if compiled else None, run_id)


def bare_run(config, prepared: Path) -> None:
    """Train and test without MLflow or ONNX (the GPU machine has neither)."""
    import numpy as np

    from training.data.prepare import load_prepared
    from training.model.train import build_and_fit, fitting_splits, predict_probabilities

    splits, manifest = load_prepared(prepared)
    splits = fitting_splits(config, splits)
    start = time.monotonic()
    model, history = build_and_fit(config, splits, len(manifest["class_names"]))
    train_seconds = time.monotonic() - start
    x_test, y_test = splits["test"]
    accuracy = float(np.mean(predict_probabilities(model, x_test).argmax(1) == y_test))
    compiled = history.get("compile_seconds")
    _result(config, accuracy, train_seconds, sum(compiled) if compiled else None, "none(bare)")


def probe(config, prepared: Path, steps: int) -> None:
    import keras
    import mlflow
    import numpy as np

    from training.data.prepare import load_prepared
    from training.model.fit import use_mixed_precision
    from training.registry.tracking import configure_mlflow
    from training.model.train import build_and_fit, fitting_splits

    splits, manifest = load_prepared(prepared)
    splits = fitting_splits(config, splits)
    n_train = len(splits["train"][0])
    x, y = splits["train"]
    xv, yv = splits["val"]
    # The validation split is stored in archive (class) order: sample it at random.
    val = np.random.default_rng(0).choice(len(xv), size=min(1000, len(xv)), replace=False)
    sub = {"train": (x[:steps * config.batch_size], y[:steps * config.batch_size]),
           "val": (xv[val], yv[val]), "test": splits["test"]}
    configure_mlflow(config)
    # Epoch 1 includes tracing; epochs 2 and 3 are timed. The schedule is that of a
    # 3-epoch run, so losses show the trend, not the full run's values.
    with mlflow.start_run(run_name=f"probe-{config.recipe}"):
        _, history = build_and_fit(config.replace(epochs=3), sub, len(manifest["class_names"]))
    seconds = history["epoch_seconds"][1:]
    rate = steps * config.batch_size / (sum(seconds) / len(seconds))
    # On a shared machine wall time mostly measures the neighbours; CPU time per image,
    # spread over all cores, estimates the idle-machine rate (perfect scaling assumed:
    # an upper bound).
    cpu = history["epoch_cpu_seconds"][1:]
    idle_rate = steps * config.batch_size / (sum(cpu) / len(cpu)) * (os.cpu_count() or 1)
    images = n_train // config.batch_size * config.batch_size * config.epochs
    print(f"PROBE recipe={config.recipe} widths={config.widths} batch={config.batch_size} "
          f"mixed_precision={use_mixed_precision(config.mixed_precision, keras.backend.backend())} steps/epoch={steps} img_per_s={rate:.0f} "
          f"img_per_s_from_cpu_time={idle_rate:.0f} "
          f"loss_per_epoch={[round(v, 3) for v in history['loss']]} "
          f"val_acc_per_epoch={[round(v, 3) for v in history['val_accuracy']]} "
          f"projected_full_run_minutes={images / rate / 60:.1f} (idle machine: {images / idle_rate / 60:.1f}) "
          f"(epochs={config.epochs}, {n_train} train images; "
          f"validation not included) ({_load()})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--recipe", action="append", help="recipe name (repeatable); default: default, quick")
    parser.add_argument("--state", type=Path, default=Path("/tmp/bench-train-state"),
                        help="private state folder (prepared data cache, MLflow store)")
    parser.add_argument("--probe-steps", type=int, default=0, help="probe N steps per epoch instead of full runs")
    parser.add_argument("--backend", choices=["tensorflow", "jax"],
                        help="Keras backend (sets KERAS_BACKEND before Keras is imported)")
    parser.add_argument("--bare", action="store_true",
                        help="train and test without MLflow/ONNX (e.g. on the GPU machine)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="extra config override, e.g. --set epochs=12 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend

    from training.config import load_config
    from training.data.prepare import prepare

    extra = dict(item.split("=", 1) for item in args.set)
    for recipe in args.recipe or ["default", "quick"]:
        config = load_config({"recipe": recipe, "state_dir": str(args.state), "test_fraction": 0.2,
                              "data_url": args.archive.resolve().as_uri(), "experiment_name": "bench",
                              **extra})
        start = time.monotonic()
        prepared = prepare(args.archive, config)
        print(f"prepared {prepared} in {time.monotonic() - start:.0f} s", flush=True)
        _warm_backend()
        if args.probe_steps:
            probe(config, prepared, args.probe_steps)
        elif args.bare:
            bare_run(config, prepared)
        else:
            full_run(config, prepared)


if __name__ == "__main__":
    main()
