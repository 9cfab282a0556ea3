"""BentoML models travel through S3 (moto's server) from one store to another via the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, bentoml_cli_json, state_env
from tests.helpers import FAKE_AWS, moto_s3, s3_keys

MAKE_MODEL = """
import bentoml, pathlib
with bentoml.models.create("tiny-model", labels={"mlflow_run_id": "abc"}) as m:
    (pathlib.Path(m.path) / "weights.bin").write_bytes(b"0123456789")
print(m.tag)
"""


def _cli(env, *args) -> str:
    out = subprocess.run([sys.executable, "-m", "training.packaging.bento_store", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


# five subprocesses that import BentoML: about a minute on 2 busy cores
def test_model_round_trip_through_s3(tmp_path):
    with moto_s3("bentos") as endpoint:
        source = state_env(tmp_path / "a", AWS_ENDPOINT_URL_S3=endpoint, **FAKE_AWS)
        target = state_env(tmp_path / "b", AWS_ENDPOINT_URL_S3=endpoint, **FAKE_AWS)
        tag = subprocess.run([sys.executable, "-c", MAKE_MODEL], env=source, capture_output=True, text=True,
                             check=True, timeout=120).stdout.strip().splitlines()[-1]
        uri = _cli(source, "export-model", tag, "s3://bentos/models/")
        assert uri == f"s3://bentos/models/{tag.replace(':', '-')}.bentomodel"
        assert s3_keys(endpoint, "bentos") == [uri.removeprefix("s3://bentos/")]
        # A prefix imports the newest archive under it; a second import is a no-op, not an error.
        assert _cli(target, "import-model", "s3://bentos/models/") == tag
        assert _cli(target, "import-model", uri) == tag
        imported = bentoml_cli_json(target, "models", "get", tag)
        assert imported["labels"] == {"mlflow_run_id": "abc"}
        assert (tmp_path / "b" / "bentoml" / "models" / "tiny-model").is_dir()


def test_bad_uri_and_missing_archive_say_what_to_do(tmp_path):
    from training.packaging.bento_store import _resolve_key, _split

    with pytest.raises(ValueError, match="not an S3 URI"):
        _split("/local/path")
    with moto_s3("empty") as endpoint:
        from tests.helpers import s3_client

        with pytest.raises(FileNotFoundError, match="export one first"):
            _resolve_key(s3_client(endpoint), "s3://empty/bentos/", ".bento")
