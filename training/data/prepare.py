"""Seeded, stratified train/validation/test splits: ``data.npz`` and ``manifest.json`` with a content digest.

The folder is keyed by the archive's sha256, the source, the split settings and ``PREPARE_VERSION``, and
renamed into place only when complete, so a rerun reuses it and a half-written one is never used. The
digest (sha256 over class names and every split) is the same for the same archive and seed on any machine.
Unusable data fails the run naming the archive and what to change.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from training.config import PipelineConfig
from training.data.decode_pool import default_workers
from training.data.fetch import expected_checksum, file_digest
from training.data.formats import RawDataset, read_dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Part of the cache key: bump when decoding or splitting changes, so older prepared folders are not reused.
PREPARE_VERSION = 2


class DatasetError(ValueError):
    """The prepared data would be unusable for training; the message says why."""


def split_indices(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Within each class a seeded permutation cut by ``fractions`` (split name -> share; the rest is "train").

    Each split's indices come back sorted, so their order depends only on the data.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {name: [] for name in (*fractions, "train")}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, frac in fractions.items():
            n = int(round(len(idx) * frac))
            out[name].append(idx[start:start + n])
            start += n
        out["train"].append(idx[start:])
    return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Stratified subset of at most ``limit`` positions (all when limit <= 0)."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    frac = limit / len(labels)
    return split_indices(labels, {"keep": frac}, seed + 1)["keep"]


def make_splits(raw: RawDataset, config: PipelineConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split ``raw`` into train/val/test per ``config`` (archive test split wins)."""
    x, y = raw.images, raw.labels
    if archive_has_test_split(raw):
        test_idx = np.flatnonzero(raw.split == "test")
        pool = np.flatnonzero(raw.split != "test")
        parts = split_indices(y[pool], {"val": config.val_fraction}, config.seed)
        idx = {"train": pool[parts["train"]], "val": pool[parts["val"]], "test": test_idx}
    else:
        idx = split_indices(y, {"val": config.val_fraction, "test": config.test_fraction}, config.seed)
    keep = subsample(y[idx["train"]], config.max_train_images, config.seed)
    idx["train"] = idx["train"][keep]
    # Training order is shuffled once here (seeded) so that batches mix classes.
    idx["train"] = np.random.default_rng(config.seed + 2).permutation(idx["train"])
    return {name: (x[idx[name]], y[idx[name]]) for name in SPLITS}


def check_fractions(config: PipelineConfig) -> None:
    """Raise :class:`DatasetError` unless the split fractions leave training data."""
    val, test = config.val_fraction, config.test_fraction
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DatasetError(f"val_fraction={val} and test_fraction={test} must each be in [0, 1) and sum to "
                           "less than 1, so that training data remains; e.g. 0.1 and 0.2")


def archive_has_test_split(raw: RawDataset) -> bool:
    """True when the archive brought its own test split (``test/<class>/<image>``)."""
    return raw.split is not None and bool((raw.split == "test").any())


def validate_raw(raw: RawDataset, archive: Path) -> None:
    """Raise :class:`DatasetError` when the decoded archive cannot make a classifier."""
    names = raw.class_names
    if len(names) < 2:
        raise DatasetError(f"{archive}: found {len(names)} class ({names}); a classifier needs at least 2 class "
                           "folders, laid out as <class>/<image> or <split>/<class>/<image>")
    counts = np.bincount(raw.labels, minlength=len(names))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(f"{archive}: class folder(s) {empty} have no readable images; add images or remove "
                           "the folder(s)")
    if archive_has_test_split(raw):
        present = {s: {names[i] for i in np.unique(raw.labels[raw.split == s])} for s in ("train", "test")}
        if not present["train"]:
            raise DatasetError(f"{archive}: the archive has a test/ folder but no train/ folder; add train/ "
                               "or lay the images out as <class>/<image> to have all splits carved out")
        if present["train"] != present["test"]:
            raise DatasetError(
                f"{archive}: label sets differ between the archive's splits: only in train "
                f"{sorted(present['train'] - present['test'])}, only in test "
                f"{sorted(present['test'] - present['train'])}; give both splits the same class folders")


def validate(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
             source: str = "prepared data") -> None:
    """Raise :class:`DatasetError`, starting with ``source``, when the splits cannot train and evaluate a model."""
    if len(class_names) < 2:
        raise DatasetError(f"{source}: found {len(class_names)} class ({class_names}); a classifier needs at "
                           "least 2 class folders")
    sets = {}
    for name, (x, y) in splits.items():
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
            raise DatasetError(f"{source}: {name} images have shape {x.shape} {x.dtype}; expected "
                               "(N, 32, 32, 3) uint8. This is a bug in the prepare step; please report it")
        if len(x) != len(y):
            raise DatasetError(f"{source}: {name}: {len(x)} images but {len(y)} labels; this is a bug in the "
                               "prepare step, please report it")
        counts = np.bincount(y, minlength=len(class_names))
        empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DatasetError(f"{source}: split {name!r} has no images of class(es) {empty}; add images or "
                               "change val_fraction/test_fraction so every class appears in every split")
        sets[name] = frozenset(np.unique(y).tolist())
    if len(set(sets.values())) != 1:
        raise DatasetError(f"{source}: label sets differ between splits: "
                           f"{ {k: sorted(class_names[i] for i in v) for k, v in sets.items()} }")


def content_digest(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str]) -> str:
    """sha256 over class names and every split's images and labels, in a fixed order."""
    h = hashlib.sha256(json.dumps(class_names).encode())
    for name in SPLITS:
        x, y = splits[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(x).data)
        h.update(np.ascontiguousarray(y, dtype="<i8").data)
    return h.hexdigest()


def _manifest(raw: RawDataset, splits: dict, config: PipelineConfig, archive_sha: str,
              checksum: tuple[str, str] | None) -> dict:
    names = raw.class_names
    return {
        "source_url": config.data_url,
        "archive_sha256": archive_sha,
        "expected_checksum": f"{checksum[0]}:{checksum[1]}" if checksum else None,
        "prepare_version": PREPARE_VERSION,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "test_fraction": None if archive_has_test_split(raw) else config.test_fraction,
        "test_split_from_archive": archive_has_test_split(raw),
        "class_names": names,
        "image_shape": [32, 32, 3],
        "dtype": "uint8",
        "image_files": raw.total_files,
        "unreadable_images": len(raw.bad_files),
        "unreadable_examples": raw.bad_files[:10],
        "counts": {name: {names[i]: int(c) for i, c in enumerate(np.bincount(y, minlength=len(names)))}
                   for name, (_, y) in splits.items()},
        "sizes": {name: int(len(y)) for name, (_, y) in splits.items()},
        "digest": content_digest(splits, names),
    }


def prepare(archive: Path, config: PipelineConfig) -> Path:
    """Read ``archive``, split, validate, and write data.npz + manifest.json; return the folder."""
    archive = Path(archive)
    check_fractions(config)
    archive_sha = file_digest(archive, "sha256")
    checksum = expected_checksum(config)
    key_src = json.dumps([PREPARE_VERSION, archive_sha, config.data_url, checksum, config.seed,
                          config.val_fraction, config.test_fraction, config.max_train_images])
    out_dir = config.data_dir / "prepared" / hashlib.sha256(key_src.encode()).hexdigest()[:16]
    if (out_dir / "manifest.json").is_file():
        log.info("prepared data already present: %s", out_dir)
        return out_dir
    start = time.monotonic()
    workers = config.decode_workers if config.decode_workers > 0 else default_workers()
    raw = read_dataset(archive, workers=workers)
    log.info("decoded %d images of %d classes in %.1f s with %d worker(s)", len(raw.labels),
             len(raw.class_names), time.monotonic() - start, workers)
    validate_raw(raw, archive)
    splits = make_splits(raw, config)
    del raw.images  # the splits hold copies; free the decoded block before writing
    validate(splits, raw.class_names, str(archive))
    manifest = _manifest(raw, splits, config, archive_sha, checksum)
    _write(out_dir, splits, manifest)
    log.info("prepared %s in %.1f s: %s, digest %s", out_dir, time.monotonic() - start, manifest["sizes"],
             manifest["digest"][:16])
    return out_dir


def _write(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], manifest: dict) -> None:
    """Write under a temporary name, then rename. A full disk raises ``OSError`` (same errno) naming the
    folder, the space needed and free, and what to do, after the partial files are removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{k}_{name}": v for name, (x, y) in splits.items() for k, v in (("x", x), ("y", y))}
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir.parent))
    try:
        np.savez(tmp / "data.npz", **arrays)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "manifest.json").is_file():  # not a concurrent run that finished first
                raise
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # before measuring: the partial files' space is free again
        need = sum(a.nbytes for a in arrays.values()) / 2**20
        free = shutil.disk_usage(out_dir.parent).free / 2**20
        raise OSError(exc.errno, f"disk full: no space left to write the prepared data in {out_dir.parent} "
                                 f"(needs about {need:.1f} MB, {free:.1f} MB free there now); nothing partial "
                                 "was kept. Free space there, or set CIFAR10_STATE_DIR to a folder on a "
                                 "bigger disk, and rerun the task") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(folder: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Load splits and manifest written by :func:`prepare`."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / "data.npz") as data:
        splits = {name: (data[f"x_{name}"], data[f"y_{name}"]) for name in SPLITS}
    return splits, manifest
