"""Seconds per epoch of one training loop on synthetic images (no archive, no MLflow).

    KERAS_BACKEND=jax .venv/bin/python -m bench.compare_loops RECIPE N_TRAIN EPOCHS [WIDTHS]

The backend picks the loop (jit under JAX, fit under TensorFlow), e.g. ``tiny 1920 3`` under
each, or ``default 4096 3``. Prints one MEASURE line: per-epoch seconds, compile seconds,
images per second and CPU seconds per epoch over epochs 2+, and the load average.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(recipe: str, n: int, epochs: int, widths: str | None = None) -> None:
    from training.model.train import prefer_onednn

    prefer_onednn()  # before TensorFlow is imported
    import keras
    import numpy as np
    from synthetic import CLASSES, make_images

    from training.config import load_config
    from training.model.train import build_and_fit

    overrides = {"recipe": recipe, "epochs": epochs} | ({"widths": widths} if widths else {})
    config = load_config(overrides, environ={})
    x, y = make_images(n // 10 + 26, CLASSES, seed=0)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    splits = {"train": (x[:n], y[:n]), "val": (x[n:n + 256], y[n:n + 256])}
    start = time.monotonic()
    _, history = build_and_fit(config, splits, 10)
    total = time.monotonic() - start
    images = n // config.batch_size * config.batch_size
    wall, cpu = history["epoch_seconds"][1:], history["epoch_cpu_seconds"][1:]
    loop = "jit" if keras.backend.backend() == "jax" else "fit"
    print(f"MEASURE backend={keras.backend.backend()} loop={loop} recipe={recipe} widths={config.widths} "
          f"batch={config.batch_size} train_images={images}/epoch epochs={epochs} "
          f"epoch_seconds={[round(v, 2) for v in history['epoch_seconds']]} "
          f"compile_seconds={round(sum(history.get('compile_seconds', [0])), 1)} "
          f"img_per_s(epochs 2+, incl. 256-image val)={images / (sum(wall) / len(wall)):.0f} "
          f"cpu_s_per_epoch={sum(cpu) / len(cpu):.2f} build_and_fit_total_s={total:.1f} "
          f"loss={[round(v, 3) for v in history['loss']]} load={os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
