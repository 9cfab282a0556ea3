"""The int8 candidate of an already trained model, made and scored as training makes and scores it.

Quantizes a logged float ONNX file (MLflow artifact ``onnx/model.onnx``) with this checkout's
``training.model.quantize``, calibrated on the seeded sample of the prepared training split, and compares
it with float on the prepared test split: what a change to the quantization recipe does to a real model
without training it again (``bench.bench_train`` logs both files).

    .venv/bin/python -m bench.requantize MODEL_ONNX PREPARED_NPZ [--seed 42] [--out model.int8.onnx]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from training.model.quantize import calibration_sample, compare, quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the float ONNX file (an MLflow run's onnx/model.onnx)")
    parser.add_argument("prepared", type=Path, help="the prepared splits it was trained on (data.npz)")
    parser.add_argument("--seed", type=int, default=42, help="the run's seed (training's default: 42)")
    parser.add_argument("--out", type=Path, help="where to keep the int8 file (default: a temporary folder)")
    args = parser.parse_args()
    splits = np.load(args.prepared)
    with tempfile.TemporaryDirectory() as tmp:
        int8 = args.out or Path(tmp) / "model.int8.onnx"
        quantize(args.model, calibration_sample(splits["x_train"], args.seed), int8)
        classes = [str(i) for i in range(int(splits["y_test"].max()) + 1)]
        result = compare(args.model, int8, splits["x_test"], splits["y_test"], classes)
    print(f"float {result.float_accuracy:.4f}, int8 {result.int8_accuracy:.4f}, agreement {result.agreement:.4f}; "
          f"float {result.float_img_s:,.0f} img/s, int8 {result.int8_img_s:,.0f} img/s on one thread; "
          f"int8 keeps float's answers (the rule's accuracy conditions): {result.accurate}")


if __name__ == "__main__":
    main()
