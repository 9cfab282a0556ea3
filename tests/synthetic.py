"""Small generated datasets in both supported formats (tests never use real data).

Each class gets a distinct colour and a noisy pattern, so that even a tiny net can
learn something in one epoch; images are drawn with a fixed seed.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
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


def plain_tar(path: Path, per_class: int = 5, classes: list[str] = CLASSES[:3]) -> Path:
    """An uncompressed tar of PNG files laid out as <class>/<i>.png."""
    x, y = make_images(per_class, classes)
    with tarfile.open(path, "w") as tf:
        for i, (img, label) in enumerate(zip(x, y)):
            _add_tar_file(tf, f"{classes[label]}/{i:05d}.png", encode(img))
    return path


def folder_zip(path: Path, files: dict[str, bytes]) -> Path:
    """A zip holding exactly ``files`` (name -> bytes), e.g. for odd layouts and corrupt images."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _add_tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# --- hostile archives: each holds a few valid images plus one bad entry ----------------
HOSTILE_KINDS = ("traversal", "absolute", "windows", "symlink", "hardlink", "device", "fifo")


def hostile_tar(path: Path, kind: str) -> Path:
    """A tar.gz with valid cat/dog images plus one entry of the given hostile ``kind``."""
    ok = encode(make_images(1, ["cat"])[0][0])
    with tarfile.open(path, "w:gz") as tf:
        for name in ("cat/0.png", "dog/0.png"):
            _add_tar_file(tf, name, ok)
        if kind in ("traversal", "absolute", "windows"):
            name = {"traversal": "cat/../../evil.png", "absolute": "/tmp/evil.png", "windows": "C:\\evil.png"}[kind]
            _add_tar_file(tf, name, ok)
        else:
            info = tarfile.TarInfo("cat/evil.png")
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = "/etc/passwd" if kind in ("symlink", "hardlink") else ""
            tf.addfile(info)
    return path


def hostile_zip(path: Path, kind: str) -> Path:
    """Like :func:`hostile_tar` for zip (zip has no hard links: "hardlink" is not offered)."""
    ok = encode(make_images(1, ["cat"])[0][0])
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("cat/0.png", "dog/0.png"):
            zf.writestr(name, ok)
        if kind in ("traversal", "absolute", "windows"):
            name = {"traversal": "cat/../../evil.png", "absolute": "/tmp/evil.png", "windows": "C:\\evil.png"}[kind]
            zf.writestr(zipfile.ZipInfo(name), ok)
        else:
            mode = {"symlink": stat.S_IFLNK, "device": stat.S_IFCHR, "fifo": stat.S_IFIFO}[kind]
            info = zipfile.ZipInfo("cat/evil.png")
            info.create_system = 3  # Unix, so external_attr holds a file mode
            info.external_attr = (mode | 0o644) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def bomb_by_size(path: Path, megabytes: int = 8, fmt: str = "zip") -> Path:
    """One member of ``megabytes`` zeros (tiny when compressed), plus two valid images."""
    ok = encode(make_images(1, ["cat"])[0][0])
    zeros = bytes(megabytes * 2**20)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("cat/0.png", ok)
            zf.writestr("dog/0.png", ok)
            zf.writestr("cat/big.png", zeros)
    else:
        with tarfile.open(path, "w:gz") as tf:
            _add_tar_file(tf, "cat/0.png", ok)
            _add_tar_file(tf, "dog/0.png", ok)
            _add_tar_file(tf, "cat/big.png", zeros)
    return path


def bomb_by_count(path: Path, members: int = 300, fmt: str = "zip") -> Path:
    """Many tiny members (count bombs are cheap to build and costly to list)."""
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for i in range(members):
                zf.writestr(f"cat/{i}.png", b"x")
    else:
        with tarfile.open(path, "w:gz") as tf:
            for i in range(members):
                _add_tar_file(tf, f"cat/{i}.png", b"x")
    return path


def zip_lying_size(path: Path) -> Path:
    """A zip whose member inflates to 1 MB while its central directory declares 100 bytes."""
    ok = encode(make_images(1, ["cat"])[0][0])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/0.png", ok)
        zf.writestr("dog/0.png", ok)
        zf.writestr("cat/liar.png", bytes(2**20))
    data = bytearray(path.read_bytes())
    entry = data.rfind(b"PK\x01\x02", 0, data.rfind(b"cat/liar.png"))  # its central directory record
    struct.pack_into("<I", data, entry + 24, 100)  # uncompressed size field
    path.write_bytes(bytes(data))
    return path


def zip_bad_crc(path: Path, per_class: int = 5, classes: list[str] = CLASSES[:2]) -> Path:
    """An image-folder zip (stored) where one member's bytes were flipped after writing."""
    x, y = make_images(per_class, classes)
    with zipfile.ZipFile(path, "w") as zf:
        for i, (img, label) in enumerate(zip(x, y)):
            zf.writestr(f"{classes[label]}/{i:05d}.png", encode(img))
    data = bytearray(path.read_bytes())
    first = data.find(b"\x89PNG")  # the first member's data (stored, so visible)
    data[first + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def pickled_release(path: Path) -> Path:
    """Stand-in for the pickled python release: names only (it is refused before reading)."""
    with tarfile.open(path, "w:gz") as tf:
        for name in ("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta"):
            _add_tar_file(tf, name, b"not really a pickle")
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data (a bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) \
        + chunk(b"IEND", b"")


class OverlapModel:
    """A stand-in model for batcher tests: sleeps ``delay`` s per call and records the most calls that
    overlapped (``peak``) and each call's batch size (``sizes``).

    Its "probabilities" identify each input: ten copies of the image's first pixel value.
    """

    def __init__(self, delay: float) -> None:
        import threading

        self.delay, self.peak, self._running, self._lock = delay, 0, 0, threading.Lock()
        self.sizes: list[int] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import time

        with self._lock:
            self._running += 1
            self.sizes.append(len(pixels))
            self.peak = max(self.peak, self._running)
        time.sleep(self.delay)
        with self._lock:
            self._running -= 1
        return np.stack([np.full(10, float(p[0, 0, 0])) for p in pixels])


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.synthetic archive OUT.zip [--per-class N]`` or ``... image OUT.png [--class-id K]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a generated CIFAR-10-like archive or one image.")
    parser.add_argument("kind", choices=["archive", "image"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=30, help="images per class in the archive")
    parser.add_argument("--class-id", type=int, default=1, help="class of the image (1: automobile)")
    args = parser.parse_args(argv)
    if args.kind == "archive":
        image_folder_zip(args.out, per_class=args.per_class, fmt="PNG")
    else:
        x, y = make_images(1, seed=7)
        args.out.write_bytes(encode(x[args.class_id], "PNG"))
    print(args.out)


if __name__ == "__main__":
    main()
