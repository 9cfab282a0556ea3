"""The lineage headers: every prediction answer names the Bento, BentoML model and MLflow model behind it."""

from __future__ import annotations

# Served from source (``bentoml serve service.py``) there is no Bento to name.
NOT_A_BENTO = "not a bento"
# Header names and what each says (the OpenAPI document's descriptions). Clients and the served-artifact
# check read these exact names.
HEADERS = {
    "X-Bento-Tag": f"The Bento's name:version, or '{NOT_A_BENTO}' when served from source",
    "X-BentoML-Model": "The BentoML model tag",
    "X-MLflow-Model": "The MLflow registered model the BentoML model was imported from",
    "X-MLflow-Model-Version": "That registered model's version",
    "X-MLflow-Run-Id": "The MLflow run that trained it",
    "X-Model-Precision": "The model file this server runs: float or int8 (/metadata says why)",
}
# /predict's answer in headers too: the front door logs them, to compare a shadowed challenger with the champion
# request by request (training/deploy/shadow.py) without reading bodies.
ANSWER_HEADERS = {
    "X-Predicted-Class": "The predicted class name (the body's label)",
    "X-Confidence": "The predicted class's probability (the body's confidence)",
}


def answer_headers(label: str, confidence: float) -> dict[str, str]:
    """The :data:`ANSWER_HEADERS` values for one answer."""
    return {"X-Predicted-Class": label, "X-Confidence": f"{confidence:.6f}"}


def lineage_headers(labels: dict[str, str], model_tag: str, bento_tag: str | None, precision: str) -> dict[str, str]:
    """The :data:`HEADERS` values for a BentoML model with ``labels`` and ``model_tag``, in ``bento_tag`` if any,
    served in ``precision``.

    An MLflow label the model lacks (one not imported by the pipeline) is an empty value, as in /metadata.
    """
    return {
        "X-Bento-Tag": bento_tag or NOT_A_BENTO,
        "X-BentoML-Model": model_tag,
        "X-MLflow-Model": labels.get("mlflow_model", ""),
        "X-MLflow-Model-Version": labels.get("mlflow_version", ""),
        "X-MLflow-Run-Id": labels.get("mlflow_run_id", ""),
        "X-Model-Precision": precision,
    }
