"""Preflight checks fail in seconds with the setting to fix; no servers (closed ports only)."""

from __future__ import annotations

import base64
import io
import time

import pytest

from tests.helpers import QuietHandler, free_port, local_http_server
from training.deploy.preflight import PreflightError, check_broker, check_mlflow, check_postgres, libpq_url, run


def test_a_broker_url_on_a_closed_port_fails_fast_naming_the_setting():
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(PreflightError) as failure:
        check_broker(url)
    assert time.monotonic() - started < 10
    message = str(failure.value)
    assert f"the Celery broker {url} does not answer" in message
    assert "fix AIRFLOW__CELERY__BROKER_URL" in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "redis127.0.0.1:6379", "redis:///0"])
def test_a_broker_url_that_is_no_broker_url_says_how_to_write_one(url):
    with pytest.raises(PreflightError, match=r"is not a Celery broker URL: write redis://HOST:PORT/0"):
        check_broker(url)


def test_an_amqp_broker_on_a_closed_port_fails_without_a_redis_client():
    with pytest.raises(PreflightError, match="does not accept connections"):
        check_broker(f"amqp://guest:secret@127.0.0.1:{free_port()}//")


def test_passwords_never_appear_in_the_messages():
    with pytest.raises(PreflightError) as failure:
        check_broker(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert "hunter2" not in str(failure.value) and ":***@" in str(failure.value)
    with pytest.raises(PreflightError) as failure:
        check_postgres(f"postgresql+psycopg2://u:hunter2@127.0.0.1:{free_port()}/airflow", "MLFLOW_BACKEND_STORE_URI")
    assert "hunter2" not in str(failure.value)
    assert "MLFLOW_BACKEND_STORE_URI" in str(failure.value) and "start PostgreSQL" in str(failure.value)


def test_sqlalchemy_and_celery_urls_become_libpq_urls():
    assert libpq_url("postgresql+psycopg2://u:p@h:5432/db") == "postgresql://u:p@h:5432/db"
    assert libpq_url("db+postgresql+psycopg2://u:p@h/db") == "postgresql://u:p@h/db"
    with pytest.raises(PreflightError, match="is not a PostgreSQL URL"):
        check_postgres("sqlite:////tmp/airflow.db", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")


def test_an_mlflow_server_that_does_not_answer_names_the_tracking_uri():
    with pytest.raises(PreflightError, match=r"does not answer .* fix MLFLOW_TRACKING_URI"):
        check_mlflow(f"http://127.0.0.1:{free_port()}")
    check_mlflow("sqlite:////tmp/mlflow.db")  # no server to check


class BasicAuthMLflow(QuietHandler):
    """/health for anyone, the REST API for admin:right-password only: what `--app-name basic-auth` does."""

    def do_GET(self):
        login = "Basic " + base64.b64encode(b"admin:right-password-123").decode()
        if self.path == "/health":
            self.answer(200, b"OK", "text/plain")
        elif self.headers.get("Authorization") == login:
            self.answer(200, b'{"experiments": []}')
        else:
            self.answer(401, b"You are not authenticated.", "text/plain")


def test_an_mlflow_server_that_asks_for_a_login_is_checked_with_the_tracking_credentials():
    with local_http_server(BasicAuthMLflow) as url:
        check_mlflow(url, username="admin", password="right-password-123")
        with pytest.raises(PreflightError, match="asks for a login: set MLFLOW_TRACKING_USERNAME and "
                                                 "MLFLOW_TRACKING_PASSWORD"):
            check_mlflow(url)
        with pytest.raises(PreflightError, match="refused the login of MLFLOW_TRACKING_USERNAME='admin'") as failure:
            check_mlflow(url, username="admin", password="wrong-password")
        assert "wrong-password" not in str(failure.value)
        # run() takes the credentials from the same variables MLflow's client reads.
        env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin"}
        for password, failed in (("wrong-password", 1), ("right-password-123", 0)):
            err = io.StringIO()
            assert run(["mlflow"], {**env, "MLFLOW_TRACKING_PASSWORD": password}, io.StringIO(), err) == failed, \
                err.getvalue()


def test_run_reports_every_failure_and_skips_what_is_not_configured():
    out, err = io.StringIO(), io.StringIO()
    env = {"AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    assert run(["broker", "mlflow", "s3"], env, out, err) == 1
    assert err.getvalue().count("FAILED") == 2
    assert "preflight: s3: skipped" in out.getvalue()
    assert run(["s3", "postgres"], {}, out, err) == 0


def test_an_unreachable_s3_endpoint_names_the_endpoint_and_the_setting(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    out, err = io.StringIO(), io.StringIO()
    env = {"MLFLOW_ARTIFACTS_DESTINATION": "s3://cifar10/mlflow", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    started = time.monotonic()
    assert run(["s3"], env, out, err) == 1
    assert time.monotonic() - started < 30
    assert f"cannot reach the S3 endpoint {endpoint} (from MLFLOW_S3_ENDPOINT_URL)" in err.getvalue(), err.getvalue()
    assert "MLFLOW_ARTIFACTS_DESTINATION=s3://cifar10/mlflow" in err.getvalue()
