"""The deployed shape, on one machine: ``make up STACK=distributed`` (``python -m training.deploy.stack``).

The end-to-end test starts the distributed stack in a temporary state folder on free ports:
Airflow on PostgreSQL with the CeleryExecutor (Redis as the broker, ``airflow celery worker``
as its own process; scheduler, dag-processor, triggerer and API server apart), MLflow as a
tracking server on PostgreSQL with its artifacts in SeaweedFS's S3. It triggers the DAG through
Airflow's REST API, as ``make run`` does, and checks where everything went: the tasks through the
Celery worker, the run's artifacts in the bucket, the registry in PostgreSQL, the Bento exported
to S3. Then the stack's serving step imports the Bento into an empty store and serves it, and
``down`` leaves no process behind (its process manager included).

PostgreSQL comes from ``.ci/setup-postgres.sh``, redis-server from ``.ci/setup-redis.sh``. The
connection is read from ``CIFAR10_TEST_PG_URL`` or ``CIFAR10_TEST_PG_{HOST,PORT,USER,PASSWORD}``
(the defaults are the throw-away CI role that script creates). Without a reachable server or
redis-server the test skips, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import requests

from tests.helpers import (CLASSES, encode, free_port, image_folder_zip, listeners, make_images, not_loopback,
                           require, stack_processes, state_env)
from tests.helpers import stack as _stack
from tests.helpers import TINY_DAG_CONF as CONF

BUCKET = "cifar10"
MODEL = "cifar10-cnn"
DAG = "cifar10_pipeline"
# Every task of a run whose model became champion; containerize skips itself (no builder here).
TASKS = ["fetch", "prepare", "train", "register", "gate", "import_model", "build", "containerize", "verify", "promote",
         "publish"]


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


# --- end to end: the distributed stack ----------------------------------------

def _pg_admin_url() -> str:
    if os.environ.get("CIFAR10_TEST_PG_URL"):
        return os.environ["CIFAR10_TEST_PG_URL"]
    user = os.environ.get("CIFAR10_TEST_PG_USER", "cifar10")
    password = os.environ.get("CIFAR10_TEST_PG_PASSWORD", "cifar10-ci-only")  # the CI role's fake default
    host = os.environ.get("CIFAR10_TEST_PG_HOST", "127.0.0.1")
    port = os.environ.get("CIFAR10_TEST_PG_PORT", "5432")
    return f"postgresql://{quote(user)}:{quote(password, safe='')}@{host}:{port}/postgres"


def _with_db(url: str, db: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + db


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    """Whether a server accepts connections on ``port`` (closed connections in TIME_WAIT do not count)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def _free_range(count: int, twins: int, taken: set[int]) -> int:
    """A port p with p..p+count-1 free and the gRPC twins p+10000..p+10000+twins-1 free too, none of them in
    ``taken`` (ports chosen for other servers, free until they start); adds them to ``taken``."""
    for _ in range(200):
        base = free_port()
        wanted = {*range(base, base + count), *range(base + 10000, base + 10000 + twins)}
        if base + 10000 + count < 65535 and not wanted & taken and all(_free(port) for port in wanted):
            taken |= wanted
            return base
    raise RuntimeError("no free port range on 127.0.0.1 for SeaweedFS; free some ports")


def _secrets(state: Path) -> dict[str, str]:
    lines = (state / "stack" / "secrets.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _s3(env: dict[str, str], state: Path):
    import boto3

    keys = _secrets(state)
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{env['S3_PORT']}", region_name="us-east-1",
                        aws_access_key_id=keys["STACK_S3_ACCESS_KEY"],
                        aws_secret_access_key=keys["STACK_S3_SECRET_KEY"])


def _keys(client, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="module")
def postgres():
    """Two fresh databases (MLflow, Airflow) for the stack to use; dropped afterwards."""
    import psycopg2

    admin = _pg_admin_url()
    try:
        conn = psycopg2.connect(admin, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        require(False, f"no PostgreSQL reachable ({str(exc).strip().splitlines()[0]}); "
                     "run .ci/setup-postgres.sh or set CIFAR10_TEST_PG_URL")
    conn.autocommit = True
    suffix = uuid.uuid4().hex[:8]
    dbs = {"mlflow": f"mlflow_{suffix}", "airflow": f"airflow_{suffix}", "mlflow_auth": f"mlflow_auth_{suffix}"}
    try:
        yield {"admin": admin, "names": dbs, **{k: _with_db(admin, v) for k, v in dbs.items()}}
    finally:
        with conn.cursor() as cur:
            for db in dbs.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres):
    """The distributed stack up, one DAG run triggered through the REST API and finished."""
    from training.airflow_api import AirflowClient

    require("redis-server", "redis-server is not installed; run .ci/setup-redis.sh")
    tmp = tmp_path_factory.mktemp("distributed")
    state = tmp / "state"
    admin = urlsplit(postgres["admin"])
    # Distinct ports: each is free when chosen, and nothing binds one before the stack starts, so two draws
    # could return the same one (S3 and the front door once did).
    taken: set[int] = set()
    ports = {name: str(_free_range(1, 0, taken)) for name in ("AIRFLOW_PORT", "MLFLOW_PORT", "PROXY_PORT",
                                                              "BENTO_PORT", "FOLLOW_PORT", "REDIS_PORT")}
    s3_port = _free_range(1, 1, taken)
    env = state_env(state, STACK="distributed", CIFAR10_SCHEDULE="none", **ports,
                    S3_PORT=str(s3_port), WEED_PORTS=str(_free_range(6, 4, taken)),
                    POSTGRES_HOST=admin.hostname, POSTGRES_PORT=str(admin.port or 5432),
                    POSTGRES_USER=unquote(admin.username or ""), POSTGRES_PASSWORD=unquote(admin.password or ""),
                    AIRFLOW_DB=postgres["names"]["airflow"], MLFLOW_DB=postgres["names"]["mlflow"],
                    MLFLOW_AUTH_DB=postgres["names"]["mlflow_auth"])
    # state_env points Airflow and MLflow at SQLite; the distributed stack replaces both.
    started = time.monotonic()
    try:
        up = _stack(env, "up", "postgres", "redis", "s3", "mlflow", "airflow")
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        startup_s = time.monotonic() - started

        archive = image_folder_zip(tmp / "cifar-mini.zip", per_class=30, fmt="PNG")
        s3 = _s3(env, state)
        s3.upload_file(str(archive), BUCKET, "data/cifar-mini.zip")

        client = AirflowClient(f"http://127.0.0.1:{ports['AIRFLOW_PORT']}",
                               password_file=state / "airflow" / "simple_auth_manager_passwords.json.generated")
        client.wait_for_dag(DAG, 300)
        run = client.trigger(DAG, {**CONF, "data_url": f"s3://{BUCKET}/data/cifar-mini.zip"})
        run_id = run["dag_run_id"]
        deadline = time.monotonic() + 900
        while (state_now := client.dag_run(DAG, run_id)["state"]) not in ("success", "failed"):
            assert time.monotonic() < deadline, f"run {run_id} still {state_now} after 900 s"
            time.sleep(5)
        tasks = {t["task_id"]: t for t in client.task_instances(DAG, run_id)}
        yield {"env": env, "state": state, "tmp": tmp, "s3": s3, "pg": postgres, "run": run, "run_id": run_id,
               "run_state": state_now, "tasks": tasks, "client": client, "startup_s": startup_s}
    finally:
        _stack(env, "down", timeout=600)


def test_the_run_is_an_ordinary_run_that_succeeded_on_postgres(stack):
    import psycopg2

    assert stack["run_state"] == "success", {t: i["state"] for t, i in stack["tasks"].items()}
    assert stack["run"]["run_type"] == "manual"  # an ordinary run in the UI, not a test run
    states = {task: info["state"] for task, info in stack["tasks"].items()}
    assert states == {**{t: "success" for t in TASKS}, "containerize": "skipped"}, states
    with psycopg2.connect(stack["pg"]["airflow"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, state, run_type FROM dag_run WHERE dag_id = %s", (DAG,))
        assert cur.fetchall() == [(stack["run_id"], "success", "manual")]
    assert not (stack["state"] / "airflow" / "airflow.db").exists()  # nothing fell back to SQLite


def test_every_task_ran_through_the_celery_worker(stack):
    import psycopg2

    worker_log = (stack["state"] / "stack" / "airflow-worker.log").read_text(errors="replace")
    for task in TASKS:
        assert f"task_id={task}/" in worker_log, f"the Celery worker never executed {task}"
    assert all(info["queue"] == "default" for info in stack["tasks"].values())
    # Celery's result backend (a table in Airflow's database) holds one successful result per task;
    # the last one is written just after Airflow has seen the task finish.
    deadline = time.monotonic() + 60
    while True:
        with psycopg2.connect(stack["pg"]["airflow"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM celery_taskmeta GROUP BY status")
            results = dict(cur.fetchall())
        if results == {"SUCCESS": len(TASKS)} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert results == {"SUCCESS": len(TASKS)}
    # and the scheduler ran none of them itself
    scheduler_log = (stack["state"] / "stack" / "airflow-scheduler.log").read_text(errors="replace")
    assert "CeleryExecutor" in scheduler_log and "Executing workload" not in scheduler_log


def test_run_artifacts_are_in_the_bucket_not_on_disk(stack):
    keys = _keys(stack["s3"], "mlflow/")
    assert any(k.endswith("/onnx/model.onnx") for k in keys), keys
    assert any(k.endswith("/onnx/classes.json") for k in keys), keys
    assert not (stack["state"] / "mlflow").exists()


def test_registry_and_champion_alias_are_in_postgres(stack):
    import psycopg2

    with psycopg2.connect(stack["pg"]["mlflow"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = %s", (MODEL,))
        versions = cur.fetchall()
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,))
        aliases = dict(cur.fetchall())
        cur.execute("SELECT run_uuid, artifact_uri FROM runs")
        runs = dict(cur.fetchall())
    assert [v for v, _ in versions] == [1], versions
    assert aliases == {"champion": 1}
    assert runs[versions[0][1]].startswith("mlflow-artifacts:/"), runs  # proxied by the server, stored in S3


def test_mlflow_lets_nobody_in_without_the_admin_login_the_tasks_used(stack):
    """`--app-name basic-auth`: the run above logged in with the generated admin password; nobody else gets in."""
    import psycopg2

    url = f"http://127.0.0.1:{stack['env']['MLFLOW_PORT']}"
    search = f"{url}/api/2.0/mlflow/registered-models/search"
    password = _secrets(stack["state"])["STACK_MLFLOW_ADMIN_PASSWORD"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # the stack's readiness check needs none
    assert requests.get(search, timeout=10).status_code == 401
    assert requests.get(search, auth=("admin", "not-the-password"), timeout=10).status_code == 401
    found = requests.get(search, auth=("admin", password), timeout=10)
    assert found.status_code == 200 and [m["name"] for m in found.json()["registered_models"]] == [MODEL]
    move = requests.post(f"{url}/api/2.0/mlflow/registered-models/alias", timeout=10,
                         json={"name": MODEL, "alias": "champion", "version": "1"})
    assert move.status_code == 401  # nobody moves champion without a login
    with psycopg2.connect(stack["pg"]["mlflow_auth"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT username, is_admin FROM users")
        assert cur.fetchall() == [("admin", True)]


def test_the_bento_is_exported_to_s3_and_served_from_an_empty_store(stack, monkeypatch):
    """The stack's serving step is another machine's: it imports the Bento from S3, then serves it."""
    published = stack["client"].task_instances(DAG, stack["run_id"])
    assert {t["task_id"]: t["state"] for t in published}["publish"] == "success"
    bentos = [k for k in _keys(stack["s3"], "bentos/") if k.endswith(".bento")]
    assert len(bentos) == 1 and bentos[0].startswith("bentos/cifar10-classifier-"), bentos
    serving_home = stack["state"] / "serving" / "bentoml"
    assert not serving_home.exists()  # empty: nothing of the worker's store is there

    # The registry records which archive serving must import, and its sha256.
    from mlflow import MlflowClient

    registry = f"http://127.0.0.1:{stack['env']['MLFLOW_PORT']}"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # the stack's MLflow lets nobody in without a login
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", _secrets(stack["state"])["STACK_MLFLOW_ADMIN_PASSWORD"])
    champion = MlflowClient(tracking_uri=registry, registry_uri=registry).get_model_version_by_alias(MODEL, "champion")
    body = stack["s3"].get_object(Bucket=BUCKET, Key=bentos[0])["Body"].read()
    assert champion.tags["bento_archive_uri"] == f"s3://{BUCKET}/{bentos[0]}"
    assert champion.tags["bento_archive_sha256"] == hashlib.sha256(body).hexdigest()

    up = _stack(stack["env"], "up", "bento", "proxy", timeout=600)
    assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
    version = bentos[0].removeprefix("bentos/cifar10-classifier-").removesuffix(".bento")
    assert f"imported cifar10-classifier:{version} (the champion's, sha256 checked)" in up.stdout, up.stdout
    assert [p.name for p in (serving_home / "bentos" / "cifar10-classifier").iterdir() if p.is_dir()] == [version]
    assert any(p.name == MODEL for p in (serving_home / "models").iterdir())  # the model came inside

    x, _ = make_images(1, seed=3)
    resp = requests.post(f"http://127.0.0.1:{stack['env']['PROXY_PORT']}/predict",  # through the front door
                         files={"file": ("x.png", encode(x[0], "PNG"), "image/png")}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["label"] in CLASSES

    # The follower registered MLflow's registry webhook; the server's signed test delivery reaches it.
    from training.deploy.follow import WEBHOOK_NAME

    client = MlflowClient(tracking_uri=registry, registry_uri=registry)
    [hook] = [h for h in client.list_webhooks() if h.name == WEBHOOK_NAME]
    assert hook.url == f"http://127.0.0.1:{stack['env']['FOLLOW_PORT']}/webhook", hook.url
    delivered = client.test_webhook(hook.webhook_id)
    assert delivered.success and delivered.response_status == 204, delivered


def test_every_part_listens_on_loopback_only(stack):
    """Runs after the Bento started: redis, every SeaweedFS listener, MLflow, Airflow's components (their
    log servers are not started: they cannot be bound to an address) and the Bento, read from the kernel."""
    groups = stack_processes(stack["state"])  # and the process manager, which must listen on no port
    assert {"supervisord", "redis", "s3", "mlflow", "airflow-api-server", "airflow-worker", "airflow-triggerer",
            "bento-blue", "follow", "proxy"} <= set(groups), groups
    found = listeners(set(groups.values()))
    env = stack["env"]
    expected = {int(env[name]) for name in ("AIRFLOW_PORT", "MLFLOW_PORT", "PROXY_PORT", "BENTO_PORT", "FOLLOW_PORT",
                                            "REDIS_PORT", "S3_PORT")}
    weed = int(env["WEED_PORTS"])
    expected |= {weed, weed + 1, weed + 2, weed + 10000, weed + 10001, weed + 10002}  # master, volume, filer
    assert expected <= {port for _, _, port in found}, (sorted(expected), found)
    assert not not_loopback(found), found


def test_seaweedfs_takes_data_only_through_s3_with_the_stack_keys(stack):
    """Loopback is shared by every process of the machine: SeaweedFS's own APIs need a signed token or a client
    certificate that only its parts hold; the pipeline's way in, the S3 API with the stack's keys, works (above)."""
    import grpc

    weed = int(stack["env"]["WEED_PORTS"])
    master, volume, filer = (f"http://127.0.0.1:{weed + i}" for i in range(3))
    put = requests.put(f"{filer}/buckets/{BUCKET}/bentos/intruder.bento", data=b"x", timeout=10)
    assert put.status_code >= 400, put.status_code
    assert "bentos/intruder.bento" not in _keys(stack["s3"], "bentos/")
    assert requests.get(f"{filer}/buckets/{BUCKET}/", timeout=10).status_code >= 400  # no listing, no reading
    assert requests.post(f"{volume}/1,01637037d6", files={"file": b"x"}, timeout=10).status_code == 401
    # The master's HTTP API would hand out write tokens and delete whole collections (buckets).
    assert requests.get(f"{master}/dir/assign", timeout=10).status_code >= 400
    assert requests.get(f"{master}/col/delete", params={"collection": BUCKET}, timeout=10).status_code >= 400
    for port in (weed + 10000, weed + 10002):  # master and filer gRPC: mutual TLS only
        call = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(
            "/filer_pb.SeaweedFiler/GetFilerConfiguration", request_serializer=bytes,
            response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert _keys(stack["s3"], "mlflow/")  # and the bucket is whole


def test_no_password_appears_in_a_log(stack):
    passwords = [unquote(urlsplit(stack["pg"]["admin"]).password or ""),
                 _secrets(stack["state"])["STACK_MLFLOW_ADMIN_PASSWORD"]]
    assert all(passwords)
    logs = [p for p in (stack["state"] / "stack").glob("*.log")]
    logs += [p for p in (stack["state"] / "airflow" / "logs").rglob("*") if p.is_file()]
    assert logs
    assert not [(p, i) for p in logs for i, password in enumerate(passwords) if password in p.read_text(errors="replace")]


def test_down_leaves_no_process(stack):
    """Runs last: it stops the stack that the tests above used."""
    run_dir = stack["state"] / "stack"
    groups = stack_processes(stack["state"])
    assert {"supervisord", "redis", "s3", "mlflow", "airflow-scheduler", "airflow-api-server", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker", "bento-blue", "follow", "proxy"} <= groups.keys(), groups
    down = _stack(stack["env"], "down", timeout=600)
    assert down.returncode == 0, down.stderr
    left = []
    for name, pgid in groups.items():
        try:
            os.killpg(pgid, 0)
            left.append(name)
        except ProcessLookupError:
            pass
    assert not left, f"still running after down: {left}"
    assert not stack_processes(stack["state"]) and not list(run_dir.glob("*.pid"))
    for port in ("AIRFLOW_PORT", "MLFLOW_PORT", "PROXY_PORT", "BENTO_PORT", "FOLLOW_PORT", "REDIS_PORT", "S3_PORT"):
        assert not _listening(int(stack["env"][port])), f"{port} {stack['env'][port]} still served"


# --- fail fast on bad settings -------------------------------------------------

def test_a_wrong_broker_url_stops_the_stack_before_any_airflow_component_starts(tmp_path):
    closed = free_port()  # nothing listens here
    env = state_env(tmp_path / "state", STACK="distributed", AIRFLOW__CELERY__BROKER_URL=f"redis://127.0.0.1:{closed}/0",
                    AIRFLOW_PORT=str(free_port()), MLFLOW_PORT=str(free_port()), S3_PORT=str(free_port()))
    started = time.monotonic()
    out = _stack(env, "up", "airflow", timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert time.monotonic() - started < 60
    assert f"the Celery broker redis://127.0.0.1:{closed}/0 does not answer" in out.stderr, out.stderr
    assert "fix AIRFLOW__CELERY__BROKER_URL" in out.stderr
    assert not stack_processes(tmp_path / "state")
    assert not list((tmp_path / "state" / "stack").glob("airflow*.log"))  # not even migrated
