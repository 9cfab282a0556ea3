"""The Airflow REST client: requests and answers in the shapes Airflow 3's API v2 uses, no server."""

from __future__ import annotations

import json

import pytest
import requests

from training.airflow_api import AirflowAPIError, AirflowClient

RUN_ID = "manual__2026-12-02T13:51:37.108638+00:00"
DAG = {"dag_id": "cifar10_pipeline", "is_paused": False, "max_active_runs": 1, "has_import_errors": False}


class Answer:
    def __init__(self, status: int, body) -> None:
        self.status_code, self.body = status, body
        self.text = body if isinstance(body, str) else json.dumps(body)

    def json(self):
        return self.body


class FakeSession:
    """Answers (method, path) from a table, in order when a path has several answers; records each call."""

    def __init__(self, answers: dict) -> None:
        self.answers = {key: list(value) if isinstance(value, list) else [value] for key, value in answers.items()}
        self.calls: list[tuple[str, str, dict]] = []

    def request(self, method, url, **kwargs):
        path = url.removeprefix("http://airflow:8080")
        self.calls.append((method, path, kwargs))
        queue = self.answers[(method, path)]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _client(answers: dict, **kwargs) -> tuple[AirflowClient, FakeSession]:
    session = FakeSession({("POST", "/auth/token"): Answer(201, {"access_token": "jwt-1"}), **answers})
    return AirflowClient("http://airflow:8080/", "admin", "secret", session=session, **kwargs), session


def test_logs_in_once_and_sends_the_token_as_bearer():
    client, session = _client({("GET", "/api/v2/dags/cifar10_pipeline"): Answer(200, DAG)})
    assert client.dag("cifar10_pipeline") == DAG
    assert client.dag("cifar10_pipeline") == DAG
    assert [c[:2] for c in session.calls] == [("POST", "/auth/token"), ("GET", "/api/v2/dags/cifar10_pipeline"),
                                              ("GET", "/api/v2/dags/cifar10_pipeline")]
    assert session.calls[0][2]["json"] == {"username": "admin", "password": "secret"}
    assert session.calls[1][2]["headers"]["Authorization"] == "Bearer jwt-1"


def test_an_expired_token_is_renewed_once():
    client, session = _client({("POST", "/auth/token"): [Answer(201, {"access_token": "jwt-1"}),
                                                         Answer(201, {"access_token": "jwt-2"})],
                               ("GET", "/api/v2/dags/cifar10_pipeline"): [Answer(401, {"detail": "expired"}),
                                                                           Answer(200, DAG)]})
    assert client.dag("cifar10_pipeline") == DAG
    assert session.calls[-1][2]["headers"]["Authorization"] == "Bearer jwt-2"


def test_a_dag_not_parsed_yet_is_none():
    client, _ = _client({("GET", "/api/v2/dags/cifar10_pipeline"): Answer(404, {"detail": "not found"})})
    assert client.dag("cifar10_pipeline") is None


def test_trigger_starts_an_ordinary_run_without_logical_date():
    run = {"dag_run_id": RUN_ID, "run_type": "manual", "state": "queued", "conf": {"recipe": "tiny"}}
    client, session = _client({("POST", "/api/v2/dags/cifar10_pipeline/dagRuns"): Answer(200, run)})
    assert client.trigger("cifar10_pipeline", {"recipe": "tiny"}) == run
    assert session.calls[-1][2]["json"] == {"logical_date": None, "conf": {"recipe": "tiny"}}


def test_run_ids_are_quoted_in_paths_and_log_tokens_passed_on():
    path = ("/api/v2/dags/cifar10_pipeline/dagRuns/manual__2026-12-02T13%3A51%3A37.108638%2B00%3A00/"
            "taskInstances/train/logs/1")
    client, session = _client({("GET", path): Answer(200, {"content": [{"event": "epoch 1/2"}],
                                                           "continuation_token": "tok-2"})})
    assert client.task_log("cifar10_pipeline", RUN_ID, "train", 1, token="tok-1") == ([{"event": "epoch 1/2"}],
                                                                                    "tok-2")
    assert session.calls[-1][2]["params"] == {"token": "tok-1"}


def test_unpause_patches_only_is_paused():
    client, session = _client({("PATCH", "/api/v2/dags/cifar10_pipeline"): Answer(200, DAG)})
    client.set_paused("cifar10_pipeline", False)
    assert session.calls[-1][2]["json"] == {"is_paused": False}
    assert session.calls[-1][2]["params"] == {"update_mask": "is_paused"}


def test_wait_for_dag_reports_the_import_errors():
    errors = {"import_errors": [{"filename": "/dags/cifar10_pipeline.py",
                                 "stack_trace": "Traceback ...\nNameError: name 'x' is not defined\n"}],
              "total_entries": 1}
    client, _ = _client({("GET", "/api/v2/dags/cifar10_pipeline"): Answer(404, {"detail": "not found"}),
                         ("GET", "/api/v2/importErrors"): Answer(200, errors)})
    with pytest.raises(AirflowAPIError, match="import errors") as raised:
        client.wait_for_dag("cifar10_pipeline", timeout_s=60, sleep=lambda s: None)
    assert "NameError: name 'x' is not defined" in str(raised.value)


def test_wait_for_dag_waits_for_the_parse_then_gives_up_saying_where_to_look():
    client, _ = _client({("GET", "/api/v2/dags/cifar10_pipeline"): [Answer(404, {}), Answer(200, DAG)],
                         ("GET", "/api/v2/importErrors"): Answer(200, {"import_errors": []})})
    assert client.wait_for_dag("cifar10_pipeline", timeout_s=60, sleep=lambda s: None) == DAG
    client, _ = _client({("GET", "/api/v2/dags/cifar10_pipeline"): Answer(404, {}),
                         ("GET", "/api/v2/importErrors"): Answer(200, {"import_errors": []})})
    clock = iter(range(0, 1000, 10))
    with pytest.raises(AirflowAPIError, match="AIRFLOW__CORE__DAGS_FOLDER"):
        client.wait_for_dag("cifar10_pipeline", timeout_s=30, sleep=lambda s: None, clock=lambda: next(clock))


def test_an_unreachable_airflow_says_how_to_start_it():
    client, _ = _client({("POST", "/auth/token"): requests.ConnectionError("connection refused")})
    with pytest.raises(AirflowAPIError, match=r"cannot reach Airflow at http://airflow:8080 .*AIRFLOW_API_URL"):
        client.dag("cifar10_pipeline")


def test_a_refused_login_names_the_variables_to_set():
    client, _ = _client({("POST", "/auth/token"): Answer(401, {"detail": "Invalid credentials"})})
    with pytest.raises(AirflowAPIError, match="AIRFLOW_API_PASSWORD"):
        client.dag("cifar10_pipeline")


def test_an_error_answer_is_raised_with_its_body():
    client, _ = _client({("POST", "/api/v2/dags/cifar10_pipeline/dagRuns"): Answer(400, {"detail": "bad conf"})})
    with pytest.raises(AirflowAPIError, match="HTTP 400.*bad conf"):
        client.trigger("cifar10_pipeline", {})


def test_from_env_reads_the_password_standalone_generated_at_login_time(tmp_path):
    client = AirflowClient.from_env({"AIRFLOW_HOME": str(tmp_path), "AIRFLOW_PORT": "18080"})
    assert client.base_url == "http://localhost:18080" and client.username == "admin"
    (tmp_path / "simple_auth_manager_passwords.json.generated").write_text('{"admin": "generated"}')
    client.session = FakeSession({("POST", "http://localhost:18080/auth/token"): Answer(201, {"access_token": "t"})})
    client.login()
    assert client.session.calls[0][2]["json"] == {"username": "admin", "password": "generated"}


def test_from_env_prefers_a_remote_airflow_and_its_credentials():
    client = AirflowClient.from_env({"AIRFLOW_API_URL": "https://airflow.example.com/", "AIRFLOW_API_USER": "ops",
                                     "AIRFLOW_API_PASSWORD": "pw", "AIRFLOW_PORT": "18080"})
    assert (client.base_url, client.username, client.password) == ("https://airflow.example.com", "ops", "pw")


def test_a_missing_password_file_says_what_to_set(tmp_path):
    client = AirflowClient.from_env({"AIRFLOW_HOME": str(tmp_path)})
    with pytest.raises(AirflowAPIError, match="AIRFLOW_API_PASSWORD is not set"):
        client.login()
