"""How often two trained models give the same class: where the shadow's default ``shadow_min_agreement`` comes from.

Runs two MLflow runs' exported ONNX models (``onnx/model.onnx``) over a prepared split's test images and prints
their accuracies, mean confidences, their agreement, and the agreement of random ``--window``-request windows
(the shadow judges one such window) at the 1st and 5th percentiles.

    .venv/bin/python -m bench.shadow_agreement PREPARED_DIR RUN_A_ARTIFACTS RUN_B_ARTIFACTS [--window 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def probabilities(artifacts: Path, x: np.ndarray) -> np.ndarray:
    from serving.model import onnx_session

    session = onnx_session(artifacts / "onnx" / "model.onnx")
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", type=Path, help="a prepared split's folder (data.npz)")
    parser.add_argument("a", type=Path, help="a training run's artifact folder (holding onnx/model.onnx)")
    parser.add_argument("b", type=Path)
    parser.add_argument("--window", type=int, default=200)
    args = parser.parse_args()
    data = np.load(args.prepared / "data.npz")
    x, y = data["x_test"].astype(np.float32), data["y_test"]
    pa, pb = probabilities(args.a, x), probabilities(args.b, x)
    ca, cb = pa.argmax(1), pb.argmax(1)
    rng = np.random.default_rng(0)
    windows = [(ca[i] == cb[i]).mean() for i in (rng.integers(0, len(x), args.window) for _ in range(2000))]
    print(f"{len(x)} test images: accuracy {(ca == y).mean():.4f} and {(cb == y).mean():.4f}, mean confidence "
          f"{pa.max(1).mean():.3f} and {pb.max(1).mean():.3f}; agreement {(ca == cb).mean():.4f}, in "
          f"{args.window}-request windows p1 {np.percentile(windows, 1):.3f}, p5 {np.percentile(windows, 5):.3f}")


if __name__ == "__main__":
    main()
