"""A local S3-compatible endpoint for tests: moto's server mode on a free port."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from e2e_helpers import free_port

# Fake credentials for the throw-away moto endpoint; moto accepts any.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 with ``bucket`` created; yield its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3_client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"])


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """All keys under ``prefix`` in ``bucket``."""
    keys: list[str] = []
    for page in s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys
