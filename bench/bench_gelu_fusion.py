"""ONNX Runtime speed of the served net before and after ``training.model.export.fuse_gelu``.

Exports the default recipe's net (untrained 64/128/128 with flip TTA; weights do not
change the speed) with Keras' tf2onnx export, fuses a copy, checks both give the same
probabilities, then times them in alternation on batches of 64: one single-threaded call,
and two calls side by side (as a worker serves).

    .venv/bin/python -m bench.bench_gelu_fusion [--rounds 4] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    import onnx

    from bench.bench_serving import images_per_second
    from serving.model import onnx_session
    from training.model.export import fuse_gelu_file
    from training.model.network import build_model, with_flip_tta

    batch = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32)
    model = with_flip_tta(build_model((64, 128, 128), 10))
    model(batch[:1])
    with tempfile.TemporaryDirectory() as tmp:
        plain, fused = Path(tmp) / "plain.onnx", Path(tmp) / "fused.onnx"
        model.export(str(plain), format="onnx", verbose=False)
        shutil.copy(plain, fused)
        print(f"GELUs fused: {fuse_gelu_file(fused)}; nodes {len(onnx.load(str(plain)).graph.node)} -> "
              f"{len(onnx.load(str(fused)).graph.node)}")
        sessions = {"plain": onnx_session(plain, threads=1), "fused": onnx_session(fused, threads=1)}
        outs = {k: s.run(None, {s.get_inputs()[0].name: batch})[0] for k, s in sessions.items()}
        print(f"max |fused - plain| = {np.max(np.abs(outs['fused'] - outs['plain'])):.2e}")
        for calls in (1, 2):
            rates = {k: [] for k in sessions}
            for _ in range(args.rounds):
                for key, session in sessions.items():
                    rates[key].append(images_per_second(session, batch, calls, args.seconds))
            for key, values in rates.items():
                print(f"{calls} call(s) x 1 thread, {key}: " + " ".join(f"{v:.0f}" for v in values)
                      + f" img/s (median {np.median(values):.0f})")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
