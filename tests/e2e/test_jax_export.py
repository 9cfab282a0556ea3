"""A model trained under JAX still exports to ONNX: the export runs in a TensorFlow child process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from tests.helpers import ROOT, require


def test_onnx_export_of_a_jax_model_matches_it(tmp_path):
    """Under JAX the ONNX export runs in a TensorFlow child process; parity is against the JAX model."""
    require(importlib.util.find_spec("jax") is not None,
            "jax is not installed: it is a dev dependency (uv sync --frozen installs it)")
    code = ("import sys, numpy as np; from training.model.network import build_model, with_flip_tta; "
            "from training.model.export import export_onnx; "
            "x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8); "
            "print(export_onnx(with_flip_tta(build_model((8, 16, 16), 10)), sys.argv[1], x))")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert float(done.stdout.split()[-1]) <= 1e-4
    assert (tmp_path / "m.onnx").stat().st_size > 10_000
