"""The CIFAR-10 CNN, airbench94's net in Keras 3 layers and ``keras.ops`` only (any backend).

A frozen 2x2 whitening convolution set from the training data's patch statistics, one
conv-pool-BN-act-conv-BN-act group per width, a max-pool head and logits scaled by 1/9. It takes raw
pixels (float32 0..255, (N, 32, 32, 3)) and returns float32 probabilities, so an export needs no
preprocessing.
"""

from __future__ import annotations

import keras
import numpy as np

# Per-channel mean and std of the CIFAR-10 training set, in 0..1 pixel units.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# The whitening conv sees 2x2x3 = 12-dimensional patches; it gets each eigenvector
# and its negation (so a following ReLU-like activation keeps both signs): 24 filters.
WHITEN_SIZE = 2
WHITEN_FILTERS = 2 * WHITEN_SIZE * WHITEN_SIZE * 3
WHITEN_EPS = 5e-4
# Logit scale of the head (airbench's "scaling_factor"): keeps initial softmax soft.
LOGIT_SCALE = 1 / 9


@keras.saving.register_keras_serializable(package="cifar10")
def gelu_tanh(x):
    """GELU, tanh approximation: exact GELU exports to ONNX as Erfc, which ONNX Runtime lacks."""
    return keras.activations.gelu(x, approximate=True)


def _init():
    # PyTorch's default conv/linear init (uniform, bound 1/sqrt(fan_in)): the learning
    # rate and weight decay below were tuned (by airbench) for weights of this size.
    return keras.initializers.VarianceScaling(1 / 3, mode="fan_in", distribution="uniform")


@keras.saving.register_keras_serializable(package="cifar10")
class DiracInit(keras.initializers.Initializer):
    """airbench's "dirac" init: a PyTorch-default kernel whose first ``in_channels`` filters are identities,
    so each conv starts as an implicit residual connection (fewer epochs to the same accuracy)."""

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        kernel = _init()(shape, dtype=dtype)
        n = min(cin, cout)
        # Zero the first n filters, then put a 1 at the centre tap of channel i -> i.
        mask = np.ones(shape, np.float32)
        mask[:, :, :, :n] = 0
        dirac = np.zeros(shape, np.float32)
        dirac[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1
        return kernel * keras.ops.convert_to_tensor(mask, dtype) + keras.ops.convert_to_tensor(dirac, dtype)

    def get_config(self):
        return {}


def _conv(x, filters: int, name: str, dtype):
    return keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=DiracInit(),
                               dtype=dtype, name=f"{name}_conv")(x)


def _bn_act(x, name: str, dtype, momentum: float):
    # BatchNorm without a trainable scale. Keras momentum is the old average's weight: airbench's PyTorch
    # momentum 0.6 hands 0.4 to the new batch, which is Keras' 0.6 too.
    x = keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-5, scale=False, dtype=dtype,
                                        name=f"{name}_bn")(x)
    return keras.layers.Activation(gelu_tanh, dtype=dtype, name=f"{name}_act")(x)


def build_model(widths: tuple[int, ...], num_classes: int, seed: int = 0, dtype: str = "float32",
                batchnorm_momentum: float = 0.6) -> keras.Model:
    """The network, raw pixels in, probabilities out.

    ``dtype`` is a Keras dtype policy for the conv blocks ("float32" or
    "mixed_bfloat16"); the stem and the output stay float32. Call :func:`set_whitening`
    before training.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(32, 32, 3), dtype="float32", name="pixels")
    # (x/255 - mean) / std as one affine map; Rescaling keeps these as graph
    # constants (Normalization's variables became extra ONNX inputs).
    scale = [1.0 / (255.0 * s) for s in CIFAR_STD]
    offset = [-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)]
    x = keras.layers.Rescaling(scale=scale, offset=offset, name="standardize")(inputs)
    # Frozen weights (set from data), trainable bias.
    whiten = keras.layers.Conv2D(WHITEN_FILTERS, WHITEN_SIZE, padding="valid", name="whiten")
    x = whiten(x)
    whiten.kernel.trainable = False
    x = keras.layers.Activation(gelu_tanh, dtype=dtype, name="whiten_act")(x)
    for i, width in enumerate(widths):
        x = _conv(x, width, f"block{i}a", dtype)
        x = _bn_act(keras.layers.MaxPooling2D(2, dtype=dtype, name=f"block{i}a_pool")(x), f"block{i}a", dtype,
                    batchnorm_momentum)
        x = _bn_act(_conv(x, width, f"block{i}b", dtype), f"block{i}b", dtype, batchnorm_momentum)
    x = keras.layers.GlobalMaxPooling2D(dtype=dtype, name="pool")(x)
    x = keras.layers.Dense(num_classes, use_bias=False, kernel_initializer=_init(), dtype=dtype, name="logits")(x)
    x = keras.layers.Rescaling(LOGIT_SCALE, dtype=dtype, name="logit_scale")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cifar10_cnn")


def whitening_kernel(images: np.ndarray, eps: float = WHITEN_EPS) -> np.ndarray:
    """Conv kernel (2, 2, 3, 24) whitening 2x2 patches of standardized ``images`` (uint8 NHWC): each
    eigenvector of the patch covariance over sqrt(eigenvalue + eps), once with each sign."""
    x = (images.astype(np.float64) / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    k = WHITEN_SIZE
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    # Patch vectors ordered (dy, dx, channel), matching Keras' (kh, kw, in, out) kernel layout.
    patches = np.stack([x[:, dy:dy + h, dx:dx + w, :] for dy in range(k) for dx in range(k)], axis=3)
    patches = patches.reshape(-1, k * k * x.shape[3])
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    filters = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], 0) + eps)
    kernel = filters.reshape(k, k, x.shape[3], -1)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def set_whitening(model: keras.Model, images: np.ndarray) -> None:
    """Initialise the frozen whitening conv from (a sample of) the training images."""
    layer = model.get_layer("whiten")
    layer.kernel.assign(whitening_kernel(images))
    layer.bias.assign(np.zeros(layer.bias.shape, np.float32))


def float32_copy(model: keras.Model, widths: tuple[int, ...], num_classes: int) -> keras.Model:
    """The same weights in an all-float32 net, for evaluation and export (ONNX stays float32)."""
    copy = build_model(widths, num_classes, dtype="float32")
    copy.set_weights(model.get_weights())
    return copy


def with_flip_tta(model: keras.Model) -> keras.Model:
    """Flip test-time augmentation in the graph (the mean of x's and its mirror's probabilities), so serving
    applies exactly what evaluation measured."""
    inputs = keras.Input(shape=(32, 32, 3), dtype="float32", name="pixels")
    mirrored = keras.ops.flip(inputs, axis=2)
    outputs = keras.layers.Average(name="tta_mean")([model(inputs), model(mirrored)])
    return keras.Model(inputs, outputs, name="cifar10_cnn_tta")
