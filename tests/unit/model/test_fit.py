"""The Keras loop (training/model/fit.py): progress lines, mixed precision by CPU."""

from __future__ import annotations

import logging

import pytest
from tests.helpers import CLASSES, make_images
from training.config import load_config
from training.model import fit


def test_a_long_epoch_logs_how_far_it_got(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(fit, "PROGRESS_EVERY_S", 0)  # every batch counts as "long" here
    x, y = make_images(20, CLASSES)
    config = load_config({"recipe": "tiny", "epochs": 1, "state_dir": str(tmp_path)}, environ={})
    with caplog.at_level(logging.INFO, logger="training.model.fit"):
        fit.fit_keras(config, {"train": (x, y), "val": (x[:20], y[:20])}, len(CLASSES))
    progress = [r.getMessage() for r in caplog.records if "batches (" in r.getMessage()]
    steps = len(x) // config.batch_size
    assert progress[0].startswith(f"epoch 1/1: 1/{steps} batches (")
    assert progress[-1].startswith(f"epoch 1/1: {steps}/{steps} batches (100%)")
    assert any(r.getMessage().startswith("epoch 1/1 ") and "val_accuracy=" in r.getMessage() for r in caplog.records)


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_mixed_precision_auto_follows_the_cpu_and_backend(tmp_path):
    (tmp_path / "bf16").mkdir()
    bf16 = _cpuinfo(tmp_path / "bf16", "avx512f avx512_bf16")
    avx2 = _cpuinfo(tmp_path, "")
    assert fit.use_mixed_precision("auto", "tensorflow", bf16)
    assert not fit.use_mixed_precision("auto", "tensorflow", avx2)
    # On a GPU (JAX) the jitted loop's compile outweighs faster bf16 steps.
    assert not fit.use_mixed_precision("auto", "jax", bf16)
    assert not fit.use_mixed_precision("auto", "tensorflow", tmp_path / "missing")
    # An explicit choice wins everywhere, spelled as env vars and DAG params spell it.
    assert fit.use_mixed_precision("True", "tensorflow", avx2) and fit.use_mixed_precision("on", "jax", avx2)
    assert not fit.use_mixed_precision("false", "tensorflow", bf16)
    with pytest.raises(ValueError, match="auto, true or false"):
        fit.use_mixed_precision("bf16", "tensorflow", bf16)

