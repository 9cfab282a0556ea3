"""The Keras loop (training/model/fit.py): a long epoch reports its progress, not only its end."""

from __future__ import annotations

import logging

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
