"""serving/precision.py: the rule that lets int8 be served, and one choice per server, measured once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from serving import precision
from serving.precision import Precision, choose, decide

ACCURATE = {"precision": {"setting": "auto", "accurate": True}}


@pytest.mark.parametrize("setting, accurate, float_s, int8_s, served, why", [
    ("auto", True, 600, 1250, "int8", "keeps float's answers and is 2.08x as fast here"),
    ("auto", True, 600, 650, "float", "int8 is not 1.1x as fast here"),  # faster, but within the noise
    ("auto", True, 900, 700, "float", "int8 is not 1.1x as fast here"),  # a CPU where int8 does not pay
    ("auto", False, 600, 1250, "float", "loses more than 0.2 points of test accuracy or agrees with float on under 99%"),
    ("float", True, 600, 1250, "float", "precision=float forces it"),
    ("int8", False, 900, 700, "int8", "precision=int8 forces it"),
])
def test_the_rule(setting, accurate, float_s, int8_s, served, why):
    choice = decide(setting, accurate, float_s, int8_s)
    assert choice.served == served and why in choice.why
    assert choice.file == ("model.int8.onnx" if served == "int8" else "model.onnx")


def test_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="precision 'fp16': use one of auto, float, int8"):
        decide("fp16", True)


def _model(folder: Path, int8: bool = True) -> Path:
    (folder / "model.onnx").write_bytes(b"float")
    if int8:
        (folder / "model.int8.onnx").write_bytes(b"int8")
    return folder


def test_without_a_measurement_where_nothing_is_to_choose(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_speeds", lambda folder: pytest.fail("measured where nothing is to choose"))
    assert choose(_model(tmp_path, int8=False), ACCURATE, "s1", tmp_path) == Precision(
        "float", "the model has no int8 candidate")
    assert choose(_model(tmp_path), {}, "s1", tmp_path).served == "float"  # a model from before the candidate
    assert choose(_model(tmp_path), {"precision": {"setting": "int8", "accurate": False}}, "s1", tmp_path).served == "int8"
    assert choose(_model(tmp_path), {"precision": {"setting": "auto", "accurate": False}}, "s1", tmp_path).served == "float"


def test_one_measurement_per_key_serves_every_worker_and_later_server(tmp_path, monkeypatch):
    calls = []

    def speeds(folder):
        calls.append(folder)
        return (600.0, 1250.0) if len(calls) == 1 else (900.0, 700.0)  # a second measurement would disagree

    monkeypatch.setattr(precision, "_speeds", speeds)
    results = []
    workers = [threading.Thread(target=lambda: results.append(choose(_model(tmp_path), ACCURATE, "srv", tmp_path)))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(calls) == 1 and {r.served for r in results} == {"int8"}
    assert results[0].float_img_s == 600.0 and results[0].int8_img_s == 1250.0
    # A later server of the same model here (the same key) serves what the first measured: a restart or a
    # rollback answers as before, though a new measurement would disagree.
    assert choose(_model(tmp_path), ACCURATE, "srv", tmp_path).served == "int8" and len(calls) == 1
    # Another model or CPU (another key) measures for itself.
    assert choose(_model(tmp_path), ACCURATE, "another", tmp_path).served == "float" and len(calls) == 2


def test_the_measurement_key_names_the_model_and_the_cpu(monkeypatch):
    key = precision.measurement_key("cifar10-cnn:abc")
    assert key == precision.measurement_key("cifar10-cnn:abc") and len(key) == 16
    assert key != precision.measurement_key("cifar10-cnn:def")
    monkeypatch.setattr(precision.os, "cpu_count", lambda: 1024)
    assert key != precision.measurement_key("cifar10-cnn:abc")
