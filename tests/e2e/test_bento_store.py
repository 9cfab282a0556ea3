"""BentoML models travel through S3 (a real SeaweedFS server) from one store to another via the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, bentoml_cli_json, free_port, state_env
from tests.helpers import s3_client, s3_keys

MAKE_MODEL = """
import bentoml, pathlib
with bentoml.models.create("tiny-model", labels={"mlflow_run_id": "abc"}) as m:
    (pathlib.Path(m.path) / "weights.bin").write_bytes(b"0123456789")
print(m.tag)
"""


def _run(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.packaging.bento_store", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def _cli(env, *args) -> str:
    out = _run(env, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def _refused(env, *args) -> str:
    """The CLI's one-line error (exit status 2, no traceback)."""
    out = _run(env, *args)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    """A store holding one tiny model (built once: each BentoML subprocess takes seconds); (folder, tag)."""
    folder = tmp_path_factory.mktemp("source")
    tag = subprocess.run([sys.executable, "-c", MAKE_MODEL], env=state_env(folder), capture_output=True,
                         text=True, check=True, timeout=120).stdout.strip().splitlines()[-1]
    return folder, tag


@pytest.fixture
def source(model_store, s3_bucket):
    """That store with this test's bucket settings; (env, model tag)."""
    folder, tag = model_store
    return state_env(folder, **s3_bucket.env), tag


# four subprocesses that import BentoML: up to a minute and a half on 2 busy cores
def test_model_round_trip_through_s3(tmp_path, s3_bucket, source):
    env, tag = source
    target = state_env(tmp_path / "b", **s3_bucket.env)
    uri = _cli(env, "export-model", tag, s3_bucket.url("models/"))
    assert uri == s3_bucket.url(f"models/{tag.replace(':', '-')}.bentomodel")
    assert s3_keys(s3_bucket.endpoint, s3_bucket.name) == [uri.removeprefix(s3_bucket.url())]
    # A prefix imports the newest archive under it; a second import is a no-op, not an error.
    assert _cli(target, "import-model", s3_bucket.url("models/")) == tag
    assert _cli(target, "import-model", uri) == tag
    imported = bentoml_cli_json(target, "models", "get", tag)
    assert imported["labels"] == {"mlflow_run_id": "abc"}
    assert (tmp_path / "b" / "bentoml" / "models" / "tiny-model").is_dir()


def test_export_to_a_missing_bucket_says_to_create_it(s3_bucket, source):
    env, tag = source
    message = _refused(env, "export-model", tag, "s3://not-created-yet/models/")
    assert f"bucket 'not-created-yet' does not exist at {s3_bucket.endpoint} (from AWS_ENDPOINT_URL_S3)" in message
    assert "create it" in message
    assert "not-created-yet" not in {b["Name"] for b in s3_client(s3_bucket.endpoint).list_buckets()["Buckets"]}


def test_import_of_a_missing_key_or_from_a_closed_port_says_what_to_fix(tmp_path, s3_bucket):
    env = state_env(tmp_path / "b", **s3_bucket.env)
    message = _refused(env, "import-model", s3_bucket.url("models/nope.bentomodel"))
    assert f"no object 'models/nope.bentomodel' in bucket '{s3_bucket.name}'" in message
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    message = _refused({**env, "AWS_ENDPOINT_URL_S3": closed}, "import-model", s3_bucket.url("models/"))
    assert f"cannot reach the S3 endpoint {closed} (from AWS_ENDPOINT_URL_S3)" in message


def test_bad_uri_and_missing_archive_say_what_to_do(s3_bucket):
    from training.packaging.bento_store import _resolve_key, _split

    with pytest.raises(ValueError, match="not an S3 URI"):
        _split("/local/path")
    with pytest.raises(FileNotFoundError, match="export one first"):
        _resolve_key(s3_client(s3_bucket.endpoint), s3_bucket.url("bentos/"), ".bento")
