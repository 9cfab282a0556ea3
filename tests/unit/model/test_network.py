"""The model: raw pixels in, float32 probabilities out; whitening; TTA; config presets."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import make_images

from training.config import load_config
from training.model.network import build_model, float32_copy, set_whitening, whitening_kernel, with_flip_tta

WIDTHS = (8, 16, 16)


def test_whitening_kernel_whitens_patches():
    x, _ = make_images(20)
    kernel = whitening_kernel(x, eps=0.0)
    assert kernel.shape == (2, 2, 3, 24)
    # Applying the first 12 filters to the standardized 2x2 patches gives unit covariance.
    from training.model.network import CIFAR_MEAN, CIFAR_STD

    z = (x.astype(np.float64) / 255 - CIFAR_MEAN) / CIFAR_STD
    patches = np.stack([z[:, dy:dy + 31, dx:dx + 31] for dy in range(2) for dx in range(2)], axis=3)
    out = patches.reshape(-1, 12) @ kernel[..., :12].reshape(12, 12)
    assert np.allclose(np.cov(out, rowvar=False), np.eye(12), atol=1e-3)
    assert np.array_equal(kernel[..., 12:], -kernel[..., :12])


def test_whitening_conv_is_frozen_and_model_outputs_probabilities():
    model = build_model(WIDTHS, 10)
    x, _ = make_images(2)
    set_whitening(model, x)
    assert not any(v is model.get_layer("whiten").kernel for v in model.trainable_weights)
    probs = np.asarray(model(x.astype(np.float32), training=False))
    assert probs.shape == (20, 10) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_mixed_precision_weights_copy_into_float32_model():
    mixed = build_model(WIDTHS, 10, dtype="mixed_bfloat16")
    x, _ = make_images(1)
    set_whitening(mixed, x)
    copy = float32_copy(mixed, WIDTHS, 10)
    assert all(w.dtype == "float32" for w in copy.weights)
    assert copy.get_layer("block0a_conv").compute_dtype == "float32"
    got = np.asarray(copy(x.astype(np.float32)))
    ref = np.asarray(mixed(x.astype(np.float32)))
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 0.05  # bf16 vs f32 arithmetic


def test_flip_tta_averages_image_and_mirror():
    model = build_model(WIDTHS, 10)
    x = make_images(1)[0].astype(np.float32)
    tta = np.asarray(with_flip_tta(model)(x))
    expected = (np.asarray(model(x)) + np.asarray(model(x[:, :, ::-1]))) / 2
    assert np.allclose(tta, expected, atol=1e-6)


def test_recipes_sit_between_defaults_and_overrides():
    assert load_config(environ={}).widths == "64,128,128"
    quick = load_config({"recipe": "quick"}, environ={})
    assert (quick.widths, quick.epochs, quick.batch_size) == ("32,64,64", 6, 256)  # the preset over the defaults
    assert load_config({"recipe": "quick", "epochs": 2}, environ={}).epochs == 2
    assert load_config(environ={"CIFAR10_RECIPE": "tiny", "CIFAR10_EPOCHS": "7"}).epochs == 7
    with pytest.raises(ValueError, match="unknown recipe 'fast'; valid recipes: default, quick, airbench94, tiny"):
        load_config({"recipe": "fast"}, environ={})


def test_group_convs_start_as_identities_plus_noise():
    """airbench's dirac init: the first min(in, out) filters copy their input channel."""
    model = build_model(WIDTHS, 10)
    kernel = np.asarray(model.get_layer("block1b_conv").kernel)  # 16 -> 16 channels
    n = kernel.shape[2]
    centre = kernel[1, 1, :, :n]
    assert np.array_equal(centre, np.eye(n, dtype=np.float32))
    off_centre = kernel.copy()
    off_centre[1, 1] = 0
    assert not off_centre[..., :n].any()
    # The filters beyond the identity block keep their random init.
    wider = np.asarray(model.get_layer("block1a_conv").kernel)  # 8 -> 16 channels
    assert np.abs(wider[..., 8:]).min() > 0 and np.abs(wider[..., 8:]).std() > 0
