"""training.params: what a DAG run may set, checked against one declaration per DAG."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from training.config import PipelineConfig
from training.params import MONITOR, PIPELINE, ROLLBACK, RunParamError

DECLARED = {"pipeline": PIPELINE, "rollback": ROLLBACK, "monitor": MONITOR}
# Settings that keep the machine safe or say where state, the registry and exports live: the operator's alone.
OPERATOR_ONLY = {"mlflow_tracking_uri", "mlflow_artifact_location", "bento_export_uri", "state_dir", "bentoml_home", "data_roots",
                 "allowed_base_images", "monitor_url", "registered_model_name", "experiment_name",
                 "decode_workers"}


def _params(declared, **values):
    """The params Airflow hands a task: every declared one at its default, ``values`` over them."""
    defaults = {name: schema["default"] for name, schema in
                ((p.name, p.schema()) for p in (*declared.config_params, *declared.task_args))}
    return {**defaults, **values}


@pytest.mark.parametrize("dag", sorted(DECLARED))
@pytest.mark.parametrize("key", ["max_archive_members", "state_dir", "mlflow_tracking_uri", "bento_export_uri",
                                 "epoch"])
def test_a_conf_key_that_is_not_a_param_is_refused_naming_the_allowed_keys(dag, key):
    declared = DECLARED[dag]
    conf = {key: 0}
    with pytest.raises(RunParamError) as info:
        # Airflow turns the undeclared key into a param of its own: the params alone would let it through.
        declared.config(conf, _params(declared, **conf), environ={})
    message = str(info.value)
    assert f"this run's conf sets '{key}', which this DAG does not take; the keys a run may set are: " \
           f"{', '.join(declared.names)}." in message
    assert "operator's CIFAR10_* settings" in message


def test_no_safety_limit_or_location_is_a_param_and_config_params_are_config_fields():
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    for declared in DECLARED.values():
        names = set(declared.names)
        assert not names & OPERATOR_ONLY, names & OPERATOR_ONLY
        assert {p.name for p in declared.config_params} <= fields
        assert not {p.name for p in declared.task_args} & fields
        assert len(names) == len(declared.names)  # declared once


def test_only_declared_params_that_are_set_reach_the_config_and_the_environment_fills_the_rest(tmp_path):
    env = {"CIFAR10_EPOCHS": "9", "CIFAR10_SEED": "5", "CIFAR10_DECODE_WORKERS": "77",
           "CIFAR10_STATE_DIR": str(tmp_path)}
    config = PIPELINE.config({"epochs": 2, "widths": "8,16"}, _params(PIPELINE, epochs=2, widths="8,16"), environ=env)
    assert (config.epochs, config.widths, config.seed) == (2, "8,16", 5)
    assert config.decode_workers == 77 and config.state_dir == str(tmp_path)
    # An undeclared key that reached the params some other way (not through conf) is ignored.
    sneaked = PIPELINE.config({}, _params(PIPELINE, decode_workers=0), environ=env)
    assert sneaked.decode_workers == 77


@pytest.mark.parametrize("url, message", [
    ("ftp://host/cifar.zip", "has the scheme 'ftp'; use http(s)://, s3://, file:// or a local path"),
    ("file:///etc/passwd", "is the local file /etc/passwd, outside the data roots"),
    ("/etc/passwd", "outside the data roots"),
    ("file://host/etc/passwd", "names the host 'host'"),
])
def test_a_data_url_of_another_scheme_or_outside_the_data_roots_is_refused(tmp_path, url, message):
    env = {"CIFAR10_STATE_DIR": str(tmp_path / "state"), "CIFAR10_DATA_ROOTS": str(tmp_path / "data")}
    with pytest.raises(RunParamError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PIPELINE.config({"data_url": url}, _params(PIPELINE, data_url=url), environ=env)


def test_data_urls_that_are_remote_or_under_a_data_root_are_accepted(tmp_path):
    env = {"CIFAR10_DATA_ROOTS": f"{tmp_path / 'a'}:{tmp_path / 'b'}"}
    for url in ("https://example.org/c.tgz", "http://h/c.zip", "s3://bucket/c.zip", (tmp_path / "b" / "c.zip").as_uri(),
                str(tmp_path / "a" / "sub" / "c.zip")):
        assert PIPELINE.config({"data_url": url}, _params(PIPELINE, data_url=url), environ=env).data_url == url


def test_a_base_image_must_be_allowlisted_or_pinned_by_digest():
    pinned = "registry.example/python@sha256:" + "ab" * 32
    env = {"CIFAR10_ALLOWED_BASE_IMAGES": "mirror.example/python:3.11"}
    from training.packaging.container import REGISTRY_BASE_IMAGE

    for image in (pinned, "mirror.example/python:3.11", REGISTRY_BASE_IMAGE):
        assert PIPELINE.config({"base_image": image}, _params(PIPELINE, base_image=image), environ=env).base_image == image
    unpinned = "docker.io/library/python:3.11-slim-bookworm"  # the default's name, without its digest
    with pytest.raises(RunParamError, match=f"base image '{unpinned}' is neither allowed nor pinned"):
        PIPELINE.config({"base_image": unpinned}, _params(PIPELINE, base_image=unpinned), environ=env)
    with pytest.raises(RunParamError, match="base image 'evil.example/python:3.11' is neither allowed nor pinned"):
        PIPELINE.config({"base_image": "evil.example/python:3.11"},
                        _params(PIPELINE, base_image="evil.example/python:3.11"), environ=env)


def test_a_value_the_config_refuses_is_a_run_param_error():
    with pytest.raises(RunParamError, match="unknown recipe 'huge'"):
        PIPELINE.config({"recipe": "huge"}, _params(PIPELINE, recipe="huge"), environ={})


def test_in_a_task_a_refusal_fails_it_without_retries(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    context = {"dag_run": SimpleNamespace(conf={"max_archive_bytes": 1}), "params": _params(ROLLBACK)}
    with pytest.raises(AirflowFailException, match="'max_archive_bytes', which this DAG does not take"):
        ROLLBACK.for_task(context)
    monkeypatch.setenv("CIFAR10_DRIFT_THRESHOLD", "0.5")
    context = {"dag_run": SimpleNamespace(conf=None), "params": _params(MONITOR, drift_min_images=3)}
    config = MONITOR.for_task(context)
    assert (config.drift_threshold, config.drift_min_images) == (0.5, 3)


def test_the_airflow_params_carry_each_declared_schema():
    params = PIPELINE.airflow()
    assert list(params) == PIPELINE.names
    epochs = params["epochs"]
    assert epochs.value is None and epochs.description == "Training epochs"
    assert epochs.schema == {"type": ["null", "integer"], "minimum": 1}
    assert params["recipe"].schema["enum"] == ["", "default", "quick", "airbench94", "tiny"]
    assert params["force_promote"].value is False and params["data_url"].value == ""
