"""Small generated datasets in both supported formats (tests never use real data).

Each class gets a distinct colour and a noisy pattern, so that even a tiny net can
learn something in one epoch; images are drawn with a fixed seed.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(per_class: int, classes: list[str] = CLASSES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and int labels, class-dependent colours plus noise."""
    rng = np.random.default_rng(seed)
    n = len(classes)
    images, labels = [], []
    for c in range(n):
        base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 31 + 160) % 256], dtype=np.float32)
        noise = rng.normal(0, 30, (per_class, 32, 32, 3))
        stripe = np.zeros((32, 32, 1))
        stripe[:, c * 3:(c * 3) + 3] = 80
        images.append(np.clip(base + noise + stripe, 0, 255).astype(np.uint8))
        labels.append(np.full(per_class, c))
    return np.concatenate(images), np.concatenate(labels)


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def image_folder_zip(path: Path, per_class: int = 20, classes: list[str] = CLASSES, with_split: bool = False,
                     fmt: str = "PNG", seed: int = 0) -> Path:
    """A zip laid out as <class>/<i>.png, or train/... and test/... when ``with_split``."""
    x, y = make_images(per_class, classes, seed)
    ext = "jpg" if fmt == "JPEG" else fmt.lower()
    with zipfile.ZipFile(path, "w") as zf:
        for i, (img, label) in enumerate(zip(x, y)):
            prefix = ("test/" if i % 5 == 0 else "train/") if with_split else ""
            zf.writestr(f"{prefix}{classes[label]}/{i:05d}.{ext}", encode(img, fmt))
    return path


def image_folder_tar(path: Path, per_class: int = 20, classes: list[str] = CLASSES, with_split: bool = False,
                     seed: int = 0) -> Path:
    """Like :func:`image_folder_zip` but a tar.gz with JPEG files."""
    x, y = make_images(per_class, classes, seed)
    with tarfile.open(path, "w:gz") as tf:
        for i, (img, label) in enumerate(zip(x, y)):
            prefix = ("test/" if i % 5 == 0 else "train/") if with_split else ""
            data = encode(img, "JPEG")
            info = tarfile.TarInfo(f"data/{prefix}{classes[label]}/{i:05d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def binary_release(path: Path, per_class: int = 10, test_per_class: int = 4, seed: int = 0) -> Path:
    """A miniature of cifar-10-binary.tar.gz: data_batch_1..2.bin, test_batch.bin, batches.meta.txt."""
    def records(per: int, s: int) -> bytes:
        x, y = make_images(per, CLASSES, s)
        order = np.random.default_rng(s).permutation(len(y))
        planes = x[order].transpose(0, 3, 1, 2).reshape(len(y), -1)
        return np.concatenate([y[order, None].astype(np.uint8), planes], axis=1).tobytes()

    half = max(1, per_class // 2)
    files = {
        "cifar-10-batches-bin/data_batch_1.bin": records(half, seed),
        "cifar-10-batches-bin/data_batch_2.bin": records(per_class - half, seed + 1),
        "cifar-10-batches-bin/test_batch.bin": records(test_per_class, seed + 2),
        "cifar-10-batches-bin/batches.meta.txt": ("\n".join(CLASSES) + "\n").encode(),
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
