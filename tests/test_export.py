"""ONNX export: parity with Keras is measured, and a broken export fails loudly."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import make_images

from training.export import ParityError, check_parity, export_onnx, onnx_session
from training.model import build_model, set_whitening, with_flip_tta


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_model((8, 16, 16), 10)
    x, _ = make_images(2)
    set_whitening(model, x)
    model = with_flip_tta(model)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return model, path, export_onnx(model, path, x), x.astype(np.float32)


def test_export_matches_keras(exported):
    model, path, diff, x = exported
    assert path.is_file() and diff <= 1e-4
    session = onnx_session(path, threads=1)
    assert session.get_inputs()[0].shape[1:] == [32, 32, 3]
    assert check_parity(session, np.asarray(model(x)), x) == pytest.approx(diff, abs=1e-7)


def test_broken_parity_raises(exported):
    model, path, _, x = exported
    wrong = np.asarray(model(x)) + 1e-3  # what a lossy conversion would look like
    with pytest.raises(ParityError, match="differs from Keras by 0.001"):
        check_parity(onnx_session(path), wrong, x)
