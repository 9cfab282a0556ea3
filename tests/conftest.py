"""Shared fixtures.

``serving_model``: a tiny Keras CNN exported to ONNX and stored as a BentoML model in a
temporary BentoML home, with the same files, labels and metadata as
``training.bento.import_champion`` writes, so ``service.py`` can be served against it
without MLflow or a trained model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_helpers import free_port, stop_server  # noqa: F401 (re-exported for tests and bench)

ROOT = Path(__file__).resolve().parent.parent

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
                        name: str = "cifar10-cnn", tta: bool = False) -> str:
    """Build an untrained ``build_model(widths)``, export it to ONNX, store it under ``home``; return its tag.

    With ``tta``, flip test-time augmentation is inside, as in the models training exports.

    With ``keras_path``, the Keras model is also saved there (the seed-style benchmark baseline loads it).

    Must run in a process whose ``BENTOML_HOME`` is ``home`` before bentoml is imported
    (bentoml reads it once): :func:`make_serving_model` does that in a subprocess.
    """
    import tempfile

    import bentoml
    import numpy as np

    from tests.synthetic import CLASSES
    from training.export import export_onnx
    from training.model import build_model, with_flip_tta

    model = build_model(widths, num_classes=len(CLASSES))
    if tta:
        model = with_flip_tta(model)
    if keras_path:
        model.save(keras_path)
    sample = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        diff = export_onnx(model, Path(tmp) / "model.onnx", sample)
        metadata = {**FAKE_METADATA, "class_names": CLASSES, "onnx_max_abs_diff": diff,
                    "mlflow_tracking_uri": "sqlite:///nowhere.db"}
        with bentoml.models.create(name, labels=FAKE_LABELS, metadata=metadata) as stored:
            (Path(stored.path) / "model.onnx").write_bytes((Path(tmp) / "model.onnx").read_bytes())
            (Path(stored.path) / "classes.json").write_text(json.dumps(CLASSES))
    return str(stored.tag)


def make_serving_model(home: Path, widths: tuple[int, ...] = (8, 16), keras_path: str | None = None,
                       tta: bool = False) -> str:
    """Run :func:`build_serving_model` in a fresh interpreter with ``BENTOML_HOME=home``; return the tag."""
    home.mkdir(parents=True, exist_ok=True)
    code = ("from pathlib import Path; from tests.conftest import build_serving_model; "
            f"print('TAG=' + build_serving_model(Path({str(home)!r}), {tuple(widths)!r}, {keras_path!r}, "
            f"tta={tta!r}))")
    env = {**os.environ, "BENTOML_HOME": str(home), "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    tags = [line[4:] for line in out.stdout.splitlines() if line.startswith("TAG=")]
    if out.returncode or not tags:
        raise RuntimeError(f"building the test BentoML model failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    return tags[-1]


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory) -> ServingModel:
    """A tiny ONNX CIFAR-10 model in a temporary BentoML store (built once per test session)."""
    home = tmp_path_factory.mktemp("bentoml-home")
    tag = make_serving_model(home)
    from tests.synthetic import CLASSES

    return ServingModel(home=home, tag=tag, labels=dict(FAKE_LABELS),
                        metadata={**FAKE_METADATA, "class_names": CLASSES})


def serve_service(serving_model: ServingModel, log: Path, extra_env: dict[str, str]):
    """Start ``bentoml serve service.py`` on a free port with the test model; return (process, base URL)."""
    import time

    import httpx

    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(serving_model.home), "BENTOML_DO_NOT_TRACK": "True",
           "PYTHONPATH": str(ROOT), **extra_env}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", "service:CIFAR10Classifier", "--port", str(port),
             "--arg", f"model_tag={serving_model.tag}"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc) if proc.poll() is None else None
            raise RuntimeError(f"bentoml serve did not get ready:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
