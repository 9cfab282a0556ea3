"""serving/lineage.py: the lineage header values from a model's labels and the Bento's tag."""

from __future__ import annotations

from serving import lineage
from serving.openapi import amend_spec

LABELS = {"mlflow_model": "cifar10-cnn", "mlflow_version": "3", "mlflow_run_id": "r1", "project": "x"}


def test_headers_name_the_bento_model_and_mlflow_lineage():
    assert lineage.lineage_headers(LABELS, "cifar10-cnn:m1", "cifar10-classifier:b1", "int8") == {
        "X-Bento-Tag": "cifar10-classifier:b1", "X-BentoML-Model": "cifar10-cnn:m1", "X-MLflow-Model": "cifar10-cnn",
        "X-MLflow-Model-Version": "3", "X-MLflow-Run-Id": "r1", "X-Model-Precision": "int8"}


def test_from_source_there_is_no_bento_and_missing_labels_are_empty():
    values = lineage.lineage_headers({}, "cifar10-cnn:m1", None, "float")
    assert values["X-Bento-Tag"] == "not a bento" == lineage.NOT_A_BENTO
    assert [values[k] for k in ("X-MLflow-Model", "X-MLflow-Model-Version", "X-MLflow-Run-Id")] == ["", "", ""]
    assert list(values) == list(lineage.HEADERS)  # every documented header has a value, and no other


def test_spec_documents_the_headers_on_model_routes_only():
    ok = {"200": {"description": "Successful Response"}}
    spec = {"paths": {"/predict": {"post": {"responses": dict(ok)}},
                      "/metadata": {"post": {"responses": {"200": dict(ok["200"])}}}}}
    amended = amend_spec(spec, {"/predict": {"file"}, "/metadata": set()})
    headers = amended["paths"]["/predict"]["post"]["responses"]["200"]["headers"]
    assert headers["X-MLflow-Run-Id"] == {"description": lineage.HEADERS["X-MLflow-Run-Id"],
                                          "schema": {"type": "string"}}
    assert list(headers) == [*lineage.HEADERS, *lineage.ANSWER_HEADERS]  # a one-image route gives its answer too
    assert "headers" not in amended["paths"]["/metadata"]["post"]["responses"]["200"]


def test_answer_headers_carry_label_and_confidence():
    assert lineage.answer_headers("cat", 0.91234567) == {"X-Predicted-Class": "cat", "X-Confidence": "0.912346"}
    assert list(lineage.answer_headers("cat", 1.0)) == list(lineage.ANSWER_HEADERS)
