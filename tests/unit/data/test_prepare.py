"""Preparing: stratified seeded splits, manifest, digest determinism, validation errors, caching."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests import helpers as syn
from training.data import decode_pool
from training.data import prepare as prepare_module
from training.data.archive import ArchiveError
from training.config import load_config
from training.data.prepare import (DatasetError, content_digest, load_prepared, prepare, split_indices,
                              validate)


def config_for(tmp_path, archive, state="state", **overrides):
    return load_config({"state_dir": str(tmp_path / state), "data_url": archive.as_uri(),
                        "decode_workers": 1} | overrides)


@pytest.fixture
def folder_zip(tmp_path):
    return syn.image_folder_zip(tmp_path / "data.zip", per_class=10, classes=syn.CLASSES[:4])


def test_prepare_writes_arrays_and_a_complete_manifest(tmp_path, folder_zip):
    out = prepare(folder_zip, config_for(tmp_path, folder_zip, val_fraction=0.2, test_fraction=0.3))
    assert sorted(p.name for p in out.iterdir()) == ["data.npz", "manifest.json"]
    splits, manifest = load_prepared(out)
    assert manifest["sizes"] == {"train": 20, "val": 8, "test": 12}
    assert manifest["counts"]["val"] == {name: 2 for name in sorted(syn.CLASSES[:4])}  # stratified
    assert manifest["counts"]["test"] == {name: 3 for name in sorted(syn.CLASSES[:4])}
    assert manifest["class_names"] == sorted(syn.CLASSES[:4])
    assert manifest["image_shape"] == [32, 32, 3] and manifest["dtype"] == "uint8"
    assert manifest["source_url"] == folder_zip.as_uri()
    assert manifest["archive_sha256"] == prepare_module.file_digest(folder_zip, "sha256")
    assert manifest["unreadable_images"] == 0 and manifest["test_split_from_archive"] is False
    for name, (x, y) in splits.items():
        assert x.dtype == np.uint8 and x.shape == (manifest["sizes"][name], 32, 32, 3)
        assert y.shape == (manifest["sizes"][name],)
    assert manifest["digest"] == content_digest(splits, manifest["class_names"])
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_no_image_is_lost_or_duplicated_across_splits(tmp_path, folder_zip):
    splits, _ = load_prepared(prepare(folder_zip, config_for(tmp_path, folder_zip)))
    rows = np.concatenate([x for x, _ in splits.values()]).reshape(40, -1)
    assert len({r.tobytes() for r in rows}) == 40


def test_archive_test_split_is_the_test_split(tmp_path):
    archive = syn.image_folder_zip(tmp_path / "s.zip", per_class=10, classes=syn.CLASSES[:3], with_split=True)
    _, manifest = load_prepared(prepare(archive, config_for(tmp_path, archive, test_fraction=0.4)))
    # The generator puts every 5th image in test/: 6 of 30; test_fraction is not used.
    assert manifest["sizes"]["test"] == 6 and manifest["test_split_from_archive"] is True
    assert manifest["test_fraction"] is None


def test_binary_release_keeps_its_test_batch(tmp_path):
    archive = syn.binary_release(tmp_path / "cifar-10-binary.tar.gz", per_class=10, test_per_class=2)
    splits, manifest = load_prepared(prepare(archive, config_for(tmp_path, archive)))
    assert manifest["sizes"] == {"train": 90, "val": 10, "test": 20}
    assert manifest["class_names"] == syn.CLASSES


def test_same_data_and_seed_give_the_same_digest_another_seed_another_split(tmp_path, folder_zip):
    first = load_prepared(prepare(folder_zip, config_for(tmp_path, folder_zip, state="a")))
    again = load_prepared(prepare(folder_zip, config_for(tmp_path, folder_zip, state="b")))
    other = load_prepared(prepare(folder_zip, config_for(tmp_path, folder_zip, state="c", seed=7)))
    assert first[1]["digest"] == again[1]["digest"]
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(first[0][name][0], again[0][name][0])
    assert other[1]["digest"] != first[1]["digest"]
    assert not np.array_equal(other[0]["test"][0], first[0]["test"][0])  # another split, not just another order
    assert other[1]["counts"] == first[1]["counts"]  # still stratified the same way


def test_worker_processes_do_not_change_the_digest(tmp_path, folder_zip, monkeypatch):
    monkeypatch.setattr(decode_pool, "MIN_PER_WORKER", 4)
    one = prepare(folder_zip, config_for(tmp_path, folder_zip, state="a", decode_workers=1))
    two = prepare(folder_zip, config_for(tmp_path, folder_zip, state="b", decode_workers=2))
    assert load_prepared(one)[1]["digest"] == load_prepared(two)[1]["digest"]


def test_rerun_reuses_the_prepared_folder(tmp_path, folder_zip, monkeypatch):
    config = config_for(tmp_path, folder_zip)
    out = prepare(folder_zip, config)

    def never(*args, **kwargs):
        raise AssertionError("the archive should not be read again")

    monkeypatch.setattr(prepare_module, "read_dataset", never)
    assert prepare(folder_zip, config) == out


def test_settings_that_change_the_output_change_the_folder(tmp_path, folder_zip):
    config = config_for(tmp_path, folder_zip)
    out = prepare(folder_zip, config)
    assert prepare(folder_zip, config.replace(seed=1)) != out
    assert prepare(folder_zip, config.replace(val_fraction=0.25)) != out


def test_max_train_images_is_a_stratified_cap(tmp_path, folder_zip):
    _, manifest = load_prepared(prepare(folder_zip, config_for(tmp_path, folder_zip, max_train_images=12)))
    assert manifest["sizes"]["train"] == 12
    assert set(manifest["counts"]["train"].values()) == {3}


def test_split_indices_are_stratified_and_seeded():
    labels = np.repeat(np.arange(3), 20)
    a = split_indices(labels, {"val": 0.25}, seed=0)
    assert np.bincount(labels[a["val"]]).tolist() == [5, 5, 5]
    assert np.array_equal(a["val"], split_indices(labels, {"val": 0.25}, seed=0)["val"])
    assert not np.array_equal(a["val"], split_indices(labels, {"val": 0.25}, seed=1)["val"])


# --- validation: each failure names the file and what to do ------------------------------------
PNG = syn.encode(syn.make_images(1, ["a"])[0][0])


def _files(layout: dict[str, int], broken: tuple[str, ...] = ()) -> dict[str, bytes]:
    """{"<folder>": image count} -> archive contents; ``broken`` names extra unreadable files."""
    files = {f"{folder}/{i}.png": PNG for folder, n in layout.items() for i in range(n)}
    return files | {name: b"broken" for name in broken}


@pytest.mark.parametrize("files, overrides, error, pattern", [
    (_files({"cat": 10}), {}, DatasetError, r": found 1 class \(\['cat'\]\); .* at least 2 class folders"),
    (_files({"cat": 50, "dog": 55}, broken=("bird/0.png",)), {}, DatasetError,
     r": class folder\(s\) \['bird'\] have no readable images; add images or remove"),
    (_files({"train/cat": 5, "train/dog": 5, "train/frog": 5, "test/cat": 2, "test/dog": 2}), {}, DatasetError,
     r": label sets differ .* only in train \['frog'\], only in test \[\]; give both splits"),
    (_files({"test/a": 3, "test/b": 3}), {}, DatasetError, r": the archive has a test/ folder but no train/ folder"),
    (_files({"cat": 10, "dog": 10}, broken=("cat/bad.png",)), {}, ArchiveError,
     r": 1 of 21 images are unreadable .* e\.g\. cat/bad\.png: .*Fix or remove those files"),
], ids=["one-class", "empty-class", "label-sets-differ", "test-without-train", "too-many-unreadable"])
def test_unusable_archives_fail_naming_the_file_and_the_fix(tmp_path, files, overrides, error, pattern):
    archive = syn.folder_zip(tmp_path / "bad_data.zip", files)
    with pytest.raises(error, match=r"bad_data\.zip" + pattern):
        prepare(archive, config_for(tmp_path, archive, **overrides))


def test_unreadable_images_below_the_threshold_are_recorded(tmp_path):
    archive = syn.folder_zip(tmp_path / "bad.zip", _files({"cat": 60, "dog": 60}, broken=("cat/bad.png",)))
    _, manifest = load_prepared(prepare(archive, config_for(tmp_path, archive)))
    assert manifest["unreadable_images"] == 1 and manifest["image_files"] == 121
    assert manifest["unreadable_examples"][0].startswith("cat/bad.png: ")


def test_too_few_images_for_a_split_says_what_to_change(tmp_path):
    archive = syn.image_folder_zip(tmp_path / "tiny.zip", per_class=2, classes=["cat", "dog"])
    with pytest.raises(DatasetError, match=r"tiny\.zip: split 'val' has no images of class.*val_fraction/test_fraction"):
        prepare(archive, config_for(tmp_path, archive))


@pytest.mark.parametrize("val, test", [(0.6, 0.5), (-0.1, 0.2), (0.1, 1.0)])
def test_impossible_fractions_fail_before_any_work(tmp_path, folder_zip, val, test, monkeypatch):
    monkeypatch.setattr(prepare_module, "file_digest", lambda *a: pytest.fail("should fail before reading"))
    with pytest.raises(DatasetError, match=r"must each be in \[0, 1\) and sum to less than 1"):
        prepare(folder_zip, config_for(tmp_path, folder_zip, val_fraction=val, test_fraction=test))


def test_wrong_shapes_are_refused():
    good = (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 0, 1]))
    bad = (np.zeros((4, 28, 28, 3), np.uint8), np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"x\.zip: val images have shape \(4, 28, 28, 3\) uint8; expected"):
        validate({"train": good, "val": bad, "test": good}, ["a", "b"], "x.zip")
    validate({"train": good, "val": good, "test": good}, ["a", "b"])


def test_a_failed_prepare_leaves_no_folder(tmp_path):
    archive = syn.image_folder_zip(tmp_path / "one.zip", per_class=10, classes=["cat"])
    config = config_for(tmp_path, archive)
    with pytest.raises(DatasetError):
        prepare(archive, config)
    prepared = config.data_dir / "prepared"
    assert not prepared.exists() or list(prepared.iterdir()) == []


# --- a full disk while writing: a clear error, nothing partial kept, a later run succeeds -------
class _FillingFile(io.FileIO):
    """A file on a disk with ``budget`` bytes free: the write that crosses it writes what fits, then
    fails with ENOSPC, as a real full disk does."""

    def __init__(self, path, budget: int, failures: list):
        super().__init__(path, "wb")
        self.left, self.failures = budget, failures

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n <= self.left:
            self.left -= n
            return super().write(data)
        super().write(memoryview(data).cast("B")[:self.left])
        self.flush()
        self.failures.append((Path(self.name), os.path.getsize(self.name)))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)


def _check_disk_full_left_nothing(info, config) -> None:
    """The error says disk full, where and what to do; no prepared folder (complete-looking or partial)."""
    prepared = config.data_dir / "prepared"
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert f"disk full: no space left to write the prepared data in {prepared} " in message
    assert re.search(r"needs about [0-9.]+ MB, [0-9.]+ MB free there now", message), message
    assert "nothing partial was kept" in message and "CIFAR10_STATE_DIR" in message and "rerun" in message
    assert list(prepared.iterdir()) == []  # neither the final folder nor a .partial-* one


def _save_on_full_disk(savez, file, arrays, failures) -> None:
    with _FillingFile(file, 16384, failures) as f:
        savez(f, **arrays)


def test_full_disk_while_writing_fails_clearly_and_keeps_nothing(tmp_path, folder_zip, monkeypatch):
    """Simulated full disk (works anywhere): writing data.npz fails with ENOSPC after 16 KiB."""
    config = config_for(tmp_path, folder_zip)
    failures: list = []
    savez = np.savez
    monkeypatch.setattr(np, "savez", lambda file, **arrays: _save_on_full_disk(savez, file, arrays, failures))
    with pytest.raises(OSError) as info:
        prepare(folder_zip, config)
    assert failures and failures[0][1] == 16384  # a partial data.npz was on disk when the write failed ...
    assert not failures[0][0].exists()  # ... and is gone
    _check_disk_full_left_nothing(info, config)

    monkeypatch.undo()  # space is free again: the rerun succeeds with the same data as a clean run
    out = prepare(folder_zip, config)
    reference = prepare(folder_zip, config_for(tmp_path, folder_zip, state="reference"))
    assert load_prepared(out)[1]["digest"] == load_prepared(reference)[1]["digest"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs at ``tmp_path/disk``; skipped, saying why, where mounting is not permitted
    (the simulated test above covers the same code path there). Yields a function that resizes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a tmpfs; the simulated full-disk test still runs")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); "
                    "the simulated full-disk test still runs")

    def resize(size: str) -> None:
        subprocess.run([mount, "-o", f"remount,size={size}", str(disk)], check=True, capture_output=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_real_full_disk_fails_clearly_keeps_nothing_and_a_rerun_with_space_succeeds(tmp_path, folder_zip,
                                                                                      small_disk):
    """The state folder on a 64 KiB tmpfs: the 40 images (~120 KB of arrays) do not fit."""
    config = config_for(tmp_path, folder_zip, state="disk/state")
    with pytest.raises(OSError) as info:
        prepare(folder_zip, config)
    _check_disk_full_left_nothing(info, config)

    small_disk("1m")  # the operator frees space; the same task, rerun, succeeds
    out = prepare(folder_zip, config)
    reference = prepare(folder_zip, config_for(tmp_path, folder_zip, state="reference"))
    assert load_prepared(out)[1]["digest"] == load_prepared(reference)[1]["digest"]
