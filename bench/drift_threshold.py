"""Drift scores of in-distribution and shifted windows: the measurements ``drift_threshold`` is chosen from.

The reference is computed as ``train`` computes it, from a seeded 80 % of the images; windows of
``--window`` images are then drawn from the other 20 %, as they are (in distribution), of one class
only, and shifted: blurred, inverted, noisy, darker, grey. With ``--model`` (an ONNX file that
training exported) the confidence group is included, its reference from the held-out images.

    .venv/bin/python -m bench.drift_threshold ../shared/data/cifar10-train-jpeg.zip [--model model.onnx]

Prints a Markdown table: each window kind's score (min, median, 99th percentile, max over windows),
the groups that moved most and, with ``--model``, the share of unsure answers (confidence <= 0.5).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from serving.drift import DriftWindow, reference_statistics
from tests.helpers import image_shifts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", help="an image-folder or binary CIFAR-10 archive")
    parser.add_argument("--model", help="ONNX model: include the confidence group")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=100, help="windows per kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from training.data.formats import read_dataset

    raw = read_dataset(args.archive, max_members=200_000, max_bytes=2 * 1024**3, max_bad_fraction=0.01, workers=2)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(raw.images))
    cut = int(0.8 * len(order))
    ref_x, held_x, held_y = raw.images[order[:cut]], raw.images[order[cut:]], raw.labels[order[cut:]]
    confidence = None
    if args.model:
        from serving.model import onnx_session

        session = onnx_session(args.model)
        name = session.get_inputs()[0].name
        confidence = lambda x: np.concatenate([session.run(None, {name: x[i:i + 256].astype(np.float32)})[0]  # noqa: E731
                                               for i in range(0, len(x), 256)]).max(axis=1)
    reference = reference_statistics(ref_x, confidence(held_x) if confidence else None)
    print(f"reference: {len(ref_x)} images; held out: {len(held_x)}; window {args.window}; "
          f"{args.windows} windows per kind; groups {list(reference['groups'])}\n")
    print("| window | min | median | p99 | max | groups that moved most | answers with confidence <= 0.5 |")
    print("|---|---|---|---|---|---|---|")
    kinds = image_shifts(rng)
    kinds["one class only (cat)"] = None
    cost = []
    for kind, shift in kinds.items():
        scores, moved, unsure = [], {}, []
        for _ in range(args.windows):
            if shift is None:
                pool = np.flatnonzero(held_y == raw.class_names.index("cat"))
                x = held_x[rng.choice(pool, args.window, replace=False)]
            else:
                x = shift(held_x[rng.choice(len(held_x), args.window, replace=False)])
            window = DriftWindow(reference, args.window)
            conf = confidence(x) if confidence else np.zeros(len(x))
            unsure.append(np.mean(conf <= 0.5) if confidence else np.nan)
            for start in range(0, len(x), 64):
                t = time.perf_counter()
                score = window.add(x[start:start + 64], conf[start:start + 64])
                cost.append((time.perf_counter() - t) / len(x[start:start + 64]))
            scores.append(score)
            for g, d in window.distances().items():
                moved[g] = moved.get(g, 0) + d / args.windows
        top = ", ".join(f"{g} {d:.2f}" for g, d in sorted(moved.items(), key=lambda kv: -kv[1])[:3])
        print(f"| {kind} | {min(scores):.3f} | {np.median(scores):.3f} | {np.percentile(scores, 99):.3f} | {max(scores):.3f} | {top} | {np.mean(unsure):.3f} |")
    print(f"\nDriftWindow.add: {np.median(cost) * 1e6:.1f} us per image (median, batches of 64)")


if __name__ == "__main__":
    main()
