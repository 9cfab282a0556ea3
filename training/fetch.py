"""Fetch a dataset URL into a local, checksummed cache.

Supported: ``http(s)://``, ``file://``, plain local paths, and ``s3://bucket/key``
through boto3 (endpoint and credentials from the standard AWS environment, so MinIO
and other S3-compatible stores work). Downloads go to a temporary file that is
renamed only when complete and verified, so a partial file is never taken as the
dataset. The cache is keyed by URL and expected checksum: a rerun costs nothing.
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

from training.config import OFFICIAL_SHA256, OFFICIAL_URL, PipelineConfig

log = logging.getLogger(__name__)

CHUNK = 1 << 20


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
    if algo not in {"sha256", "md5"}:
        raise FetchError(f"checksum algorithm {algo!r} is not supported; use sha256:<hex> or md5:<hex>")
    return algo, digest


def expected_checksum(config: PipelineConfig) -> tuple[str, str] | None:
    """The checksum to verify: the configured one, or the official release's."""
    parsed = parse_checksum(config.data_checksum)
    if parsed is None and config.data_url == OFFICIAL_URL:
        parsed = ("sha256", OFFICIAL_SHA256)
    return parsed


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
                f"cannot reach {url}: {exc}. If this machine is offline, point the pipeline at a "
                "local archive, e.g. DATA_URL=file:///path/to/cifar10-train-jpeg.zip make run"
            ) from exc
        size = resp.headers.get("Content-Length")
        return resp, int(size) if size else None, resp.close
    if scheme == "s3":
        import boto3  # lazy: only S3 users pay for it

        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:  # botocore raises many types; all mean "not fetched"
            raise FetchError(f"cannot read {url} from S3: {exc}. Check the bucket, key and AWS_* credentials.") from exc
        body = obj["Body"]
        return body, int(obj.get("ContentLength") or 0) or None, body.close
    if scheme in {"file", ""}:
        path = Path(urllib.request.url2pathname(parsed.path) if scheme == "file" else url).expanduser()
        if not path.is_file():
            raise FetchError(f"no such file: {path} (from {url}). Check the path; file URLs look like file:///abs/path.zip")
        f = open(path, "rb")
        return f, path.stat().st_size, f.close
    raise FetchError(f"unsupported URL scheme {scheme!r} in {url}; use http(s)://, file://, s3:// or a local path")


def fetch(config: PipelineConfig) -> Path:
    """Download ``config.data_url`` into the cache and verify it; return the local path."""
    url = config.data_url
    checksum = expected_checksum(config)
    target = _cache_path(config, url, checksum)
    if target.is_file():
        log.info("cache hit: %s -> %s", url, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    stream, size, close = _open_source(url)
    hasher = hashlib.new(checksum[0]) if checksum else None
    fd, tmp_name = tempfile.mkstemp(prefix=".partial-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        done, last_log, start = 0, 0.0, time.monotonic()
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                out.write(chunk)
                if hasher:
                    hasher.update(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last_log > 5:
                    pct = f" ({100 * done / size:.0f}%)" if size else ""
                    log.info("downloading %s: %d MB%s", url, done >> 20, pct)
                    last_log = now
            out.flush()
            os.fsync(out.fileno())
        if size is not None and done != size:
            raise FetchError(f"download of {url} is truncated: got {done} of {size} bytes; rerun to retry")
        if hasher and checksum and hasher.hexdigest() != checksum[1]:
            raise FetchError(
                f"checksum mismatch for {url}: expected {checksum[0]}:{checksum[1]}, "
                f"got {checksum[0]}:{hasher.hexdigest()}. The file is corrupt or not the one "
                "you meant; fix the URL or the data_checksum param."
            )
        os.replace(tmp, target)
        log.info("fetched %s (%d bytes in %.1f s) -> %s", url, done, time.monotonic() - start, target)
    finally:
        close()
        if tmp.exists():
            tmp.unlink()
    return target

