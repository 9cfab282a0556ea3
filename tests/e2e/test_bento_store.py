"""Bentos and BentoML models travel through S3 (a real SeaweedFS server) from one store to another via the CLI;
serving imports exactly the champion's Bento, as the registry records it, or nothing."""

from __future__ import annotations

import hashlib
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
    archive = s3_client(s3_bucket.endpoint).get_object(Bucket=s3_bucket.name, Key=uri.removeprefix(s3_bucket.url()))
    digest = hashlib.sha256(archive["Body"].read()).hexdigest()
    # An archive with another sha256 than the one given is refused; a second import is a no-op, not an error.
    assert "its sha256 is " + digest + ", not the " + "0" * 64 + " on record" in _refused(
        target, "import-model", uri, "--sha256", "0" * 64)
    assert _cli(target, "import-model", uri, "--sha256", digest) == tag
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
    message = _refused({**env, "AWS_ENDPOINT_URL_S3": closed}, "import-model", s3_bucket.url("models/x.bentomodel"))
    assert f"cannot reach the S3 endpoint {closed} (from AWS_ENDPOINT_URL_S3)" in message


def test_an_import_names_one_archive_never_the_newest_under_a_prefix(tmp_path, s3_bucket):
    from training.packaging.bento_store import _split

    with pytest.raises(ValueError, match="not an S3 URI"):
        _split("/local/path")
    message = _refused(state_env(tmp_path / "b", **s3_bucket.env), "import-model", s3_bucket.url("models/"))
    assert f"{s3_bucket.url('models/')} is not a *.bentomodel archive: name its full key" in message


# --- serving imports the champion's Bento -----------------------------------------------

MAKE_BENTOS = """
import pathlib, sys, bentoml
src = pathlib.Path(sys.argv[1])
src.mkdir(parents=True, exist_ok=True)
for answer in ("served", "other"):
    (src / "tiny_service.py").write_text(
        "import bentoml\\n\\n@bentoml.service\\nclass Tiny:\\n    @bentoml.api\\n"
        f"    def hello(self) -> str:\\n        return {answer!r}\\n")
    print(bentoml.bentos.build("tiny_service:Tiny", name="tiny-bento", include=["tiny_service.py"],
                               build_ctx=str(src)).tag)
"""

# The champion (version 1) as the pipeline leaves it: its Bento published and recorded, then a newer archive
# lands under the same prefix (another run's Bento, or anyone who can write to the bucket).
PUBLISH = """
import sys, time
from training.config import load_config
from training.packaging.bento_store import export_bento
from training.packaging.bento_store import publish_bento
from training.registry.promotion import client_for
champion, newer = sys.argv[1:3]
config = load_config()
client = client_for(config)
name = config.registered_model_name
client.create_registered_model(name)
version = client.create_model_version(name, source="s3://nowhere/model").version
client.set_model_version_tag(name, version, "bento_tag", champion)  # as promote records it
print(publish_bento(config, f"models:/{name}/{version}", champion))
client.set_registered_model_alias(name, "champion", version)
time.sleep(1.1)  # S3 keeps LastModified in whole seconds: the other archive is strictly newer
print(export_bento(config, newer, config.bento_export_uri).uri)
"""


@pytest.fixture(scope="module")
def bentos(tmp_path_factory):
    """A store with two Bentos of a tiny service; (folder, [the champion's tag, another tag])."""
    folder = tmp_path_factory.mktemp("bentos")
    out = subprocess.run([sys.executable, "-c", MAKE_BENTOS, str(folder / "src")], env=state_env(folder),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder, out.stdout.split()[-2:]


@pytest.fixture
def published(tmp_path, s3_bucket, bentos):
    """The champion's Bento published and recorded in a registry of this test's own, and a newer archive beside it."""
    folder, (champion, newer) = bentos
    env = state_env(folder, **s3_bucket.env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
                    CIFAR10_BENTO_EXPORT_URI=s3_bucket.url("bentos/"))
    out = subprocess.run([sys.executable, "-c", PUBLISH, champion, newer], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    champion_uri, newer_uri = out.stdout.split()[-2:]
    s3 = s3_client(s3_bucket.endpoint)
    listed = s3.list_objects_v2(Bucket=s3_bucket.name, Prefix="bentos/")["Contents"]
    newest = max(listed, key=lambda o: o["LastModified"])["Key"]
    assert s3_bucket.url(newest) == newer_uri != champion_uri  # what "the newest archive" would have picked
    # The serving machine: an empty store, the registry and the bucket.
    serving = state_env(tmp_path / "serving", **s3_bucket.env, MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"])
    return {"serving": serving, "champion": champion, "newer": newer, "champion_uri": champion_uri,
            "newer_uri": newer_uri, "s3": s3, "bucket": s3_bucket}


def _bento_tags(env) -> list[str]:
    return sorted(b["tag"] for b in bentoml_cli_json(env, "list"))


def test_serving_imports_the_champions_bento_even_when_a_newer_archive_is_in_the_bucket(published):
    assert _cli(published["serving"], "import") == published["champion"]
    assert _bento_tags(published["serving"]) == [published["champion"]]


def test_serving_refuses_a_replaced_champion_archive_and_imports_nothing(published):
    bucket = published["bucket"]
    key = published["champion_uri"].removeprefix(bucket.url())
    other = published["s3"].get_object(Bucket=bucket.name, Key=published["newer_uri"].removeprefix(bucket.url()))
    forged = other["Body"].read()  # a valid Bento archive, but not the one publish recorded
    published["s3"].put_object(Bucket=bucket.name, Key=key, Body=forged)
    message = _refused(published["serving"], "import")
    assert (f"refusing {published['champion_uri']}: its sha256 is {hashlib.sha256(forged).hexdigest()}, not the "
            in message and "on record; the object was replaced after it was published. Nothing was imported" in message)
    assert _bento_tags(published["serving"]) == []


def test_nothing_to_import_before_a_champion_is_published(tmp_path, s3_bucket):
    env = state_env(tmp_path / "serving", **s3_bucket.env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    out = _run(env, "import")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "import: nothing to import yet: no cifar10-cnn version holds the champion alias yet" in out.stderr
