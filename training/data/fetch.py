"""Fetch a dataset URL into a local, checksummed cache.

``http(s)://``, ``s3://`` (:mod:`training.storage`: the standard AWS settings, short timeouts, errors
that name what to fix), ``file://`` and plain paths, local ones only under the data roots
(:func:`check_source`): whoever triggers a run chooses the URL. A download is renamed into the cache,
keyed by URL and checksum, only when complete and verified, so a partial file is never taken for data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable

from training import storage
from training.config import OFFICIAL_SHA256, OFFICIAL_URL, PipelineConfig, mask_password

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PROGRESS_SECONDS = 5.0
HEX_LENGTH = {"sha256": 64, "md5": 32}
# What data_url may be; a URL without a scheme is a local path.
SCHEMES = ("http", "https", "s3", "file")


class FetchError(RuntimeError):
    """The dataset could not be fetched or failed its checksum."""


def parse_checksum(spec: str) -> tuple[str, str] | None:
    """``"sha256:ab.."``, ``"md5:ab.."`` or bare hex (length picks) -> (algo, hex)."""
    spec = (spec or "").strip().lower()
    if not spec:
        return None
    if ":" in spec:
        algo, digest = spec.split(":", 1)
    else:
        algo, digest = ("md5" if len(spec) == 32 else "sha256"), spec
    if algo not in HEX_LENGTH:
        raise FetchError(f"checksum algorithm {algo!r} in data_checksum={spec!r} is not supported; "
                         "use sha256:<hex> or md5:<hex>")
    if len(digest) != HEX_LENGTH[algo] or any(c not in "0123456789abcdef" for c in digest):
        raise FetchError(f"data_checksum={spec!r} is not a {algo} digest ({HEX_LENGTH[algo]} hex digits); "
                         "fix the data_checksum param, e.g. sha256:<64 hex digits> or md5:<32 hex digits>")
    return algo, digest


def expected_checksum(config: PipelineConfig) -> tuple[str, str] | None:
    """The checksum to verify: the configured one, or the official release's."""
    parsed = parse_checksum(config.data_checksum)
    if parsed is None and config.data_url == OFFICIAL_URL:
        parsed = ("sha256", OFFICIAL_SHA256)
    return parsed


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of the file at ``path`` (``algo``: sha256 or md5)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def local_path(url: str) -> Path | None:
    """The local file that ``url`` names (``file://`` or a plain path), or None for any other scheme."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(url).expanduser() if not parsed.scheme else None


def check_source(url: str, roots: tuple[Path, ...]) -> None:
    """Raise ValueError, saying what to change, for another scheme or a local file outside ``roots``
    (links followed first, so a link inside a root cannot point outside it)."""
    parsed = urllib.parse.urlparse(url)
    shown = mask_password(url)
    if parsed.scheme and parsed.scheme.lower() not in SCHEMES:
        raise ValueError(f"data_url {shown!r} has the scheme {parsed.scheme!r}; use http(s)://, s3://, file:// "
                         "or a local path")
    if parsed.scheme.lower() == "file" and parsed.netloc not in ("", "localhost"):
        raise ValueError(f"data_url {shown!r} names the host {parsed.netloc!r}; a file URL is local: "
                         "file:///absolute/path.zip")
    path = local_path(url)
    if path is None:
        return
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ValueError(
            f"data_url {shown!r} is the local file {resolved}, outside the data roots "
            f"({os.pathsep.join(str(r) for r in roots)}). Put the archive in one of them, or add its folder to "
            f"CIFAR10_DATA_ROOTS (folders separated by {os.pathsep!r}) in the environment Airflow's workers start with "
            "(`make run DATA_URL=file://...` adds the folder of its DATA_URL itself)")


def _cache_path(config: PipelineConfig, url: str, checksum: tuple[str, str] | None) -> Path:
    key = hashlib.sha256(f"{url}|{checksum}".encode()).hexdigest()[:16]
    name = Path(urllib.parse.urlparse(url).path).name or "dataset"
    return config.data_dir / "downloads" / f"{key}-{name}"


def _open_source(url: str) -> tuple[BinaryIO, int | None, Callable[[], None]]:
    """Open ``url`` for streaming; returns (stream, size or None, closer)."""
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in {"http", "https"}:
        try:
            resp = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (scheme checked)
        except OSError as exc:
            raise FetchError(
                f"cannot download {url}: {exc}. Check the URL; if this machine is offline, point the "
                "pipeline at a local archive, e.g. DATA_URL=file:///path/to/cifar10-train-jpeg.zip make run"
            ) from exc
        size = resp.headers.get("Content-Length")
        return resp, int(size) if size else None, resp.close
    if scheme == "s3":
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if not bucket or not key:
            raise FetchError(f"{url} is not an S3 object URL; write s3://bucket/path/to/archive.zip")
        try:
            with storage.explained(bucket, key):
                obj = storage.client().get_object(Bucket=bucket, Key=key)
        except storage.StorageError as exc:
            raise FetchError(f"cannot read {url}: {exc}") from exc
        body = obj["Body"]
        return body, int(obj.get("ContentLength") or 0) or None, body.close
    path = local_path(url)
    if path is not None:
        if not path.is_file():
            raise FetchError(f"no such file: {path} (from {url}). Check the path; file URLs look like file:///abs/path.zip")
        f = open(path, "rb")
        return f, path.stat().st_size, f.close
    raise FetchError(f"unsupported URL scheme {scheme!r} in {url}; use http(s)://, file://, s3:// or a local path")


def fetch(config: PipelineConfig) -> Path:
    """Download ``config.data_url`` into the cache and verify it; return the local path."""
    url = config.data_url
    check_source(url, config.data_root_paths)
    checksum = expected_checksum(config)
    target = _cache_path(config, url, checksum)
    if target.is_file():
        if checksum is None or file_digest(target, checksum[0]) == checksum[1]:
            log.info("cache hit: %s -> %s", url, target)
            return target
        log.warning("cached %s does not match %s:%s any more; downloading again", target, *checksum)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target.parent)
    stream, size, close = _open_source(url)
    fd, tmp_name = tempfile.mkstemp(prefix=".partial-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s (%s) -> %s", url, _size_text(size) if size else "size unknown", target)
        start = time.monotonic()
        with os.fdopen(fd, "wb") as out:
            done, digest = _copy(stream, out, url, size, checksum[0] if checksum else None)
        if size is not None and done != size:
            raise FetchError(f"download of {url} is truncated: got {done} of {size} bytes; rerun the task to retry")
        if checksum and digest != checksum[1]:
            raise FetchError(
                f"checksum mismatch for {url}: expected {checksum[0]}:{checksum[1]}, "
                f"got {checksum[0]}:{digest}. The file is corrupt or not the one "
                "you meant; fix the URL or the data_checksum param."
            )
        os.replace(tmp, target)
        log.info("fetched %s (%d bytes in %.1f s) -> %s", url, done, time.monotonic() - start, target)
    finally:
        close()
        tmp.unlink(missing_ok=True)
    return target


def _copy(stream: BinaryIO, out: BinaryIO, url: str, size: int | None, algo: str | None) -> tuple[int, str | None]:
    """Copy ``stream`` to ``out`` (synced), logging progress; return the bytes copied and their ``algo`` digest."""
    hasher = hashlib.new(algo) if algo else None
    done, start = 0, time.monotonic()
    last_log = start
    while chunk := _read_chunk(stream, url):
        out.write(chunk)
        if hasher:
            hasher.update(chunk)
        done += len(chunk)
        now = time.monotonic()
        if now - last_log >= PROGRESS_SECONDS:
            pct = f" of {_size_text(size)} ({100 * done / size:.0f}%)" if size else ""
            log.info("downloading %s: %d bytes%s, %.1f MB/s", url, done, pct, done / 2**20 / max(now - start, 1e-9))
            last_log = now
    out.flush()
    os.fsync(out.fileno())
    return done, hasher.hexdigest() if hasher else None


def _read_chunk(stream: BinaryIO, url: str) -> bytes:
    try:
        return stream.read(CHUNK)
    except Exception as exc:  # connection reset, IncompleteRead, botocore read timeouts, ...
        raise FetchError(f"download of {url} broke off: {exc}; rerun the task to retry") from exc


def _size_text(size: int | None) -> str:
    return f"{size} bytes = {size / 2**20:.1f} MB" if size else "?"


def _remove_stale_partials(folder: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove ``.partial-*`` files left by killed runs (never used, only taking space)."""
    now = time.time()
    for path in folder.glob(".partial-*"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
        except OSError:  # a concurrent run removed or renamed it
            pass
