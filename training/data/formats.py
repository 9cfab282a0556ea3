"""Read a checked archive into arrays: the CIFAR-10 binary release, or image folders.

The binary release (``data_batch_*.bin``, ``test_batch.bin``, ``batches.meta.txt``) is parsed with numpy;
the pickled python release is refused (unpickling downloaded data runs code). Image folders are
``<class>/<image>`` or ``<split>/<class>/<image>`` (train/training, test/testing) under at most one
wrapping folder, decoded by :mod:`serving.images` in workers (:mod:`training.data.decode_pool`).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from training.data.archive import MAX_ARCHIVE_BYTES, MAX_ARCHIVE_MEMBERS, ArchiveError, Member, SafeArchive
from training.data.decode_pool import WorkerError, decode_into, shared_images
from serving.images import MAX_IMAGE_BYTES, InvalidImage

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
BINARY_RECORD = 1 + 32 * 32 * 3
# A compressed tar cannot be read at random: the parent reads it and hands workers chunks of this size.
TAR_CHUNK_BYTES = 256 * 1024**2
# More unreadable images than this share fails the run: a few broken files are noise, more mean the wrong data.
MAX_BAD_IMAGE_FRACTION = 0.01


@dataclass
class RawDataset:
    """Decoded images before splitting. ``split`` is per image ("train"/"test") or None."""

    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    split: np.ndarray | None = None
    bad_files: list[str] = field(default_factory=list)
    total_files: int = 0


def read_dataset(path: Path, *, max_members: int = MAX_ARCHIVE_MEMBERS, max_bytes: int = MAX_ARCHIVE_BYTES,
                 max_bad_fraction: float = MAX_BAD_IMAGE_FRACTION, workers: int = 1) -> RawDataset:
    """Read and decode the dataset archive at ``path`` (see the module docstring)."""
    with SafeArchive(Path(path), max_members=max_members, max_bytes=max_bytes) as archive:
        names = {posixpath.basename(m.name) for m in archive.members}
        if "data_batch_1.bin" in names:
            return _read_binary(archive)
        if "data_batch_1" in names or "batches.meta" in names:
            raise ArchiveError(f"{path} is the pickled python release of CIFAR-10; it is never unpickled "
                               "(unsafe). Use cifar-10-binary.tar.gz or an image-folder archive")
        return _read_image_folders(archive, max_bad_fraction, workers)


def _read_binary(archive: SafeArchive) -> RawDataset:
    by_name = {posixpath.basename(m.name): m for m in archive.members}
    meta = by_name.get("batches.meta.txt")
    class_names = ([ln.strip() for ln in archive.read(meta).decode("utf-8", "replace").splitlines() if ln.strip()]
                   if meta else [str(i) for i in range(10)])
    images, labels, splits = [], [], []
    batches = sorted(n for n in by_name if n.startswith("data_batch_") and n.endswith(".bin"))
    for name in batches + (["test_batch.bin"] if "test_batch.bin" in by_name else []):
        raw = np.frombuffer(archive.read(by_name[name]), dtype=np.uint8)
        if raw.size % BINARY_RECORD:
            raise ArchiveError(f"{archive.path}: {name} is {raw.size} bytes, not a multiple of "
                               f"{BINARY_RECORD}-byte records; the file is truncated or not CIFAR-10 binary. "
                               "Download the archive again")
        rec = raw.reshape(-1, BINARY_RECORD)
        labels.append(rec[:, 0].astype(np.int64))
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        splits.append(np.full(len(rec), "test" if name.startswith("test") else "train"))
    y = np.concatenate(labels)
    if y.size and y.max() >= len(class_names):
        raise ArchiveError(f"{archive.path}: label {int(y.max())} but only {len(class_names)} class names in "
                           "batches.meta.txt; the archive is not the CIFAR-10 binary release")
    return RawDataset(np.ascontiguousarray(np.concatenate(images)), y, class_names, np.concatenate(splits),
                      total_files=len(y))


def _layout(path: Path, members: list[Member]) -> Iterator[tuple[Member, str | None, str]]:
    """Yield (member, split or None, class) for each image member."""
    files = [m for m in members if posixpath.splitext(m.name)[1].lower() in IMAGE_SUFFIXES
             and not posixpath.basename(m.name).startswith(".") and "__MACOSX" not in m.name]
    parts = [m.name.split("/") for m in files]
    # Drop one wrapping folder shared by every file (e.g. "cifar10/train/cat/1.png").
    while parts and min(len(p) for p in parts) >= 3 and len({p[0] for p in parts}) == 1 \
            and parts[0][0].lower() not in SPLIT_NAMES:
        parts = [p[1:] for p in parts]
    for member, p in zip(files, parts):
        if len(p) == 3 and p[0].lower() in SPLIT_NAMES:
            yield member, SPLIT_NAMES[p[0].lower()], p[1]
        elif len(p) == 2:
            yield member, None, p[0]
        else:
            raise ArchiveError(f"{path}: member {member.name!r} is not laid out as <class>/<image> or "
                               "<split>/<class>/<image> (split: train or test); reorganise the archive")


def _read_image_folders(archive: SafeArchive, max_bad_fraction: float, workers: int) -> RawDataset:
    entries = list(_layout(archive.path, archive.members))
    if not entries:
        raise ArchiveError(f"{archive.path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
                           "<class>/<image> folders; check that you gave the right archive")
    split_names = {split for _, split, _ in entries}
    if None in split_names and len(split_names) > 1:
        raise ArchiveError(f"{archive.path} mixes <split>/<class>/<image> and <class>/<image> layouts; "
                           "use one of them for every image")
    class_names = sorted({cls for _, _, cls in entries})
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([index[cls] for _, _, cls in entries], dtype=np.int64)
    images = shared_images(len(entries))
    members = [m for m, _, _ in entries]
    try:
        bad = _decode_members(archive, members, images, workers)
    except WorkerError as exc:
        raise WorkerError(f"{archive.path}: {exc}") from exc
    bad_files = [f"{members[i].name}: {reason}" for i, reason in bad]
    _check_bad(archive.path, bad_files, len(entries), max_bad_fraction)
    split = np.array([s for _, s, _ in entries], dtype="<U5") if None not in split_names else None
    if bad:
        keep = np.ones(len(entries), dtype=bool)
        keep[[i for i, _ in bad]] = False
        images, labels = images[keep], labels[keep]
        split = split[keep] if split is not None else None
    return RawDataset(images, labels, class_names, split, bad_files, total_files=len(entries))


def _decode_members(archive: SafeArchive, members: list[Member], images: np.ndarray,
                    workers: int) -> list[tuple[int, str]]:
    if archive.is_zip:  # workers read the members themselves, from the shared memory map
        return decode_into(images, 0, len(members), lambda: _zip_reader(archive, members), workers,
                           passthrough=(ArchiveError,))
    bad = []
    for lo, hi in _chunks(members, TAR_CHUNK_BYTES):
        # Read in the parent, in archive order (forward only through a compressed stream).
        datas = [_read_or_error(archive, m) for m in members[lo:hi]]
        bad += decode_into(images, lo, hi, lambda d=datas, o=lo: _list_reader(d, o), workers,
                           passthrough=(ArchiveError,))
        del datas
    return bad


def _zip_reader(archive: SafeArchive, members: list[Member]) -> Callable[[int], bytes]:
    return lambda i: archive.read(members[i], limit=MAX_IMAGE_BYTES)


def _read_or_error(archive: SafeArchive, member: Member) -> bytes | InvalidImage:
    try:
        return archive.read(member, limit=MAX_IMAGE_BYTES)
    except InvalidImage as exc:  # counted as unreadable by the decode step
        return exc


def _list_reader(datas: list[bytes | InvalidImage], offset: int) -> Callable[[int], bytes]:
    def read(i: int) -> bytes:
        data = datas[i - offset]
        if isinstance(data, InvalidImage):
            raise data
        return data
    return read


def _chunks(members: list[Member], limit: int) -> Iterator[tuple[int, int]]:
    lo, size = 0, 0
    for i, m in enumerate(members):
        if size and size + m.size > limit:
            yield lo, i
            lo, size = i, 0
        size += m.size
    if lo < len(members):
        yield lo, len(members)


def _check_bad(path: Path, bad: list[str], total: int, max_fraction: float) -> None:
    if bad:
        log.warning("%s: %d of %d images unreadable, e.g. %s", path, len(bad), total, bad[:3])
    if total and len(bad) / total > max_fraction:
        raise ArchiveError(
            f"{path}: {len(bad)} of {total} images are unreadable ({100 * len(bad) / total:.2f}% > "
            f"{100 * max_fraction:.2f}% allowed, MAX_BAD_IMAGE_FRACTION in training/data/formats.py), e.g. "
            f"{'; '.join(bad[:3])}. Fix or remove those files")
