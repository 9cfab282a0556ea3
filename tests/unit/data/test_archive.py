"""Reading archives: both formats, all layouts, hostile archives refused, unreadable images counted.

Covers ``training.data.archive`` (safety), ``training.data.formats`` (the two dataset formats) and
``training.data.decode_pool`` (parallel decoding gives the same result as in-process).
"""

from __future__ import annotations

import os
import tarfile
import zipfile

import numpy as np
import pytest

from tests import helpers as syn
from training.data import decode_pool
from training.data.archive import ArchiveError, SafeArchive
from training.data.formats import read_dataset

LIMITS = {"max_members": 1000, "max_bytes": 50 * 2**20, "max_bad_fraction": 0.0}


def read(path, **overrides):
    return read_dataset(path, **(LIMITS | overrides))


@pytest.fixture
def small_pool(monkeypatch):
    """Let tiny fixtures use real worker processes."""
    monkeypatch.setattr(decode_pool, "MIN_PER_WORKER", 4)


# --- formats and layouts -------------------------------------------------------------
def test_binary_release_parses_records_with_numpy(tmp_path):
    raw = read(syn.binary_release(tmp_path / "cifar-10-binary.tar.gz", per_class=4, test_per_class=2))
    assert raw.class_names == syn.CLASSES
    assert raw.images.shape == (60, 32, 32, 3) and raw.images.dtype == np.uint8
    assert (raw.split == "test").sum() == 20 and (raw.split == "train").sum() == 40
    assert np.bincount(raw.labels).tolist() == [6] * 10
    # Pixels survive the channel-planar record layout: compare with the generator.
    x, y = syn.make_images(2, syn.CLASSES, seed=0)
    order = np.random.default_rng(0).permutation(len(y))
    np.testing.assert_array_equal(raw.images[:20], x[order])
    np.testing.assert_array_equal(raw.labels[:20], y[order])


def test_binary_release_with_truncated_batch_is_refused(tmp_path):
    path = tmp_path / "cut.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        syn._add_tar_file(tf, "cifar-10-batches-bin/data_batch_1.bin", bytes(3073 * 2 + 5))
    with pytest.raises(ArchiveError, match=r"cut\.tar\.gz: data_batch_1\.bin .* truncated"):
        read(path)


def test_pickled_python_release_is_refused_without_unpickling(tmp_path):
    with pytest.raises(ArchiveError, match=r"py\.tar\.gz is the pickled python release.*never unpickled"):
        read(syn.pickled_release(tmp_path / "py.tar.gz"))


@pytest.mark.parametrize("maker, name", [
    (lambda p, s: syn.image_folder_zip(p, per_class=3, with_split=s), "data.zip"),
    (lambda p, s: syn.image_folder_tar(p, per_class=3, with_split=s), "data.tar.gz"),
])
@pytest.mark.parametrize("with_split", [False, True])
def test_image_folder_archives_with_and_without_split(tmp_path, maker, name, with_split):
    raw = read(maker(tmp_path / name, with_split))
    assert raw.class_names == sorted(syn.CLASSES)
    assert len(raw.labels) == 30 and raw.images.shape == (30, 32, 32, 3)
    assert np.bincount(raw.labels).tolist() == [3] * 10
    if with_split:
        assert set(raw.split) == {"train", "test"}
    else:
        assert raw.split is None
    assert raw.bad_files == []


def test_plain_tar_and_decoded_pixels_match_the_source(tmp_path):
    raw = read(syn.plain_tar(tmp_path / "data.tar", per_class=2))
    x, _ = syn.make_images(2, syn.CLASSES[:3])
    assert raw.class_names == sorted(syn.CLASSES[:3])
    np.testing.assert_array_equal(raw.images, x)  # PNG is lossless and already 32x32


def test_wrapping_folder_is_dropped_and_odd_files_ignored(tmp_path):
    png = syn.encode(syn.make_images(1, ["a"])[0][0])
    path = syn.folder_zip(tmp_path / "w.zip", {
        "cifar/train/cat/1.png": png, "cifar/train/dog/1.png": png,
        "cifar/test/cat/2.png": png, "cifar/test/dog/2.png": png,
        "cifar/README.txt": b"hello", "cifar/train/cat/.DS_Store": b"x", "__MACOSX/cifar/train/cat/._1.png": b"x",
    })
    raw = read(path)
    assert raw.class_names == ["cat", "dog"] and sorted(raw.split) == ["test", "test", "train", "train"]


def test_too_deep_layout_is_refused_naming_the_member(tmp_path):
    png = syn.encode(syn.make_images(1, ["a"])[0][0])
    path = syn.folder_zip(tmp_path / "deep.zip", {"a/b/c/1.png": png, "x/y/z/2.png": png})
    with pytest.raises(ArchiveError, match=r"deep\.zip: member 'a/b/c/1\.png' is not laid out"):
        read(path)


def test_mixed_layouts_are_refused(tmp_path):
    png = syn.encode(syn.make_images(1, ["a"])[0][0])
    path = syn.folder_zip(tmp_path / "mixed.zip", {"train/cat/1.png": png, "dog/2.png": png})
    with pytest.raises(ArchiveError, match=r"mixed\.zip mixes .* use one"):
        read(path)


def test_archive_without_images_is_refused(tmp_path):
    path = syn.folder_zip(tmp_path / "docs.zip", {"notes/readme.txt": b"hi"})
    with pytest.raises(ArchiveError, match=r"docs\.zip holds no images.*right archive"):
        read(path)


def test_tar_ending_in_a_zip_is_read_as_a_tar(tmp_path):
    inner = syn.image_folder_zip(tmp_path / "inner.zip", per_class=1)
    path = syn.plain_tar(tmp_path / "outer.tar", per_class=2)
    with tarfile.open(path, "a") as tf:
        tf.add(inner, arcname="extras/inner.zip")
    assert zipfile.is_zipfile(path)  # the trap: the zip's end record is near the tar's end
    raw = read(path)
    assert raw.class_names == sorted(syn.CLASSES[:3]) and len(raw.labels) == 6


def test_truncated_download_is_refused_as_damaged(tmp_path):
    full = syn.image_folder_zip(tmp_path / "full.zip", per_class=2).read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ArchiveError, match=r"cut\.zip is a damaged zip archive .*download it again"):
        read(path)


def test_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(ArchiveError, match=r"page\.html is neither a zip nor a tar archive"):
        read(path)


# --- hostile archives ----------------------------------------------------------------
HOSTILE = {
    "traversal": r"contains '\.\.' \(path traversal\)",
    "absolute": "absolute or Windows path",
    "windows": "absolute or Windows path",
    "symlink": "links are refused",
    "hardlink": "links are refused",
    "device": "device",
    "fifo": "fifo",
}


@pytest.mark.parametrize("fmt, kind", [("tar", kind) for kind in HOSTILE]
                         + [("zip", kind) for kind in HOSTILE if kind != "hardlink"])  # zip has no hard links
def test_hostile_archives_are_refused_and_nothing_is_written(tmp_path, monkeypatch, fmt, kind):
    message = HOSTILE[kind]
    path = (syn.hostile_zip if fmt == "zip" else syn.hostile_tar)(tmp_path / f"hostile.{fmt}", kind)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ArchiveError, match=message) as info:
        read(path)
    assert str(path) in str(info.value) and "refus" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing extracted, here or anywhere relative


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_bomb_by_size_is_refused_from_declared_sizes(tmp_path, fmt):
    path = syn.bomb_by_size(tmp_path / f"bomb.{fmt}", megabytes=8, fmt=fmt)
    assert path.stat().st_size < 200_000  # small on disk, large unpacked
    with pytest.raises(ArchiveError, match=r"bomb\.\w+ would unpack to more than 4,194,304 bytes.*MAX_ARCHIVE_BYTES"):
        read(path, max_bytes=4 * 2**20)


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_bomb_by_count_is_refused(tmp_path, fmt):
    path = syn.bomb_by_count(tmp_path / f"many.{fmt}", members=300, fmt=fmt)
    with pytest.raises(ArchiveError, match=r"many\.\w+ has more than 100 members.*MAX_ARCHIVE_MEMBERS"):
        read(path, max_members=100)


def test_zip_count_is_checked_before_the_central_directory_is_parsed(tmp_path, monkeypatch):
    path = syn.bomb_by_count(tmp_path / "many.zip", members=300)

    def never(*args, **kwargs):
        raise AssertionError("ZipFile should not be opened for an over-count archive")

    monkeypatch.setattr(zipfile, "ZipFile", never)
    with pytest.raises(ArchiveError, match="more than 100 members"):
        SafeArchive(path, max_members=100, max_bytes=2**30)


@pytest.mark.parametrize("workers", [1, 2])
def test_zip_member_inflating_beyond_its_declared_size_is_refused(tmp_path, small_pool, workers):
    path = syn.zip_lying_size(tmp_path / "liar.zip")
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("cat/liar.png").file_size == 100  # the lie is in place
    with pytest.raises(ArchiveError, match=r"liar\.zip: member 'cat/liar\.png' inflates beyond .* zip bomb"):
        read(path, workers=workers)


# --- unreadable images -----------------------------------------------------------------
def _with_corrupt(tmp_path, good_per_class=10, corrupt=1):
    x, y = syn.make_images(good_per_class, ["cat", "dog"])
    files = {f"{['cat', 'dog'][label]}/{i}.png": syn.encode(img) for i, (img, label) in enumerate(zip(x, y))}
    for i in range(corrupt):
        files[f"cat/broken{i}.jpg"] = b"\xff\xd8\xff\xe0 truncated"
    return syn.folder_zip(tmp_path / "some_bad.zip", files)


def test_unreadable_images_are_counted_and_skipped_below_the_threshold(tmp_path):
    raw = read(_with_corrupt(tmp_path), max_bad_fraction=0.1)
    assert len(raw.labels) == 20 and raw.total_files == 21
    assert len(raw.bad_files) == 1 and raw.bad_files[0].startswith("cat/broken0.jpg: ")


def test_too_many_unreadable_images_fail_naming_examples(tmp_path):
    with pytest.raises(ArchiveError) as info:
        read(_with_corrupt(tmp_path, corrupt=3), max_bad_fraction=0.1)
    message = str(info.value)
    assert "some_bad.zip: 3 of 23 images are unreadable" in message
    assert "cat/broken0.jpg" in message and "MAX_BAD_IMAGE_FRACTION" in message


def test_corrupt_zip_member_crc_counts_as_unreadable(tmp_path):
    raw = read(syn.zip_bad_crc(tmp_path / "crc.zip"), max_bad_fraction=0.5)
    assert len(raw.bad_files) == 1 and "CRC" in raw.bad_files[0]


def test_oversized_member_is_unreadable_without_being_read(tmp_path, monkeypatch):
    from training.data import formats

    monkeypatch.setattr(formats, "MAX_IMAGE_BYTES", 50)
    raw = read(syn.plain_tar(tmp_path / "d.tar", per_class=1), max_bad_fraction=1.0)
    assert len(raw.bad_files) == 3 and "over the 50-byte limit" in raw.bad_files[0]


# --- parallel decoding -----------------------------------------------------------------
@pytest.mark.parametrize("maker", [
    lambda p: syn.image_folder_zip(p / "a.zip", per_class=6, fmt="JPEG"),
    lambda p: syn.image_folder_tar(p / "a.tar.gz", per_class=6, with_split=True),
    lambda p: _with_corrupt(p, corrupt=2),
])
def test_workers_give_the_same_result_as_in_process(tmp_path, small_pool, maker):
    path = maker(tmp_path)
    one = read(path, workers=1, max_bad_fraction=0.5)
    two = read(path, workers=2, max_bad_fraction=0.5)
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.labels, two.labels)
    assert one.bad_files == two.bad_files


def test_tar_members_are_decoded_in_chunks(tmp_path, small_pool, monkeypatch):
    from training.data import formats

    monkeypatch.setattr(formats, "TAR_CHUNK_BYTES", 2000)  # a few PNGs per chunk
    path = syn.plain_tar(tmp_path / "d.tar", per_class=4)
    np.testing.assert_array_equal(read(path, workers=2).images, read(path, workers=1).images)


def test_a_crashing_worker_is_reported_not_hung(small_pool):
    out = decode_pool.shared_images(8)

    def make_read():
        def read(i):
            if i == 5:
                os._exit(3)  # simulate a crash inside a native decoder
            return syn.encode(np.zeros((32, 32, 3), np.uint8))
        return read

    with pytest.raises(decode_pool.WorkerError, match="died with exit code 3.*decode_workers=1"):
        decode_pool.decode_into(out, 0, 8, make_read, workers=2)


def _prepare_in_daemon(path, result):
    raw = read(path, workers=2)
    result.put(len(raw.labels))


def test_workers_can_start_inside_a_daemonic_process(tmp_path, small_pool):
    # Executor and Celery workers are daemonic; multiprocessing refuses children there.
    import multiprocessing

    path = syn.image_folder_zip(tmp_path / "a.zip", per_class=2)
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    proc = ctx.Process(target=_prepare_in_daemon, args=(path, result), daemon=True)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and result.get(timeout=5) == 20


def test_an_interrupted_parent_leaves_no_worker_behind(small_pool, monkeypatch):
    import pickle
    import time

    def make_read():
        def read(i):
            time.sleep(30)  # a slow worker, still running when the parent is interrupted
            return b""
        return read

    def interrupted(pipe):  # the parent is interrupted while waiting for the first result
        raise KeyboardInterrupt

    monkeypatch.setattr(pickle, "load", interrupted)
    before = _children()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        decode_pool.decode_into(decode_pool.shared_images(8), 0, 8, make_read, workers=2)
    assert time.monotonic() - start < 10  # workers were killed, not waited for
    # ...and reaped: no new child is left, not even a zombie. Compared with the children from
    # before, since a session-wide test server may be a child of this process too.
    assert _children() - before == set()


def _children() -> set[int]:
    """This process's child pids (zombies included, as they are until reaped), from /proc."""
    me, children = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            if ppid == me:
                children.add(int(entry))
    return children
