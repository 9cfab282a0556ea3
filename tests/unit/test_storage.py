"""S3 preflight and error messages, against a real S3 server (SeaweedFS) and a closed port."""

from __future__ import annotations

import time

import pytest

from tests.helpers import FAKE_AWS, free_port, s3_client
from training import storage
from training.storage import StorageError, check_bucket


@pytest.fixture
def aws_env(monkeypatch):
    """FAKE_AWS and no endpoint variable: each test says where its endpoint comes from."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)


def test_an_existing_bucket_passes_by_name_or_url(s3_bucket, aws_env, monkeypatch):
    check_bucket(s3_bucket.name, s3_bucket.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint)
    check_bucket(s3_bucket.url("mlflow/"))


def test_a_missing_bucket_is_named_with_the_setting_that_holds_the_endpoint(s3_server, aws_env):
    with pytest.raises(StorageError) as info:
        check_bucket("s3://not-created/mlflow", s3_server, "MLFLOW_S3_ENDPOINT_URL")
    assert str(info.value) == (
        f"bucket 'not-created' does not exist at {s3_server} (from MLFLOW_S3_ENDPOINT_URL): create it "
        "(e.g. `aws s3 mb s3://not-created`, or the store's console) or fix the bucket in the URL")


def test_refused_credentials_say_which_variables_to_check(s3_bucket, aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint)
    with pytest.raises(StorageError, match=rf"{s3_bucket.endpoint} \(from AWS_ENDPOINT_URL_S3\) refused the "
                                           rf"credentials for bucket '{s3_bucket.name}' \(403\): check "
                                           r"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        check_bucket(s3_bucket.name)


def test_a_closed_port_fails_in_seconds_and_names_the_endpoint(aws_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint {endpoint} \(from AWS_ENDPOINT_URL\): "
                                           r".*Check that the store is running"):
        check_bucket("s3://artifacts/")
    assert time.monotonic() - start < 15  # botocore's default retry loop takes far longer


def test_without_an_endpoint_variable_the_message_says_to_set_one(aws_env):
    assert "neither AWS_ENDPOINT_URL_S3 nor AWS_ENDPOINT_URL is set" in storage.endpoint_source()


def test_an_upload_error_is_explained_through_boto3s_wrapper(s3_server, aws_env, tmp_path):
    """boto3's upload_file raises S3UploadFailedError around the ClientError that says what happened."""
    archive = tmp_path / "a.bento"
    archive.write_bytes(b"x")
    with pytest.raises(StorageError, match=r"bucket 'not-there' does not exist at "):
        with storage.explained("not-there", "bentos/a.bento"):
            storage.client(s3_server).upload_file(str(archive), "not-there", "bentos/a.bento")
    assert "not-there" not in {b["Name"] for b in s3_client(s3_server).list_buckets()["Buckets"]}  # not auto-created


@pytest.mark.parametrize("value", ["http://host/bucket", "s3://", ""])
def test_what_is_not_an_s3_bucket_is_refused(value):
    with pytest.raises(StorageError, match=r"not an S3 URL|no bucket in"):
        check_bucket(value)
