"""Fail fast, before any Airflow component starts, when a service the pipeline needs is not there.

A wrong Celery broker URL otherwise shows up as a scheduler that queues tasks nobody runs, a
missing bucket as a training run that fails at its last step. Each check connects once with a
short timeout and raises :class:`PreflightError` naming the setting and what to fix.

CLI (settings come from the same environment variables the services read; a check whose
variable is unset is reported as skipped)::

    python -m training.deploy.preflight broker postgres mlflow s3

- ``broker``: ``AIRFLOW__CELERY__BROKER_URL`` answers (Redis: ``PING``; other schemes: TCP)
- ``postgres``: ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` and ``MLFLOW_BACKEND_STORE_URI`` accept a login
- ``mlflow``: the ``MLFLOW_TRACKING_URI`` server answers ``/health`` and lets ``MLFLOW_TRACKING_USERNAME``
  (``MLFLOW_TRACKING_PASSWORD``) in, when it asks for a login
- ``s3``: the buckets of ``MLFLOW_ARTIFACTS_DESTINATION`` (endpoint ``MLFLOW_S3_ENDPOINT_URL``) and
  ``CIFAR10_BENTO_EXPORT_URI`` (the standard ``AWS_*`` endpoint) exist and these credentials reach them
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Callable, Mapping
from urllib.parse import urlsplit

from training.config import mask_password

# Seconds per connection attempt: a service on a working network answers in far less, and a
# stack that waits longer only delays the message.
TIMEOUT_S = 3.0


# In the order a stack starts them: the databases and the broker first, the servers that use them last.
CHECKS = ("postgres", "broker", "s3", "mlflow")


class PreflightError(RuntimeError):
    """A service is unreachable or misconfigured; the message says which setting to fix and how."""


def check_broker(url: str, setting: str = "AIRFLOW__CELERY__BROKER_URL", timeout: float = TIMEOUT_S) -> None:
    """The Celery broker at ``url`` answers: Redis replies to PING, any other broker accepts a TCP connection."""
    parts = urlsplit(url)
    shown = mask_password(url)
    if parts.scheme not in ("redis", "rediss", "amqp", "amqps", "pyamqp", "sqs") or not parts.hostname:
        raise PreflightError(f"{setting}={shown!r} is not a Celery broker URL: write redis://HOST:PORT/0 "
                             "(or amqp://USER:PASSWORD@HOST:5672// for RabbitMQ)")
    if parts.scheme == "sqs":
        return  # SQS is an AWS API, not a socket: its credentials are boto3's to check
    if parts.scheme.startswith("redis"):
        import redis  # lazy: only the broker check needs it

        try:
            redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
        except redis.exceptions.AuthenticationError as exc:
            raise PreflightError(f"the Celery broker {shown} refused the login ({exc}): put the right password "
                                 f"in {setting} (redis://:PASSWORD@HOST:PORT/0)") from exc
        except redis.exceptions.RedisError as exc:
            raise PreflightError(f"the Celery broker {shown} does not answer ({exc}): start Redis there "
                                 f"(make up STACK=distributed PARTS=redis) or fix {setting}") from exc
        return
    default_port = 5671 if parts.scheme == "amqps" else 5672
    try:
        socket.create_connection((parts.hostname, parts.port or default_port), timeout=timeout).close()
    except OSError as exc:
        raise PreflightError(f"the Celery broker {shown} does not accept connections ({exc}): start it or "
                             f"fix {setting}") from exc


def libpq_url(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg2://...`` (SQLAlchemy, optionally Celery's ``db+`` prefix) -> ``postgresql://...``."""
    scheme, rest = sqlalchemy_url.split("://", 1)
    return "postgresql://" + rest if scheme.removeprefix("db+").split("+")[0] in ("postgresql", "postgres") \
        else sqlalchemy_url


def check_postgres(url: str, setting: str, timeout: float = TIMEOUT_S) -> None:
    """A login to the PostgreSQL database of ``url`` (a SQLAlchemy or libpq URL) succeeds."""
    import psycopg2  # lazy: only the database check needs it

    shown = mask_password(url)
    if not urlsplit(url).scheme.removeprefix("db+").startswith(("postgresql", "postgres")):
        raise PreflightError(f"{setting}={shown!r} is not a PostgreSQL URL: write "
                             "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DATABASE")
    try:
        psycopg2.connect(libpq_url(url), connect_timeout=max(1, round(timeout))).close()
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "does not exist" in reason and "database" in reason:
            hint = "create that database (make up STACK=distributed PARTS=postgres does) or fix the name"
        elif "password" in reason or "authentication" in reason:
            hint = "fix the user or password"
        else:
            hint = "start PostgreSQL (.ci/setup-postgres.sh on Debian) or fix the host and port"
        raise PreflightError(f"PostgreSQL at {shown} ({setting}): {reason}: {hint} in {setting}") from exc


def check_mlflow(uri: str, setting: str = "MLFLOW_TRACKING_URI", timeout: float = TIMEOUT_S,
                 username: str | None = None, password: str | None = None) -> None:
    """An http(s) MLflow tracking server at ``uri`` answers ``/health`` and, when it asks for a login
    (``mlflow server --app-name basic-auth``), accepts ``username``/``password``; other URIs need no server."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests  # lazy: MLflow's own HTTP client library

    shown = mask_password(uri)
    base = uri.rstrip("/")
    try:
        response = requests.get(base + "/health", timeout=timeout)
        # /health needs no login; reading the experiments does, where the server has users. The server answered:
        # give its answer time, as checking a password hash took 4-5 s on a busy 2-core machine.
        api = requests.get(base + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                           timeout=(timeout, 10 * timeout), auth=(username, password or "") if username else None)
    except requests.RequestException as exc:
        raise PreflightError(f"the MLflow server {shown} does not answer ({type(exc).__name__}): start it "
                             f"(make up STACK=distributed PARTS=mlflow) or fix {setting}") from exc
    if response.status_code != 200:
        raise PreflightError(f"{shown}/health answered {response.status_code}, not 200: is {setting} the "
                             "MLflow tracking server's URL?")
    if api.status_code == 401 and not username:
        raise PreflightError(f"the MLflow server {shown} asks for a login: set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD")
    if api.status_code == 401:
        raise PreflightError(f"the MLflow server {shown} refused the login of MLFLOW_TRACKING_USERNAME={username!r}: "
                             "fix MLFLOW_TRACKING_PASSWORD (or the user)")
    if api.status_code != 200:
        raise PreflightError(f"{shown} answered {api.status_code} to an experiment search as "
                             f"{username or 'nobody'}: does that user have permission to read experiments?")


def check_s3(uri: str, setting: str, endpoint: str | None = None, endpoint_setting: str = "") -> None:
    """The bucket of ``uri`` exists and the environment's credentials reach it."""
    from training.storage import StorageError, check_bucket

    try:
        check_bucket(uri, endpoint, endpoint_setting)
    except StorageError as exc:
        raise PreflightError(f"{setting}={uri}: {exc}") from exc


def _checks(env: Mapping[str, str]) -> dict[str, list[tuple[str, Callable[[], None]]]]:
    """Each check name -> its (setting, thunk) pairs for the settings present in ``env``."""
    def has(name: str) -> bool:
        return bool(env.get(name))

    postgres = [(name, lambda name=name: check_postgres(env[name], name))
                for name in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "MLFLOW_BACKEND_STORE_URI")
                if has(name) and urlsplit(env[name]).scheme.startswith("postgres")]
    s3 = []
    if env.get("MLFLOW_ARTIFACTS_DESTINATION", "").startswith("s3://"):
        s3.append(("MLFLOW_ARTIFACTS_DESTINATION",
                   lambda: check_s3(env["MLFLOW_ARTIFACTS_DESTINATION"], "MLFLOW_ARTIFACTS_DESTINATION",
                                    env.get("MLFLOW_S3_ENDPOINT_URL") or None,
                                    "MLFLOW_S3_ENDPOINT_URL" if has("MLFLOW_S3_ENDPOINT_URL") else "")))
    if env.get("CIFAR10_BENTO_EXPORT_URI", "").startswith("s3://"):
        s3.append(("CIFAR10_BENTO_EXPORT_URI",
                   lambda: check_s3(env["CIFAR10_BENTO_EXPORT_URI"], "CIFAR10_BENTO_EXPORT_URI")))
    return {
        "broker": [("AIRFLOW__CELERY__BROKER_URL", lambda: check_broker(env["AIRFLOW__CELERY__BROKER_URL"]))]
        if has("AIRFLOW__CELERY__BROKER_URL") else [],
        "postgres": postgres,
        "mlflow": [("MLFLOW_TRACKING_URI", lambda: check_mlflow(env["MLFLOW_TRACKING_URI"],
                                                               username=env.get("MLFLOW_TRACKING_USERNAME"),
                                                               password=env.get("MLFLOW_TRACKING_PASSWORD")))]
        if env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")) else [],
        "s3": s3,
    }


def run(names: list[str], env: Mapping[str, str] | None = None, out=sys.stdout, err=sys.stderr) -> int:
    """Run the named checks against ``env`` (default: this process's); 0 when all pass, 1 otherwise."""
    checks = _checks(os.environ if env is None else env)
    failed = 0
    for name in names:
        if not checks[name]:
            print(f"preflight: {name}: skipped (no setting for it in the environment)", file=out)
        for setting, check in checks[name]:
            try:
                check()
            except PreflightError as exc:
                failed += 1
                print(f"preflight: {name}: FAILED: {exc}", file=err)
            else:
                print(f"preflight: {name}: {setting} ok", file=out)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.deploy.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="*", help=f"what to check: {', '.join(CHECKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return run(args.checks or list(CHECKS))


if __name__ == "__main__":
    sys.exit(main())
