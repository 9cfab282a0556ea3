"""Only declared inputs reach a run: real ``airflow dags test`` runs with a conf the DAGs must refuse.

Each run fails at its first task, before anything is fetched, trained or moved, with a message that says
what was wrong and what a run may set; the task is not retried (the same conf would fail the same way).
"""

from __future__ import annotations

import pytest

from tests.helpers import TINY_DAG_CONF, image_folder_zip, last_dag_run, run_dag, state_env
from training.params import PIPELINE, ROLLBACK

DOWNSTREAM = ("prepare", "train", "register", "gate", "import_model", "build", "containerize", "verify", "promote",
              "publish")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run-params")
    archive = image_folder_zip(tmp / "cifar-mini.zip", per_class=2, fmt="PNG")
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.zip"  # outside the data roots (tmp)
    secret.write_bytes(archive.read_bytes())
    env = state_env(tmp / "state")  # default retries: a refused conf must fail without one
    return {"env": env, "tmp": tmp, "archive": archive, "secret": secret}


def _refused(runs, name: str, conf: dict, dag_id: str = "cifar10_pipeline") -> tuple[str, dict[str, str]]:
    log = runs["tmp"] / f"{name}.log"
    result = run_dag(runs["env"], conf, log, dag_id)
    text = log.read_text()
    assert result.returncode != 0, text[-3000:]
    state, tasks = last_dag_run(runs["env"], dag_id)
    assert state == "failed", tasks
    return text, tasks


def _nothing_fetched(runs) -> None:
    assert not (runs["tmp"] / "state" / "data").exists()
    assert not (runs["tmp"] / "state" / "mlflow").exists()


def test_an_undeclared_conf_key_fails_the_first_task_naming_the_allowed_keys(runs):
    conf = {**TINY_DAG_CONF, "data_url": runs["archive"].as_uri(), "state_dir": "/tmp/elsewhere"}
    text, tasks = _refused(runs, "undeclared", conf)
    assert tasks["fetch"] == "failed", tasks
    assert all(tasks[t] == "upstream_failed" for t in DOWNSTREAM), tasks
    assert ("this run's conf sets 'state_dir', which this DAG does not take; the keys a run may set are: "
            f"{', '.join(PIPELINE.names)}.") in text
    assert "AirflowFailException" in text and "new_state=failed" in text and "new_state=up_for_retry" not in text
    _nothing_fetched(runs)


def test_a_data_url_outside_the_data_roots_copies_nothing(runs):
    text, tasks = _refused(runs, "outside", {**TINY_DAG_CONF, "data_url": runs["secret"].as_uri()})
    assert tasks["fetch"] == "failed", tasks
    assert f"is the local file {runs['secret']}, outside the data roots ({runs['tmp']})" in text
    _nothing_fetched(runs)


def test_the_rollback_dag_refuses_an_undeclared_key_and_moves_nothing(runs):
    text, tasks = _refused(runs, "rollback", {"version": 1, "state_dir": "/tmp/elsewhere"}, "cifar10_rollback")
    assert tasks == {"rollback": "failed"}
    assert ("this run's conf sets 'state_dir', which this DAG does not take; the keys a run may set are: "
            f"{', '.join(ROLLBACK.names)}.") in text
    _nothing_fetched(runs)
