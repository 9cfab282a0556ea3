"""The CIFAR-10 CNN, in Keras 3 with ``keras.ops`` only (any backend).

Preprocessing is part of the model: it takes raw pixels (float32 in 0..255, shape
(N, 32, 32, 3)) and returns class probabilities, so the exported model (Keras or
ONNX) needs no separate preprocessing code that could drift from training.
"""

from __future__ import annotations

import keras

# Per-channel mean and std of the CIFAR-10 training set, in 0..1 pixel units.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _conv_bn(x, filters: int, weight_decay: float, name: str):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                            kernel_regularizer=keras.regularizers.L2(weight_decay) if weight_decay else None,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    # ReLU, not GELU: tf2onnx turns GELU into Erfc, which ONNX Runtime lacks.
    return keras.layers.Activation("relu", name=f"{name}_act")(x)


def build_model(widths: tuple[int, ...], num_classes: int, weight_decay: float = 0.0, seed: int = 0) -> keras.Model:
    """A VGG-style net: per width, two conv-BN-ReLU layers then 2x2 max-pooling.

    The stem scales 0..255 pixels to standardized values with the CIFAR-10 statistics,
    so callers feed raw pixels at training and serving time alike.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(32, 32, 3), dtype="float32", name="pixels")
    # (x/255 - mean) / std as one affine map; Rescaling keeps these as graph
    # constants (Normalization's variables became extra ONNX inputs).
    scale = [1.0 / (255.0 * s) for s in CIFAR_STD]
    offset = [-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)]
    x = keras.layers.Rescaling(scale=scale, offset=offset, name="standardize")(inputs)
    for i, width in enumerate(widths):
        x = _conv_bn(x, width, weight_decay, f"block{i}a")
        x = _conv_bn(x, width, weight_decay, f"block{i}b")
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cifar10_cnn")
