"""Production configuration, by environment only: the same code on Postgres and S3.

The end-to-end test runs the real DAG with Airflow's metadata database on PostgreSQL
(LocalExecutor) against ``mlflow server`` with a PostgreSQL backend store and an S3
artifact store (moto's server mode), then checks the bucket through boto3, the
registry through SQL, exports the Bento to S3, imports it into an empty store and
serves it from there.

PostgreSQL comes from ``.ci/setup-postgres.sh``. The connection is read from
``CIFAR10_TEST_PG_URL`` or ``CIFAR10_TEST_PG_{HOST,PORT,USER,PASSWORD}`` (the defaults
are the throw-away CI role that script creates). Without a reachable server the test
skips, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import requests

from tests.helpers import BIN, ROOT, bentoml_cli_json, bentoml_serve, free_port, run_dag, state_env
from tests.helpers import FAKE_AWS, moto_s3, s3_keys
from tests.helpers import CLASSES, encode, image_folder_zip, make_images
from tests.helpers import TINY_DAG_CONF as CONF

BUCKET = "cifar10-artifacts"
MODEL = "cifar10-cnn"


# --- fast: the schedule on the loaded DAG --------------------------------------

def _load_dag(monkeypatch, schedule: str | None):
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if schedule is None:
        monkeypatch.delenv("CIFAR10_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("CIFAR10_SCHEDULE", schedule)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["cifar10_pipeline"]


def test_dag_retrains_weekly_by_default_without_catchup_one_run_at_a_time(monkeypatch):
    dag = _load_dag(monkeypatch, None)
    assert dag.timetable.serialize()["expression"] == "0 0 * * 0"  # Sunday midnight UTC
    assert dag.catchup is False
    assert dag.max_active_runs == 1


@pytest.mark.parametrize("value,expected", [("0 3 * * 1", "0 3 * * 1"), ("none", None)])
def test_schedule_comes_from_the_environment(monkeypatch, value, expected):
    dag = _load_dag(monkeypatch, value)
    assert (dag.timetable.serialize().get("expression") if expected else dag.schedule) == expected
    assert dag.max_active_runs == 1


def test_server_tracking_uri_leaves_artifacts_to_the_server(tmp_path):
    """A file:// root from the client would bypass the server's --artifacts-destination."""
    from training.config import PipelineConfig

    assert PipelineConfig(state_dir=str(tmp_path), mlflow_tracking_uri="http://mlflow:5000").artifact_location is None
    explicit = PipelineConfig(mlflow_tracking_uri="http://mlflow:5000", mlflow_artifact_location="s3://b/p")
    assert explicit.artifact_location == "s3://b/p"
    assert PipelineConfig(state_dir=str(tmp_path)).artifact_location.startswith("file://")


def test_passwords_in_urls_are_masked_in_logged_params():
    from training.config import PipelineConfig

    params = PipelineConfig(mlflow_tracking_uri="postgresql://ml:s3cret@db:5432/mlflow",
                            data_url="https://user:tok@example.org/c.tgz").as_params()
    assert params["mlflow_tracking_uri"] == "postgresql://ml:***@db:5432/mlflow"
    assert params["data_url"] == "https://user:***@example.org/c.tgz"
    assert "s3cret" not in repr(params) and "tok@" not in repr(params)


# --- end to end on PostgreSQL and S3 -------------------------------------------

def _pg_admin_url() -> str:
    if os.environ.get("CIFAR10_TEST_PG_URL"):
        return os.environ["CIFAR10_TEST_PG_URL"]
    user = os.environ.get("CIFAR10_TEST_PG_USER", "cifar10")
    password = os.environ.get("CIFAR10_TEST_PG_PASSWORD", "cifar10-ci-only")  # the CI role's fake default
    host = os.environ.get("CIFAR10_TEST_PG_HOST", "127.0.0.1")
    port = os.environ.get("CIFAR10_TEST_PG_PORT", "5432")
    return f"postgresql://{quote(user)}:{quote(password, safe='')}@{host}:{port}/postgres"


def _with_db(url: str, db: str, driver: str = "postgresql") -> str:
    return driver + "://" + url.split("://", 1)[1].rsplit("/", 1)[0] + "/" + db


@pytest.fixture(scope="module")
def postgres():
    """Two fresh databases (MLflow, Airflow) on the test server; dropped afterwards."""
    import psycopg2

    admin = _pg_admin_url()
    try:
        conn = psycopg2.connect(admin, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        reason = (f"no PostgreSQL reachable ({str(exc).strip().splitlines()[0]}); "
                  "run .ci/setup-postgres.sh or set CIFAR10_TEST_PG_URL")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    conn.autocommit = True
    suffix = uuid.uuid4().hex[:8]
    dbs = {"mlflow": f"mlflow_{suffix}", "airflow": f"airflow_{suffix}"}
    with conn.cursor() as cur:
        for db in dbs.values():
            cur.execute(f'CREATE DATABASE "{db}"')
    try:
        # libpq URLs for psycopg2 here; SQLAlchemy URLs name the driver, because SQLAlchemy 2.1
        # maps a bare postgresql:// to psycopg 3, which this project does not install.
        yield {"admin": admin, **{k: _with_db(admin, v) for k, v in dbs.items()},
               **{f"{k}_sqlalchemy": _with_db(admin, v, "postgresql+psycopg2") for k, v in dbs.items()}}
    finally:
        with conn.cursor() as cur:
            for db in dbs.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


def _start_mlflow(pg_url: str, s3_endpoint: str, state: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # The store URI and the artifact destination go by environment, so the
    # password is not in the process list.
    env = {**state_env(state), **FAKE_AWS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_BACKEND_STORE_URI": pg_url, "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow"}
    env.pop("MLFLOW_TRACKING_URI")
    log = open(state.parent / "mlflow-server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # the first start migrates the Postgres schema
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(state.parent / 'mlflow-server.log').read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except (requests.ConnectionError, requests.Timeout):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server not healthy: {(state.parent / 'mlflow-server.log').read_text()[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, postgres):
    """One DAG run with Airflow on Postgres and MLflow on Postgres + S3."""
    tmp = tmp_path_factory.mktemp("scaleout")
    archive = image_folder_zip(tmp / "cifar-mini.zip", per_class=30, fmt="PNG")
    state = tmp / "state"
    with moto_s3(BUCKET) as s3:
        mlflow_proc, mlflow_url = _start_mlflow(postgres["mlflow_sqlalchemy"], s3, state)
        try:
            # The tasks get no S3 credentials: artifacts go through the server's proxy.
            env = state_env(state, MLFLOW_TRACKING_URI=mlflow_url, AIRFLOW__CORE__EXECUTOR="LocalExecutor",
                            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgres["airflow_sqlalchemy"])
            # Migrate here, not only in run_dag, so a failure shows Airflow's own message.
            (state / "airflow").mkdir(parents=True)
            migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True,
                                     text=True, timeout=600)
            assert migrate.returncode == 0, (migrate.stdout + migrate.stderr)[-4000:]
            log = tmp / "dag-run.log"
            result = run_dag(env, {**CONF, "data_url": archive.as_uri()}, log)
            assert result.returncode == 0, log.read_text()[-5000:]
            yield {"env": env, "s3": s3, "pg": postgres, "log": log.read_text(), "tmp": tmp,
                   "mlflow_url": mlflow_url}
        finally:
            os.killpg(mlflow_proc.pid, 15)
            try:
                mlflow_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # seen on a busy machine: uvicorn ignoring SIGTERM for > 30 s
                os.killpg(mlflow_proc.pid, 9)
                mlflow_proc.wait()
def test_dag_ran_on_postgres_with_every_stage(scaled):
    import psycopg2

    for task in ["fetch", "prepare", "train", "register", "gate", "import_model", "build"]:
        assert f"task_id={task}" in scaled["log"]
    assert "sqlite" not in scaled["env"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert not (Path(scaled["env"]["AIRFLOW_HOME"]) / "airflow.db").exists()
    with psycopg2.connect(scaled["pg"]["airflow"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT state FROM dag_run WHERE dag_id = 'cifar10_pipeline'")
        assert [row[0] for row in cur.fetchall()] == ["success"]
        cur.execute("SELECT task_id, state FROM task_instance WHERE dag_id = 'cifar10_pipeline'")
        states = dict(cur.fetchall())
    assert states["build"] == "success" and states["containerize"] == "skipped", states
def test_database_password_appears_in_no_log(scaled):
    password = unquote(urlsplit(scaled["pg"]["admin"]).password or "")
    assert password
    logs = [scaled["log"], (scaled["tmp"] / "mlflow-server.log").read_text()]
    logs += [p.read_text(errors="replace") for p in (Path(scaled["env"]["AIRFLOW_HOME"]) / "logs").rglob("*")
             if p.is_file()]
    assert not [i for i, text in enumerate(logs) if password in text]
def test_run_artifacts_are_in_the_bucket(scaled):
    keys = s3_keys(scaled["s3"], BUCKET, "mlflow/")
    assert any(k.endswith("/onnx/model.onnx") for k in keys), keys
    assert any(k.endswith("/onnx/classes.json") for k in keys), keys
    # and nothing landed on the training machine's disk
    assert not (Path(scaled["env"]["CIFAR10_STATE_DIR"]) / "mlflow" / "artifacts").exists()
def test_registry_and_champion_alias_are_in_postgres(scaled):
    import psycopg2

    with psycopg2.connect(scaled["pg"]["mlflow"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = %s", (MODEL,))
        versions = cur.fetchall()
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,))
        aliases = dict(cur.fetchall())
        cur.execute("SELECT run_uuid, artifact_uri FROM runs")
        runs = dict(cur.fetchall())
    assert [v for v, _ in versions] == [1], versions
    assert aliases == {"champion": 1}
    run_id = versions[0][1]
    assert runs[run_id].startswith("mlflow-artifacts:/"), runs  # proxied by the server, stored in S3
def test_bento_travels_through_s3_and_serves_from_a_fresh_store(scaled):
    """Export the Bento to S3, import it into an empty store (another machine), serve it there."""
    s3_env = {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": scaled["s3"]}
    source = {**scaled["env"], **s3_env}
    target = state_env(scaled["tmp"] / "other-machine", **s3_env)
    cli = [str(BIN / "python"), "-m", "training.packaging.bento_store"]
    out = subprocess.run([*cli, "export", "cifar10-classifier:latest", f"s3://{BUCKET}/bentos/"], env=source,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    uri = out.stdout.strip().splitlines()[-1]
    assert uri.startswith(f"s3://{BUCKET}/bentos/cifar10-classifier-") and uri.endswith(".bento")
    out = subprocess.run([*cli, "import", f"s3://{BUCKET}/bentos/"], env=target, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tag = out.stdout.strip().splitlines()[-1]
    assert tag in [b["tag"] for b in bentoml_cli_json(target, "list")]
    models = [m["tag"] for m in bentoml_cli_json(target, "models", "list")]
    assert any(t.startswith("cifar10-cnn:") for t in models), models  # the model came inside the Bento

    x, _ = make_images(1, seed=3)
    with bentoml_serve(tag, target, scaled["tmp"] / "serve.log") as url:
        resp = requests.post(f"{url}/predict", files={"file": ("x.png", encode(x[0], "PNG"), "image/png")},
                             timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["label"] in CLASSES
