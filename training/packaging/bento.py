"""From an MLflow model version to a Bento: import into the BentoML store, then build.

The BentoML model holds the ONNX export (what ``service.py`` runs) and the class
names; its labels name the MLflow model, version and run, so any served prediction
can be traced back to its training run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from training.config import PipelineConfig, mask_password

log = logging.getLogger(__name__)
# The BentoML model's name (service.py's default tag) and the Bento's (bentofile.yaml's ``name``).
BENTO_MODEL_NAME = "cifar10-cnn"
BENTO_NAME = "cifar10-classifier"

PROJECT_DIR = Path(__file__).resolve().parents[2]


def use_bentoml_home(config: PipelineConfig):
    """Import bentoml with its store at ``config``'s BentoML home (``BENTOML_HOME`` in the environment wins).

    BentoML reads ``BENTOML_HOME`` once, the first time its store is used, so the variable is
    set before that; a process whose bentoml already settled on another home raises instead
    of writing to the wrong store.
    """
    home = Path(os.environ.get("BENTOML_HOME") or config.bentoml_home_path)
    os.environ["BENTOML_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    import bentoml

    # BentoML settles on its home the first time anything asks for it, then keeps it; it has no
    # public accessor for the one it settled on.
    from bentoml._internal.configuration.containers import BentoMLContainer

    active = Path(BentoMLContainer.bentoml_home.get())
    if active.resolve() != home.resolve():
        raise RuntimeError(f"bentoml already uses its store at {active}, not {home} that the pipeline chose: "
                           "set BENTOML_HOME before anything uses bentoml, or import it only through "
                           "training.packaging.bento.use_bentoml_home")
    return bentoml


def import_version(config: PipelineConfig, version_uri: str) -> str:
    """Import MLflow model version ``version_uri`` (``models:/<name>/<version>``) into the BentoML store.

    Returns the BentoML model tag. Idempotent: when the store already has a model from
    the same MLflow run, its tag is returned. The ONNX file must answer a fixed batch of random
    pixels as the Keras model does (:func:`~training.model.export.check_parity`), or the import fails.
    """
    import mlflow
    from mlflow import MlflowClient

    from training.registry.promotion import split_uri
    from training.registry.tracking import configure_mlflow

    configure_mlflow(config)
    client = MlflowClient()
    name, version = split_uri(version_uri)
    mv = client.get_model_version(name, version)
    bentoml = use_bentoml_home(config)
    existing = _model_of_run(bentoml, BENTO_MODEL_NAME, mv.run_id)
    if existing:
        log.info("BentoML store already holds %s for run %s", existing, mv.run_id)
        return existing
    labels = {"mlflow_model": name, "mlflow_version": str(mv.version), "mlflow_run_id": mv.run_id}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="onnx", dst_path=tmp))
        diff = _keras_parity(f"models:/{name}/{mv.version}", src / "model.onnx")
        metadata = _metadata(config, client.get_run(mv.run_id), src, diff)
        with bentoml.models.create(BENTO_MODEL_NAME, labels=labels, metadata=metadata) as model:
            for file in ("model.onnx", "classes.json"):
                shutil.copy(src / file, Path(model.path) / file)
    log.info("imported %s version %s (run %s) as BentoML model %s", name, mv.version, mv.run_id, model.tag)
    return str(model.tag)


def _model_of_run(bentoml, model_name: str, run_id: str) -> str | None:
    """The tag of a BentoML model ``model_name`` imported from MLflow run ``run_id``, if the store has one."""
    try:
        models = bentoml.models.list(model_name)
    except bentoml.exceptions.NotFound:
        return None
    return next((str(m.tag) for m in models if m.info.labels.get("mlflow_run_id") == run_id), None)


def _keras_parity(model_uri: str, onnx_path: Path) -> float:
    """Max difference between the ONNX file's and the logged Keras model's answers to 16 random images."""
    import mlflow

    from serving.model import onnx_session
    from training.model.export import check_parity, onnx_probabilities
    # The saved model names the network's custom layers and activations; under a scheduler
    # this task runs in its own process, where nothing else has registered them.
    import training.model.network  # noqa: F401

    pixels = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    keras_answers = np.asarray(mlflow.keras.load_model(model_uri)(pixels, training=False))
    return check_parity(onnx_probabilities(onnx_session(onnx_path), pixels), keras_answers,
                        f"{model_uri}: its ONNX file vs its Keras model")


def _metadata(config: PipelineConfig, run, src: Path, onnx_max_abs_diff: float) -> dict:
    """What the BentoML model carries for /metadata, the image's labels and the drift score."""
    from training.model.train import DRIFT_REFERENCE

    metadata = {
        "test_accuracy": float(run.data.metrics.get("test_accuracy", float("nan"))),
        "dataset_digest": run.data.tags.get("dataset_digest", ""),
        "git_commit": run.data.tags.get("git_commit", ""),
        "class_names": json.loads((src / "classes.json").read_text()),
        "onnx_max_abs_diff": onnx_max_abs_diff,
        "mlflow_tracking_uri": mask_password(config.tracking_uri),  # never bake a password into a Bento
    }
    reference = src / DRIFT_REFERENCE
    if reference.exists():  # versions trained before drift monitoring have none; they serve without a score
        metadata["drift_reference"] = json.loads(reference.read_text())
    return metadata


def build_bento(config: PipelineConfig, model_tag: str) -> str:
    """Build the Bento from ``bentofile.yaml`` with ``model_tag`` pinned; return the Bento tag."""
    bentoml = use_bentoml_home(config)
    model = bentoml.models.get(model_tag)
    # The tag travels as a Bento argument (bentoml.use_arguments in service.py), so
    # the Bento serves exactly this model, wherever it is served or containerized.
    bento = bentoml.bentos.build_bentofile(
        str(PROJECT_DIR / "bentofile.yaml"), build_ctx=str(PROJECT_DIR),
        labels={**model.info.labels, "bentoml_model": model_tag}, args={"model_tag": model_tag},
    )
    log.info("built Bento %s at %s", bento.tag, bento.path)
    return str(bento.tag)


def bento_model_tag(bento) -> str:
    """The BentoML model the Bento serves: its ``bentoml_model`` label, else the one model packed in it."""
    tag = bento.info.labels.get("bentoml_model")
    if tag:
        return tag
    if len(bento.info.models) != 1:
        raise ValueError(f"Bento {bento.tag} has no bentoml_model label and {len(bento.info.models)} models: "
                         "build it with training.packaging.bento.build_bento, which names its model")
    return str(bento.info.models[0].tag)


def bento_of_run(config: PipelineConfig, run_id: str) -> str | None:
    """The newest Bento in the store built from MLflow run ``run_id``'s model, or None."""
    bentoml = use_bentoml_home(config)
    try:
        bentos = bentoml.bentos.list(BENTO_NAME)
    except bentoml.exceptions.NotFound:
        return None
    mine = [b for b in bentos if b.info.labels.get("mlflow_run_id") == run_id]
    return str(max(mine, key=lambda b: b.info.creation_time).tag) if mine else None
