"""S3 access for the pipeline: one boto3 client configuration and errors that say what to fix.

boto3 alone reads the standard AWS settings: credentials (``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``, profiles, instance roles), region, and the endpoint
(``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``), so MinIO, SeaweedFS and other
S3-compatible stores work without any setting of ours. Nothing here logs credentials.

The client gives up quickly: a wrong endpoint fails in seconds, not after botocore's
retry loop. :func:`check_bucket` is a preflight for anything that is about to write
to (or read from) a bucket: it raises :class:`StorageError` naming the endpoint, the
bucket and the setting to change.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

# Seconds to wait for a TCP connection: an S3 endpoint on a working network answers in far less.
CONNECT_TIMEOUT_S = 5
# Seconds without a byte from a connected endpoint (large archives stream for minutes, but never stall).
READ_TIMEOUT_S = 60
# Attempts per request, the first included: one retry absorbs a transient blip; more only delays the error.
MAX_ATTEMPTS = 2

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                    "InvalidToken", "TokenRefreshRequired", "403", "Forbidden"}


class StorageError(RuntimeError):
    """An S3 request failed; the message says what was wrong and which setting to fix."""


def client(endpoint: str | None = None):
    """A boto3 S3 client with short timeouts and one retry.

    Its endpoint is ``endpoint``, else the standard AWS environment's; credentials and region
    always come from the environment.
    """
    import boto3  # lazy: only S3 users pay for it
    from botocore.config import Config

    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"})
    # A session of its own: boto3's default one keeps the first credentials it found for the
    # life of the process (and is not safe to share between threads).
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def split_url(url_or_bucket: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); a bare bucket name -> (bucket, "")."""
    if "://" not in url_or_bucket:
        return url_or_bucket.strip("/"), ""
    parts = urlsplit(url_or_bucket)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(f"{url_or_bucket!r} is not an S3 URL; write s3://bucket/key or s3://bucket/prefix/")
    return parts.netloc, parts.path.lstrip("/")


def endpoint_source(endpoint: str | None = None, setting: str = "") -> str:
    """Where the endpoint comes from, in words, e.g. ``http://s3:8333 (from AWS_ENDPOINT_URL_S3)``.

    ``endpoint`` is one the caller chose, from the setting named ``setting``; None means boto3's own
    choice from the environment.
    """
    if endpoint is not None:
        return f"{endpoint} (from {setting})" if setting else endpoint
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return f"{os.environ[name]} (from {name})"
    return ("AWS's own endpoint (neither AWS_ENDPOINT_URL_S3 nor AWS_ENDPOINT_URL is set; set one for "
            "MinIO, SeaweedFS or another S3-compatible store)")


def explain(exc: BaseException, bucket: str, key: str = "", endpoint: str | None = None,
            setting: str = "") -> str:
    """What a failed S3 request on ``bucket``/``key`` means and what to do, in one message."""
    from botocore.exceptions import ConnectionError, HTTPClientError, NoCredentialsError

    where = endpoint_source(endpoint, setting)
    cause = _client_error(exc)
    if cause is not None:
        code = str(cause.response.get("Error", {}).get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code in {"404", "NotFound"} and not key):
            return (f"bucket {bucket!r} does not exist at {where}: create it (e.g. "
                    f"`aws s3 mb s3://{bucket}`, or the store's console) or fix the bucket in the URL")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return (f"no object {key!r} in bucket {bucket!r} at {where}: check the key in the URL "
                    f"(s3://{bucket}/{key}) or upload the object first")
        if code in CREDENTIAL_CODES or status == 403:
            return (f"{where} refused the credentials for bucket {bucket!r} ({code}): check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and that this user may "
                    "read and write the bucket")
        return f"S3 error {code or status} on s3://{bucket}/{key} at {where}: {cause}"
    if isinstance(exc, NoCredentialsError):
        return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE, or give the machine an instance role) to reach s3://{bucket} at {where}")
    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return (f"cannot reach the S3 endpoint {where}: {exc}. Check that the store is running and that "
                "this endpoint URL names the right host and port")
    return f"S3 request on s3://{bucket}/{key} at {where} failed: {exc}"


def _client_error(exc: BaseException):
    """The botocore ``ClientError`` behind ``exc``: boto3's upload and download helpers wrap it."""
    from botocore.exceptions import ClientError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ClientError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextmanager
def explained(bucket: str, key: str = "", endpoint: str | None = None, setting: str = "") -> Iterator[None]:
    """Turn botocore/boto3 errors inside the block into :class:`StorageError` with :func:`explain`."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        raise StorageError(explain(exc, bucket, key, endpoint, setting)) from exc


def check_bucket(url_or_bucket: str, endpoint: str | None = None, setting: str = "") -> None:
    """Raise :class:`StorageError` unless the bucket of ``url_or_bucket`` exists and these credentials reach it.

    ``endpoint`` overrides the environment's (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) for a
    service that takes its endpoint from another setting; name that setting in ``setting`` (e.g.
    ``check_bucket(destination, os.environ["MLFLOW_S3_ENDPOINT_URL"], "MLFLOW_S3_ENDPOINT_URL")``)
    so the message says what to change.
    """
    bucket, _ = split_url(url_or_bucket)
    if not bucket:
        raise StorageError(f"no bucket in {url_or_bucket!r}; write s3://bucket/prefix/")
    with explained(bucket, endpoint=endpoint, setting=setting):
        client(endpoint).head_bucket(Bucket=bucket)
