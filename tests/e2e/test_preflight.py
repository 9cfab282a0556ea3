"""The preflight's S3 checks against a real S3 server (SeaweedFS): a missing bucket, refused keys."""

from __future__ import annotations

import subprocess

from tests.helpers import BIN, FAKE_AWS, ROOT, seaweed_s3


def _preflight(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "python"), "-m", "training.deploy.preflight", "s3"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_s3_checks_pass_fail_on_a_missing_bucket_and_on_refused_keys(tmp_path):
    with seaweed_s3("cifar10", root=tmp_path / "s3") as endpoint:
        base = {"PATH": str(BIN), **FAKE_AWS, "AWS_ENDPOINT_URL_S3": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}

        ok = _preflight({**base, "MLFLOW_ARTIFACTS_DESTINATION": "s3://cifar10/mlflow",
                         "CIFAR10_BENTO_EXPORT_URI": "s3://cifar10/bentos/"})
        assert ok.returncode == 0, ok.stderr
        assert "MLFLOW_ARTIFACTS_DESTINATION ok" in ok.stdout and "CIFAR10_BENTO_EXPORT_URI ok" in ok.stdout

        missing = _preflight({**base, "CIFAR10_BENTO_EXPORT_URI": "s3://no-such-bucket/bentos/"})
        assert missing.returncode == 1
        assert "CIFAR10_BENTO_EXPORT_URI=s3://no-such-bucket/bentos/" in missing.stderr, missing.stderr
        assert f"bucket 'no-such-bucket' does not exist at {endpoint}" in missing.stderr

        refused = _preflight({**base, "AWS_SECRET_ACCESS_KEY": "not-the-key",
                              "MLFLOW_ARTIFACTS_DESTINATION": "s3://cifar10/mlflow"})
        assert refused.returncode == 1
        assert "refused the credentials" in refused.stderr and "AWS_SECRET_ACCESS_KEY" in refused.stderr, \
            refused.stderr
