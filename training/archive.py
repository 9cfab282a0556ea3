"""Read a dataset archive safely, without extracting it.

Two formats:

- the official CIFAR-10 *binary* release (``data_batch_1..5.bin``, ``test_batch.bin``,
  ``batches.meta.txt``), parsed with numpy. The pickled "python" release is refused:
  unpickling downloaded data runs arbitrary code.
- image-folder archives (zip, tar, tar.gz, tgz) laid out as ``<class>/<image>`` or
  ``<split>/<class>/<image>``; a single wrapping folder is allowed.

Members are read into memory straight from the archive, so nothing is written to
disk at all. Before anything is read, every member is checked: no absolute paths or
``..``, no links, no devices, and caps on member count and total uncompressed size.
"""

from __future__ import annotations

import logging
import posixpath
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from training.images import InvalidImage, decode_image

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
BINARY_RECORD = 1 + 32 * 32 * 3


class ArchiveError(ValueError):
    """The archive is unsafe, malformed, or not a dataset we understand."""


@dataclass
class RawDataset:
    """Decoded images before splitting. ``split`` is per image ("train"/"test") or None."""

    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    split: np.ndarray | None = None
    bad_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Member:
    name: str
    size: int


class _Reader:
    """A uniform, checked view of zip and tar archives."""

    def __init__(self, path: Path, max_members: int, max_bytes: int):
        self.path = path
        if zipfile.is_zipfile(path):
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self._tar: tarfile.TarFile | None = None
            infos = self._zip.infolist()
            members = [self._check_zip(i) for i in infos]
        else:
            try:
                self._tar = tarfile.open(path, "r:*")
            except tarfile.TarError as exc:
                raise ArchiveError(f"{path} is neither a zip nor a tar archive ({exc}); "
                                   "give a .zip, .tar, .tar.gz or the CIFAR-10 binary release") from exc
            self._zip = None
            members = []
            for i, info in enumerate(self._tar):
                if i >= max_members:
                    self._too_many(max_members)
                members.append(self._check_tar(info))
            self._tar_infos = {m.name: m for m in self._tar.getmembers()}
        if len(members) > max_members:
            self._too_many(max_members)
        total = sum(m.size for m in members if m is not None)
        if total > max_bytes:
            raise ArchiveError(f"{path} would unpack to {total:,} bytes, over the {max_bytes:,}-byte limit "
                               "(max_archive_bytes); raise it if the archive is trusted")
        self.members = [m for m in members if m is not None]

    def _too_many(self, max_members: int) -> None:
        raise ArchiveError(f"{self.path} has more than {max_members:,} members (limit max_archive_members); "
                           "raise the limit if the archive is trusted")

    def _check_name(self, name: str) -> str:
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
            raise ArchiveError(f"{self.path}: member {name!r} has an absolute or Windows path; refusing the archive")
        norm = posixpath.normpath(name)
        if norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
            raise ArchiveError(f"{self.path}: member {name!r} escapes the archive with '..'; refusing the archive")
        return norm

    def _check_zip(self, info: zipfile.ZipInfo) -> Member | None:
        name = self._check_name(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArchiveError(f"{self.path}: member {info.filename!r} is a symlink; links are refused")
        if info.is_dir():
            return None
        return Member(name, info.file_size)

    def _check_tar(self, info: tarfile.TarInfo) -> Member | None:
        name = self._check_name(info.name)
        if info.issym() or info.islnk():
            raise ArchiveError(f"{self.path}: member {info.name!r} is a link to {info.linkname!r}; links are refused")
        if info.isdev() or info.isfifo():
            raise ArchiveError(f"{self.path}: member {info.name!r} is a device or fifo; refusing the archive")
        if not info.isfile():
            return None
        return Member(name, info.size)

    def read(self, member: Member) -> bytes:
        if self._zip is not None:
            return self._zip.read(member.name)
        f = self._tar.extractfile(self._tar_infos[member.name])  # type: ignore[union-attr]
        return f.read() if f else b""

    def close(self) -> None:
        (self._zip or self._tar).close()  # type: ignore[union-attr]


def read_dataset(path: Path, *, max_members: int, max_bytes: int, max_bad_fraction: float) -> RawDataset:
    """Read and decode the dataset archive at ``path`` (see the module docstring)."""
    reader = _Reader(Path(path), max_members, max_bytes)
    try:
        names = {posixpath.basename(m.name) for m in reader.members}
        if "data_batch_1.bin" in names:
            return _read_binary(reader)
        if "data_batch_1" in names or "batches.meta" in names:
            raise ArchiveError(f"{path} is the pickled python release of CIFAR-10; it is never unpickled "
                               "(unsafe). Use cifar-10-binary.tar.gz or an image-folder archive")
        return _read_image_folders(reader, max_bad_fraction)
    finally:
        reader.close()


def _read_binary(reader: _Reader) -> RawDataset:
    by_name = {posixpath.basename(m.name): m for m in reader.members}
    meta = by_name.get("batches.meta.txt")
    class_names = ([ln.strip() for ln in reader.read(meta).decode().splitlines() if ln.strip()]
                   if meta else [str(i) for i in range(10)])
    images, labels, splits = [], [], []
    batches = sorted(n for n in by_name if n.startswith("data_batch_") and n.endswith(".bin"))
    for name in batches + (["test_batch.bin"] if "test_batch.bin" in by_name else []):
        raw = np.frombuffer(reader.read(by_name[name]), dtype=np.uint8)
        if raw.size % BINARY_RECORD:
            raise ArchiveError(f"{reader.path}: {name} is {raw.size} bytes, not a multiple of "
                               f"{BINARY_RECORD}-byte records; the file is truncated or not CIFAR-10 binary")
        rec = raw.reshape(-1, BINARY_RECORD)
        labels.append(rec[:, 0].astype(np.int64))
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        splits.append(np.full(len(rec), "test" if name.startswith("test") else "train"))
    y = np.concatenate(labels)
    if y.size and y.max() >= len(class_names):
        raise ArchiveError(f"{reader.path}: label {int(y.max())} but only {len(class_names)} class names")
    return RawDataset(np.ascontiguousarray(np.concatenate(images)), y, class_names, np.concatenate(splits))


def _layout(members: list[Member]) -> Iterator[tuple[Member, str | None, str]]:
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
            raise ArchiveError(f"member {member.name!r} is not laid out as <class>/<image> or "
                               "<split>/<class>/<image> (split: train or test)")


def _read_image_folders(reader: _Reader, max_bad_fraction: float) -> RawDataset:
    entries = list(_layout(reader.members))
    if not entries:
        raise ArchiveError(f"{reader.path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                           "in <class>/<image> folders")
    class_names = sorted({cls for _, _, cls in entries})
    index = {c: i for i, c in enumerate(class_names)}
    images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
    labels = np.empty(len(entries), dtype=np.int64)
    splits: list[str | None] = []
    bad: list[str] = []
    n = 0
    for member, split, cls in entries:
        try:
            images[n] = decode_image(reader.read(member))
        except InvalidImage as exc:
            bad.append(f"{member.name}: {exc}")
            continue
        labels[n] = index[cls]
        splits.append(split)
        n += 1
    _check_bad(reader.path, bad, len(entries), max_bad_fraction)
    has_split = any(s is not None for s in splits)
    if has_split and any(s is None for s in splits):
        raise ArchiveError(f"{reader.path} mixes <split>/<class>/<image> and <class>/<image> layouts; use one")
    split_arr = np.array(splits, dtype="<U5") if has_split else None
    return RawDataset(images[:n], labels[:n], class_names, split_arr, bad)


def _check_bad(path: Path, bad: list[str], total: int, max_fraction: float) -> None:
    if bad:
        log.warning("%s: %d of %d images unreadable, e.g. %s", path, len(bad), total, bad[:3])
    if total and len(bad) / total > max_fraction:
        raise ArchiveError(
            f"{path}: {len(bad)} of {total} images are unreadable ({100 * len(bad) / total:.1f}% > "
            f"{100 * max_fraction:.1f}% allowed by max_bad_image_fraction), e.g. {'; '.join(bad[:3])}. "
            "Fix the archive or raise the threshold")
