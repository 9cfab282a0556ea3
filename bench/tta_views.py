"""Test accuracy of a trained run under more test-time views than the shipped flip TTA.

    .venv/bin/python -m bench.tta_views --state /tmp/bench-train-state --run-id RUN_ID

Loads the run's logged Keras model (the flip-TTA wrapper), takes the network inside it
and scores the prepared test split (the one the run was trained beside) with:
1 view (the image), 2 views (and its mirror: what the service runs), and airbench's
6-view translate TTA (half the 2-view mean, plus half the mean of the 2-view means of
the image shifted by one pixel up-left and down-right, reflect padding). Serving cost
grows with the views: inference is that many forward passes per image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, required=True, help="bench_train's state folder")
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import mlflow
    import numpy as np

    import training.model.network  # noqa: F401  (registers the custom objects)
    from training.data.prepare import load_prepared
    from training.model.fit import prefer_onednn

    prefer_onednn()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{args.state.resolve() / 'mlflow' / 'mlflow.db'}")
    mlflow.set_tracking_uri(client.tracking_uri)
    run = client.get_run(args.run_id)
    wrapper = mlflow.keras.load_model(run.data.tags["logged_model_uri"])
    net = next(layer for layer in wrapper.layers if layer.name == "cifar10_cnn")
    prepared = sorted((args.state / "data" / "prepared").glob("*/manifest.json"))
    splits = None
    for manifest in prepared:  # the prepared folder whose digest the run logged
        candidate, meta = load_prepared(manifest.parent)
        if meta["digest"] == run.data.tags["dataset_digest"]:
            splits = candidate
    if splits is None:
        raise SystemExit(f"no prepared data with digest {run.data.tags['dataset_digest']} under {args.state}")
    x_test, y_test = splits["test"]

    def probs(images):
        return np.concatenate([np.asarray(net(images[i:i + 500].astype(np.float32), training=False))
                               for i in range(0, len(images), 500)])

    start = time.monotonic()
    plain = probs(x_test)
    seconds = time.monotonic() - start
    two = (plain + probs(x_test[:, :, ::-1])) / 2
    padded = np.pad(x_test, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifted = [padded[:, 0:32, 0:32], padded[:, 2:34, 2:34]]
    six = 0.5 * two + 0.5 * np.mean([(probs(s) + probs(s[:, :, ::-1])) / 2 for s in shifted], axis=0)
    for views, p in ((1, plain), (2, two), (6, six)):
        print(f"TTA views={views} test_accuracy={np.mean(p.argmax(1) == y_test):.4f} "
              f"inference_cost={views}x ({seconds * views:.1f} s for {len(x_test)} images here)", flush=True)


if __name__ == "__main__":
    main()
