"""Fair scoring for the gate: both models' exported ONNX (what a Bento runs) on the challenger's test
split. The champion's stored accuracy was measured on other images whenever the data changed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Images per ONNX Runtime call: large enough to amortise the call, small enough for any machine.
EVAL_BATCH = 256


@dataclass(frozen=True)
class Score:
    """One model's accuracy on one split, overall and per class."""

    accuracy: float
    per_class: dict[str, float]


@dataclass(frozen=True)
class Comparison:
    """What the gate compares: both models on the challenger's test split."""

    dataset_digest: str
    test_images: int
    challenger: Score
    champion: Score | None = None
    champion_version: str | None = None
    champion_dataset_digest: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def score(session, x: np.ndarray, y: np.ndarray, class_names: list[str]) -> Score:
    """Accuracy of the ONNX ``session`` on uint8 images ``x`` with labels ``y``."""
    name = session.get_inputs()[0].name
    predicted = np.concatenate([session.run(None, {name: x[i:i + EVAL_BATCH].astype(np.float32)})[0].argmax(1)
                                for i in range(0, len(x), EVAL_BATCH)])
    per_class = {cls: float(np.mean(predicted[y == i] == i)) if np.any(y == i) else float("nan")
                 for i, cls in enumerate(class_names)}
    return Score(float(np.mean(predicted == y)), per_class)


def onnx_of_run(run_id: str, folder: Path):
    """The ONNX Runtime session and class names of a training run's exported model."""
    import mlflow

    from serving.model import onnx_session

    src = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx", dst_path=str(folder)))
    return onnx_session(src / "model.onnx"), json.loads((src / "classes.json").read_text())


def compare(client, run_id: str, champion, prepared_dir: Path) -> Comparison:
    """Score run ``run_id``'s model and the ``champion`` model version (or None) on ``prepared_dir``'s test split."""
    from training.data.prepare import load_prepared

    splits, manifest = load_prepared(Path(prepared_dir))
    x, y = splits["test"]
    class_names = manifest["class_names"]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        session, classes = onnx_of_run(run_id, Path(tmp) / "challenger")
        if classes != class_names:
            raise ValueError(f"run {run_id}'s model has classes {classes}, the prepared data {class_names}")
        challenger = score(session, x, y, class_names)
        if champion is None:
            return Comparison(manifest["digest"], int(len(y)), challenger)
        champion_digest = client.get_run(champion.run_id).data.tags.get("dataset_digest", "")
        session, classes = onnx_of_run(champion.run_id, Path(tmp) / "champion")
        if classes != class_names:
            raise ValueError(f"the champion (version {champion.version}) has classes {classes}, this run's data "
                             f"{class_names}: the two models do not answer the same question; set force_promote "
                             "to replace it anyway")
        if champion_digest != manifest["digest"]:
            notes.append("the champion was trained on other data (dataset digest "
                         f"{champion_digest[:16] or 'unknown'}): both were rescored on this run's test split, "
                         "which may include images the champion trained on")
        return Comparison(manifest["digest"], int(len(y)), challenger, score(session, x, y, class_names),
                          str(champion.version), champion_digest, notes)
