"""training.config: defaults, environment overrides, explicit overrides, coercion."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.helpers import ROOT
from training.config import OFFICIAL_URL, PipelineConfig, load_config
from training.params import MONITOR, PIPELINE


def test_defaults_point_at_the_official_release_and_are_frozen():
    config = load_config(environ={})
    assert config.data_url == OFFICIAL_URL
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]


def test_environment_then_overrides_win_in_that_order():
    env = {"CIFAR10_EPOCHS": "7", "CIFAR10_SEED": "5", "CIFAR10_FORCE_PROMOTE": "true"}
    config = load_config({"epochs": 2}, environ=env)
    assert config.epochs == 2          # override beats environment
    assert config.seed == 5            # environment beats default
    assert config.force_promote is True


def test_values_are_coerced_to_field_types():
    config = load_config({"epochs": "3", "min_accuracy": "0.5", "force_promote": "0"}, environ={})
    assert (config.epochs, config.min_accuracy, config.force_promote) == (3, 0.5, False)


def test_unknown_key_is_rejected_with_the_valid_keys():
    with pytest.raises(ValueError, match="unknown config key 'epoch'.*epochs"):
        load_config({"epoch": 3}, environ={})


def test_bad_value_names_the_field():
    with pytest.raises(ValueError, match="epochs='many' is not a valid int"):
        load_config({"epochs": "many"}, environ={})


def test_state_paths_derive_from_state_dir(tmp_path):
    config = PipelineConfig(state_dir=str(tmp_path))
    assert config.data_dir == tmp_path / "data"
    assert config.tracking_uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert config.artifact_location.startswith("file://")
    assert config.bentoml_home_path == tmp_path / "bentoml"
    assert not (tmp_path / "data").exists()  # deriving paths creates nothing


def test_explicit_mlflow_uri_wins(tmp_path):
    config = PipelineConfig(state_dir=str(tmp_path), mlflow_tracking_uri="http://mlflow:5000")
    assert config.tracking_uri == "http://mlflow:5000"


def test_standard_tool_variables_are_honoured_but_prefixed_ones_win():
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "BENTOML_HOME": "/srv/bentoml"}
    config = load_config(environ=env)
    assert config.tracking_uri == "http://mlflow:5000"
    assert str(config.bentoml_home_path) == "/srv/bentoml"
    env["CIFAR10_MLFLOW_TRACKING_URI"] = "http://other:5000"
    assert load_config(environ=env).tracking_uri == "http://other:5000"


def test_the_readme_lists_every_setting_once_and_bolds_the_run_params():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration"):readme.index("## Deploy")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    listed = [name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[2])]
    bold = {name for row in rows for name in re.findall(r"\*\*`([a-z0-9_]+)`\*\*", row)}
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(PipelineConfig))
    assert bold == {p.name for p in (*PIPELINE.config_params, *MONITOR.config_params)}
