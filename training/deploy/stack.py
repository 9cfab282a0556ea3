"""`make up/down`: the local and the distributed stack, each process run, restarted and stopped by supervisord.

:func:`programs` describes each stack's processes and :func:`render` makes that supervisord's configuration.
`up` does what must come first (secrets and TLS material made once, databases, migrations, preflight checks,
which Bento to serve), has supervisord start each part and waits until it answers. No pid file is written or
read here; `make status` is supervisorctl's view. Settings: :func:`settings`, from the environment, which the
processes get as their supervisord started with (`make down` to change it).

    [STACK=local|distributed] python -m training.deploy.stack up|down [PART...]
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client
from pathlib import Path
from urllib.parse import quote

BIN = Path(sys.executable).parent
# In start order; supervisord stops them the other way round.
# The proxy (nginx, the front door clients reach) comes last: it forwards to the Bento slot that serves.
PARTS = {"local": ("airflow", "mlflow", "bento", "proxy"),
         "distributed": ("postgres", "redis", "s3", "mlflow", "airflow", "bento", "proxy")}
SECRETS = ("FERNET_KEY", "JWT_SECRET", "API_SECRET", "S3_ACCESS_KEY", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD",
           "MLFLOW_FLASK_SECRET", "WEED_JWT_KEY", "WEED_FILER_JWT_KEY", "WEED_FILER_READ_JWT_KEY", "WEBHOOK_SECRET",
           "MLFLOW_WEBHOOK_KEY")
UP = ("STARTING", "RUNNING", "BACKOFF")


def stack_secrets(run: Path) -> dict[str, str]:
    """What every process must share, generated once into secrets.env (mode 600) as STACK_<name>."""
    from cryptography.fernet import Fernet

    run.mkdir(parents=True, exist_ok=True)
    (path := run / "secrets.env").touch(0o600)
    have = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    fernet = lambda: Fernet.generate_key().decode()  # noqa: E731
    make = {"FERNET_KEY": fernet, "MLFLOW_WEBHOOK_KEY": fernet, "S3_ACCESS_KEY": lambda: f"cifar10-{secrets.token_hex(4)}"}
    new = {f"STACK_{name}": make.get(name, lambda: secrets.token_urlsafe(32))() for name in SECRETS
           if f"STACK_{name}" not in have}
    with path.open("a") as out:
        out.writelines(f"{name}={value}\n" for name, value in new.items())
    return {**have, **new}


def settings(stack: str, environ: dict[str, str]) -> dict[str, str]:
    """supervisord's environment, which its programs inherit: ``environ`` with the stack's defaults; for the
    distributed stack every variable deploy/compose.yaml sets. A value in ``environ`` wins, and full URLs win
    over the parts they would be made of (a SQLite URL, the local stack's, is replaced)."""
    env, state = dict(environ), Path(environ["CIFAR10_STATE_DIR"]).resolve()
    host = env.setdefault("STACK_HOST", "127.0.0.1")
    # PROXY_PORT is the port clients use (nginx); the Bento's two slots listen on loopback at BENTO_PORT and the
    # port after it, the follower's /metrics at FOLLOW_PORT (training/deploy/follow.py).
    proxy_port = env.setdefault("PROXY_PORT", "3000")
    for name, value in [("AIRFLOW_PORT", "8080"), ("MLFLOW_PORT", "5000"), ("BENTO_PORT", str(int(proxy_port) + 1)),
                        ("FOLLOW_PORT", str(int(proxy_port) + 3)),
                        ("AIRFLOW_HOME", f"{state}/airflow"), ("BENTOML_HOME", f"{state}/bentoml"),
                        ("MLFLOW_TRACKING_URI", f"sqlite:///{state}/mlflow/mlflow.db"),
                        ("AIRFLOW__CORE__LOAD_EXAMPLES", "False"),
                        ("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parents[2] / "dags")),
                        # Task processes call the execution API; 5 s timed out on a busy 2-core machine.
                        ("AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT", "60")]:
        env.setdefault(name, value)
    # The drift monitor reads the served Bento's /metrics through the front door, whichever slot serves.
    scheme = "https" if env.get("CIFAR10_TLS_CERT") else "http"
    env.setdefault("CIFAR10_MONITOR_URL", f"{scheme}://{host}:{proxy_port}")
    env.update(STACK=stack, STACK_RUN=f"{state}/stack", STACK_SERVING_HOME=env["BENTOML_HOME"],
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", AIRFLOW__API__HOST=host,
               AIRFLOW__API__PORT=env["AIRFLOW_PORT"], AIRFLOW__API__BASE_URL=f"http://localhost:{env['AIRFLOW_PORT']}",
               AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://{host}:{env['AIRFLOW_PORT']}/execution/",
               AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST=host)  # off unless turned on; private then
    if stack == "local":
        return env
    keys = stack_secrets(state / "stack")
    d = env.setdefault
    for name, value in [("POSTGRES_HOST", "127.0.0.1"), ("POSTGRES_PORT", env.get("CIFAR10_TEST_PG_PORT", "5432")),
                        ("POSTGRES_USER", env.get("CIFAR10_TEST_PG_USER", "cifar10")),
                        # .ci/setup-postgres.sh's throw-away CI password when none is given; never reuse it.
                        ("POSTGRES_PASSWORD", env.get("CIFAR10_TEST_PG_PASSWORD", "cifar10-ci-only")),
                        ("AIRFLOW_DB", "airflow"), ("MLFLOW_DB", "mlflow"), ("MLFLOW_AUTH_DB", "mlflow_auth"),
                        ("REDIS_PORT", "6380"), ("S3_PORT", "8333"), ("WEED_PORTS", "19330"), ("S3_BUCKET", "cifar10"),
                        ("MLFLOW_AUTH_ADMIN_USERNAME", "admin")]:
        d(name, value)
    at = f"{env['POSTGRES_HOST']}:{env['POSTGRES_PORT']}"
    pg = f"postgresql+psycopg2://{quote(env['POSTGRES_USER'], safe='')}:{quote(env['POSTGRES_PASSWORD'], safe='')}@{at}"
    if env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite").startswith("sqlite"):
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"{pg}/{env['AIRFLOW_DB']}"
    if env["MLFLOW_TRACKING_URI"].startswith("sqlite"):  # the tasks reach MLflow through its server, logged in
        env["MLFLOW_TRACKING_URI"] = f"http://{host}:{env['MLFLOW_PORT']}"
    s3, bucket = d("AWS_ENDPOINT_URL_S3", f"http://{host}:{env['S3_PORT']}"), env["S3_BUCKET"]
    password = d("MLFLOW_AUTH_ADMIN_PASSWORD", keys["STACK_MLFLOW_ADMIN_PASSWORD"])
    for name, value in [("MLFLOW_BACKEND_STORE_URI", f"{pg}/{env['MLFLOW_DB']}"),
                        # No password in it: the MLflow server's libpq takes it from PGPASSWORD.
                        ("MLFLOW_AUTH_DATABASE_URI", f"postgresql+psycopg2://{at}/{env['MLFLOW_AUTH_DB']}"),
                        ("AIRFLOW__CELERY__BROKER_URL", f"redis://{host}:{env['REDIS_PORT']}/0"),
                        ("AIRFLOW__CELERY__RESULT_BACKEND", "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]),
                        ("AWS_ACCESS_KEY_ID", keys["STACK_S3_ACCESS_KEY"]),
                        ("AWS_SECRET_ACCESS_KEY", keys["STACK_S3_SECRET_KEY"]), ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("MLFLOW_S3_ENDPOINT_URL", s3), ("MLFLOW_ARTIFACTS_DESTINATION", f"s3://{bucket}/mlflow"),
                        ("CIFAR10_BENTO_EXPORT_URI", f"s3://{bucket}/bentos/"),
                        ("MLFLOW_TRACKING_USERNAME", env["MLFLOW_AUTH_ADMIN_USERNAME"]),
                        ("MLFLOW_TRACKING_PASSWORD", password),
                        ("MLFLOW_FLASK_SERVER_SECRET_KEY", keys["STACK_MLFLOW_FLASK_SECRET"]),
                        # Workers have no container engine when deployed: the image is built from the Bento in S3.
                        ("CIFAR10_CONTAINER_BACKEND", "none"), ("AIRFLOW__CORE__FERNET_KEY", keys["STACK_FERNET_KEY"]),
                        ("AIRFLOW__API_AUTH__JWT_SECRET", keys["STACK_JWT_SECRET"]),
                        ("AIRFLOW__API__SECRET_KEY", keys["STACK_API_SECRET"]),
                        # The registry webhook that wakes the follower when an alias moves: the follower
                        # listens on loopback over plain HTTP, which MLflow refuses unless allowed; the
                        # deliveries are signed with the shared secret, stored encrypted by MLflow.
                        ("CIFAR10_WEBHOOK_SECRET", keys["STACK_WEBHOOK_SECRET"]),
                        ("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", keys["STACK_MLFLOW_WEBHOOK_KEY"]),
                        ("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https"), ("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")]:
        d(name, value)
    tls = f"{state}/stack/seaweedfs-tls"
    env.update({f"WEED_GRPC_{part}_{kind.upper()}": f"{tls}/{kind}.pem"
                for part in ("MASTER", "VOLUME", "FILER", "S3", "ADMIN", "WORKER", "CLIENT") for kind in ("cert", "key")})
    env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = env.get("WORKER_CONCURRENCY") or d("AIRFLOW__CELERY__WORKER_CONCURRENCY", "1")
    env.update(AIRFLOW__CORE__EXECUTOR="CeleryExecutor", PGUSER=env["POSTGRES_USER"], PGPASSWORD=env["POSTGRES_PASSWORD"],
               MLFLOW_AUTH_CONFIG_PATH=f"{state}/stack/mlflow-basic-auth.ini", WEED_GRPC_CA=f"{tls}/ca.pem",
               # The serving machine's own store: empty until `up bento` imports the champion's Bento.
               STACK_SERVING_HOME=f"{state}/serving/bentoml", WEED_JWT_SIGNING_KEY=keys["STACK_WEED_JWT_KEY"],
               WEED_JWT_FILER_SIGNING_KEY=keys["STACK_WEED_FILER_JWT_KEY"],
               WEED_JWT_FILER_SIGNING_READ_KEY=keys["STACK_WEED_FILER_READ_JWT_KEY"])
    return env


def programs(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each part of ``env``'s stack, in start order: its programs' command lines. Every listener clients or
    other parts reach binds STACK_HOST; the Bento's slots (each serving the Bento named in its tag file) bind
    loopback, behind the proxy."""
    q = {name: shlex.quote(value) for name, value in env.items()}
    host, run, state = q["STACK_HOST"], q["STACK_RUN"], q["CIFAR10_STATE_DIR"]
    # Each component its own process. --skip-serve-logs: Airflow has no setting for the address of the log
    # servers the scheduler, triggerer and Celery worker start, and they bind every interface; on one
    # machine the API server reads task logs from $AIRFLOW_HOME/logs itself.
    airflow = {"airflow-api-server": f"airflow api-server --host {host} --port {q['AIRFLOW_PORT']}",
               "airflow-scheduler": "airflow scheduler --skip-serve-logs", "airflow-dag-processor": "airflow dag-processor",
               "airflow-triggerer": "airflow triggerer --skip-serve-logs"}
    bento = {**{f"bento-{slot}": f"python -m training.deploy.follow slot {slot}" for slot in ("blue", "green")},
             "follow": "python -m training.deploy.follow"}
    from training.deploy.proxy import nginx_binary

    nginx = shlex.quote(nginx_binary(env.get("PATH")) or "nginx")
    # The front clients reach, and the switch behind it that the follower reloads (training/deploy/proxy.py).
    proxy = {"switch": f"{nginx} -c {run}/switch.conf -e stderr -p {run}/switch/",
             "proxy": f"{nginx} -c {run}/nginx.conf -e stderr -p {run}/nginx/"}
    if env["STACK"] == "local":
        return {"airflow": airflow, "mlflow": {"mlflow": f"mlflow server --backend-store-uri {q['MLFLOW_TRACKING_URI']} "
                                                         f"--default-artifact-root file://{state}/mlflow/artifacts "
                                                         f"--host {host} --port {q['MLFLOW_PORT']} --workers 1"},
                "bento": bento, "proxy": proxy}
    weed, s3 = int(env["WEED_PORTS"]), int(env["S3_PORT"])
    ports = " ".join(f"-{name}.port={weed + i} -{name}.port.grpc={weed + 10000 + i}"
                     for i, name in enumerate(("master", "volume", "filer", "admin")))
    allowed = shlex.quote(f"localhost,localhost:*,{env['STACK_HOST']},{env['STACK_HOST']}:*")
    return {
        # A broker only: no snapshots or append-only file; queued messages do not outlive the stack.
        "redis": {"redis": f"redis-server --port {q['REDIS_PORT']} --bind {host} --save '' --appendonly no "
                           f"--dir {run}/redis --daemonize no"},
        # Master, volume, filer and S3 gateway, each listener on a port of its own (other SeaweedFS servers may
        # run here). Loopback is shared by every process of the machine, so its own APIs are closed to them:
        # gRPC is mutual TLS (WEED_GRPC_*), volume and filer access needs JWTs signed with the WEED_JWT_* keys,
        # and -disableHttp turns off the master's HTTP API (write tokens for anyone, bucket deletion).
        "s3": {"s3": f"weed -logtostderr mini -dir={state}/s3 -ip={host} -ip.bind={host} -disableHttp {ports} "
                     f"-debug.port={weed + 4} -metricsPort={weed + 5} -s3.port={s3} -s3.port.grpc={s3 + 10000} "
                     "-s3.port.iceberg=0 -s3.port.lance=0 -admin.ui=false -webdav=false -master.telemetry=false "
                     f"-bucket={q['S3_BUCKET']} -s3.autoCreateBucket=false -s3.localSocket={run}/s3.sock "
                     f"-filer.localSocket={run}/filer.sock"},
        # A login for every request but /health; stores, passwords and keys by environment, never in argv.
        "mlflow": {"mlflow": f"mlflow server --app-name basic-auth --host {host} --port {q['MLFLOW_PORT']} "
                             f"--workers 1 --allowed-hosts {allowed}"},
        # The worker's own name tells it apart in the task instances, as on a worker machine.
        "airflow": {**airflow, "airflow-worker": "airflow celery worker --celery-hostname cifar10-worker@%h "
                                                 f"--concurrency {q['AIRFLOW__CELERY__WORKER_CONCURRENCY']} --skip-serve-logs"},
        "bento": bento, "proxy": proxy}


# nginx stops gracefully on QUIT (requests in flight are answered first); TERM would cut them off.
STOP_SIGNAL = {"proxy": "QUIT", "switch": "QUIT"}
# ... and may take its worker_shutdown_timeout to answer them: supervisord waits that long before killing it.
STOP_WAIT_S = {"proxy": 70, "switch": 70}


def render(env: dict[str, str]) -> Path:
    """supervisord's configuration of the stack, written to the state folder: XML-RPC on a socket only this
    user may open (no TCP port); each program starts only when `up` asks, restarts when it dies, is stopped
    with its process group (servers' workers, task processes; killed after 30 s, nginx after 70 s) and logs to <name>.log."""
    run = env["STACK_RUN"]
    sections = [f"[supervisord]\nidentifier=cifar10-{env['STACK']}\nlogfile={run}/supervisord.log\n"
                f"pidfile={run}/supervisord.pid\nchildlogdir={run}",
                f"[unix_http_server]\nfile={run}/supervisor.sock\nchmod=0700",
                "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface"]
    for priority, (part, members) in enumerate(programs(env).items(), 1):
        sections.append(f"[group:{part}]\nprograms={','.join(members)}\npriority={priority}")
        sections += [f"[program:{name}]\ncommand={command}\nautostart=false\nautorestart=true\nstopasgroup=true\n"
                     f"stopwaitsecs={STOP_WAIT_S.get(name, 30)}\nstopsignal={STOP_SIGNAL.get(name, 'TERM')}\nredirect_stderr=true\n"
                     f"stdout_logfile={run}/{name}.log" for name, command in members.items()]
    path = Path(run) / "supervisord.conf"
    path.write_text("\n\n".join(sections).replace("%", "%%") + "\n")
    return path


def seaweedfs_tls(out: Path) -> None:
    """One self-signed certificate, made once, that every part of SeaweedFS presents and trusts (it checks no
    host names): with it every gRPC listener asks for a client certificate that only those parts hold."""
    if (out / "key.pem").exists():
        return
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key, now = ec.generate_private_key(ec.SECP256R1()), datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cifar10 stack SeaweedFS")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    out.mkdir(mode=0o700, exist_ok=True)
    (out / "ca.pem").write_bytes(cert)
    (out / "cert.pem").write_bytes(cert)
    (out / "key.pem").touch(0o600)
    (out / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))


def postgres_databases(env: dict[str, str]) -> None:
    """The Airflow, MLflow and MLflow-auth databases, created when missing."""
    import psycopg2
    from psycopg2 import sql

    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, host=env["POSTGRES_HOST"],
                                port=env["POSTGRES_PORT"], user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"])
    except psycopg2.OperationalError as exc:
        raise SystemExit(f"postgres: cannot log in ({str(exc).strip().splitlines()[0]}): start PostgreSQL (Debian: "
                         ".ci/setup-postgres.sh) or fix POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD")
    conn.autocommit = True
    names = list(dict.fromkeys(env[name] for name in ("AIRFLOW_DB", "MLFLOW_DB", "MLFLOW_AUTH_DB")))
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        for db in set(names) - {row[0] for row in cur.fetchall()}:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    conn.close()
    print(f"postgres: databases {', '.join(names)} ready")


def manager(run: Path) -> xmlrpc.client.ServerProxy:
    """supervisord's XML-RPC interface on the stack's socket."""
    from supervisor.xmlrpc import SupervisorTransport

    return xmlrpc.client.ServerProxy("http://localhost", SupervisorTransport(serverurl=f"unix://{run}/supervisor.sock"))


def answering(rpc) -> str | None:
    """The identifier of the supervisord on ``rpc`` (cifar10-local or cifar10-distributed); None when none answers."""
    try:
        return rpc.supervisor.getIdentification()
    except OSError:  # no socket, or one a dead supervisord left: nothing runs
        rpc("close")()
        return None
    except xmlrpc.client.Fault as exc:
        raise SystemExit(f"stack: its supervisord is stopping every program ({exc.faultString}): try again soon")


def _running(rpc, group: str | None = None) -> list[dict]:
    return [p for p in rpc.supervisor.getAllProcessInfo() if p["statename"] in UP and group in (None, p["group"])]


def _preflight(env: dict[str, str], *checks: str, quiet: bool = False) -> bool:
    """Whether training.deploy.preflight's ``checks`` pass; unless ``quiet``, a failure (which the checks explain)
    ends the start."""
    from training.deploy import preflight

    sink = io.StringIO()
    if (failed := preflight.run(list(checks), env, *((sink, sink) if quiet else ()))) and not quiet:
        raise SystemExit("stack: fix the setting named above, then run this again")
    return not failed


def _http(url: str):
    """A readiness check: ``url`` answers 200."""
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:
                return answer.status == 200
        except OSError:
            return False
    return ready


def _answers(env: dict[str, str]):
    """A readiness check of the front door: it answers HTTP at all (502 while no Bento serves yet)."""
    import http.client
    import ssl

    def ready() -> bool:
        host, port = env["STACK_HOST"], int(env["PROXY_PORT"])
        conn = (http.client.HTTPSConnection(host, port, timeout=3, context=ssl._create_unverified_context())
                if env.get("CIFAR10_TLS_CERT") else http.client.HTTPConnection(host, port, timeout=3))
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status > 0
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
    return ready


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-20:]) if path.exists() else ""


def _bento(env: dict[str, str]) -> str | None:
    """The Bento to serve (BENTO_TAG, else the champion's); None, having said why, when there is none yet."""
    python, why = str(BIN / "python"), ""
    if env["STACK"] == "distributed":
        # The serving machine's step: the archive the registry records for the champion, refused unless its
        # sha256 matches the record, into an empty store of its own.
        done = subprocess.run([python, "-m", "training.packaging.bento_store", "import"], text=True, capture_output=True,
                              env={**env, "BENTOML_HOME": env["STACK_SERVING_HOME"]})
        if done.returncode not in (0, 3) or (done.returncode == 0 and not done.stdout.strip()):
            raise SystemExit(f"bento: not served: {done.stderr.strip()[-500:]}")
        if done.returncode == 0:
            print(f"bento: imported {done.stdout.split()[-1]} (the champion's, sha256 checked) into {env['STACK_SERVING_HOME']}")
    elif env.get("BENTO_TAG"):
        done = subprocess.run([str(BIN / "bentoml"), "get", env["BENTO_TAG"]], env=env, capture_output=True, text=True)
        done.stdout, why = env["BENTO_TAG"], f"no {env['BENTO_TAG']} in {env['BENTOML_HOME']}"
    else:
        done = subprocess.run([python, "-m", "training.deploy.champion", "bento"], env=env, text=True, capture_output=True)
    if done.returncode == 0:
        return done.stdout.split()[-1]
    print(f"bento: nothing to serve yet ({why or (done.stderr.strip().splitlines() or ['?'])[-1]}): trigger the DAG (Airflow UI), "
          "then run this again")
    return None


def _unlink_stale_socket(path: Path) -> None:
    """Remove a socket file no server listens on (one left by an nginx that was killed): binding it would fail."""
    import socket

    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except FileNotFoundError:
            pass
        except ConnectionRefusedError:
            path.unlink()


def _prepare(env: dict[str, str], part: str) -> list | None:
    """Do what ``part`` needs before it starts; return its programs, each with its readiness check, or None
    when there is nothing to start (postgres is databases only; the Bento only once there is one)."""
    run, host, distributed = Path(env["STACK_RUN"]), env["STACK_HOST"], env["STACK"] == "distributed"
    if part == "postgres":
        postgres_databases(env)
    elif part == "redis":
        if not shutil.which("redis-server", path=env["PATH"]):
            raise SystemExit("redis: no redis-server: run .ci/setup-redis.sh (Debian: apt-get install redis-server)")
        (run / "redis").mkdir(exist_ok=True)
        return [("redis", lambda: _preflight(env, "broker", quiet=True))]
    elif part == "s3":
        (Path(env["CIFAR10_STATE_DIR"]) / "s3").mkdir(exist_ok=True)
        seaweedfs_tls(run / "seaweedfs-tls")
        return [("s3", lambda: _preflight(env, "s3", quiet=True))]
    elif part == "mlflow":
        health = _http(f"http://{host}:{env['MLFLOW_PORT']}/health")
        if not distributed:  # its store and artifacts in the state folder; the distributed one's in PostgreSQL and S3
            (Path(env["CIFAR10_STATE_DIR"]) / "mlflow").mkdir(exist_ok=True)
            return [("mlflow", health)]
        _preflight(env, "postgres", "s3")
        Path(env["MLFLOW_AUTH_CONFIG_PATH"]).write_text(  # users and permissions in this database
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\nauthorization_function = mlflow.server.auth:"
            f"authenticate_request_basic_auth\ndatabase_uri = {env['MLFLOW_AUTH_DATABASE_URI'].replace('%', '%%')}\n")
        # Ready when it answers and lets the tasks' login in (a wrong one fails at once).
        return [("mlflow", lambda: health() and _preflight(env, "mlflow"))]
    elif part == "airflow":
        if distributed:
            _preflight(env, "postgres", "broker", "s3", "mlflow")
        Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
        print(f"airflow: migrating the metadata database (log {run}/airflow-migrate.log)")
        with open(run / "airflow-migrate.log", "w") as log:
            if subprocess.run(["airflow", "db", "migrate"], env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"airflow: db migrate failed:\n{_tail(run / 'airflow-migrate.log')}")
        waits = [(name, lambda: True) for name in programs(env)["airflow"]]
        waits[0] = ("airflow-api-server", _http(f"http://{host}:{env['AIRFLOW_PORT']}/api/v2/monitor/health"))
        if distributed:
            waits[-1] = ("airflow-worker", lambda: "ready." in (run / "airflow-worker.log").read_text(errors="replace"))
        return waits
    elif part == "bento":
        from training.deploy import slots

        # A fresh start serves from the blue slot; the follower then keeps it on the champion.
        slots.save(run, slots.Served())
        if not (tag := _bento(env)):
            print("bento: the follower starts the champion's Bento once a run promotes one")
            return [("follow", lambda: True)]
        slots.assign(run, "blue", tag)
        slots.save(run, slots.Served("blue", tag, ""))
        return [("bento-blue", _http(f"http://127.0.0.1:{slots.slot_port(env, 'blue')}/readyz")), ("follow", lambda: True)]
    elif part == "proxy":
        from training.deploy import proxy, slots

        if not proxy.nginx_binary(env["PATH"]):
            raise SystemExit("proxy: no nginx: run .ci/setup-nginx.sh (Debian: apt-get install nginx)")
        proxy.write(env, slots.slot_port(env, slots.load(run).slot or "blue"))
        proxy.write_front(env)
        _unlink_stale_socket(run / "switch.sock")
        return [("switch", lambda: (run / "switch.sock").exists()), ("proxy", _answers(env))]
    return None


def _wait(rpc, run: Path, part: str, program: str, ready, limit: float) -> None:
    """Until ``ready()``; a program that exits or is not ready in time fails the start and its part is stopped."""
    deadline = time.monotonic() + limit
    while (state := rpc.supervisor.getProcessInfo(f"{part}:{program}")["statename"]) in UP:
        if state == "RUNNING" and ready():
            print(f"{program}: ready")
            return
        if time.monotonic() > deadline:
            state = f"not ready after {limit:.0f} s"
            break
        time.sleep(1)
    rpc.supervisor.stopProcessGroup(part)
    raise SystemExit(f"{program}: {state.lower()} (stopped); last lines of {run}/{program}.log:\n{_tail(run / f'{program}.log')}")


def up(env: dict[str, str], parts: list[str]) -> None:
    """Start ``parts`` in order: in the distributed stack each once the one before answers, in the local one
    all at once. Parts that run already are left as they are."""
    state, run = Path(env["CIFAR10_STATE_DIR"]), Path(env["STACK_RUN"])
    run.mkdir(parents=True, exist_ok=True)
    # The databases, the Airflow admin's password (Airflow writes it 644) and the secrets live here: no other
    # user may enter. (A umask would also reach the image builds, whose files the image's own user must read.)
    state.chmod(0o700)
    rpc, limit, pending = manager(run), float(env.get("STACK_START_TIMEOUT", "600")), []
    if (ident := answering(rpc)) not in (None, f"cifar10-{env['STACK']}"):
        raise SystemExit(f"stack: {ident} runs on {state}: make down first")
    try:
        for part in parts:
            if ident and _running(rpc, part):
                print(f"{part}: already running")
            elif (waits := _prepare(env, part)) is not None:
                conf = render(env)
                if ident is None:
                    subprocess.run([str(BIN / "supervisord"), "-c", str(conf)], env=env, check=True)  # it daemonizes
                    for _ in range(300):
                        if ident := answering(rpc):
                            break
                        time.sleep(0.2)
                    else:
                        raise SystemExit(f"stack: supervisord does not answer; see {run}/supervisord.log")
                # A part's configuration changes with its settings (the Bento's tag): supervisord takes it anew.
                added, changed, _ = rpc.supervisor.reloadConfig()[0]
                if part in changed:
                    rpc.supervisor.removeProcessGroup(part)
                if part in added + changed:
                    rpc.supervisor.addProcessGroup(part)
                for program, _ in waits:  # only these: the Bento's idle slot stays stopped
                    rpc.supervisor.startProcess(f"{part}:{program}", False)
                pending += [(part, *wait) for wait in waits]
            while pending and (env["STACK"] == "distributed" or part == parts[-1]):
                _wait(rpc, run, *pending.pop(0), limit)
    finally:
        if answering(rpc) and not _running(rpc):
            rpc.supervisor.shutdown()
    if parts == list(PARTS[env["STACK"]]):
        login = "STACK_MLFLOW_ADMIN_PASSWORD in secrets.env" if "PGUSER" in env else "no login"
        print(f"\nAirflow http://localhost:{env['AIRFLOW_PORT']} (admin, {env['AIRFLOW_HOME']}/simple_auth_manager_"
              f"passwords.json.generated)\nMLflow http://localhost:{env['MLFLOW_PORT']} (admin, {login})  Bento "
              f"http{'s' if env.get('CIFAR10_TLS_CERT') else ''}://localhost:{env['PROXY_PORT']} (Swagger UI, through nginx)\nLogs {run}/*.log  make status  make down")


def sweep(run: Path, parts: list[str]) -> int:
    """Stop what outlived its supervisord (killed, crashed): processes whose environment names this stack's
    socket, which supervisord gives each program and its children inherit. A pid file can name an unrelated
    process after a reboot; this mark cannot. Returns how many there were."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            marks = proc.environ()
        except (psutil.Error, OSError):
            continue
        if (proc.pid != os.getpid() and marks.get("SUPERVISOR_SERVER_URL") == f"unix://{run}/supervisor.sock"
                and (not parts or marks.get("SUPERVISOR_GROUP_NAME") in parts)):
            found.append(proc)
            proc.terminate()
    for proc in psutil.wait_procs(found, timeout=30)[1]:
        proc.kill()
    return len(found)


def down(run: Path, parts: list[str]) -> None:
    """Stop ``parts`` (all: and supervisord), last started first; supervisord goes once nothing runs."""
    rpc = manager(run)
    if answering(rpc):
        for part in reversed(parts):
            if part in {p["group"] for p in _running(rpc)} and rpc.supervisor.stopProcessGroup(part):
                print(f"{part}: stopped")
        if not parts or not _running(rpc):
            import psutil

            manager_pid = rpc.supervisor.getPID()
            rpc.supervisor.shutdown()  # stops each part, last started first, then itself
            try:  # its socket goes before it has exited: wait for the process, so a new `up` finds the state free
                psutil.Process(manager_pid).wait(600)
            except psutil.NoSuchProcess:
                pass
            print(f"stack: stopped ({run})")
    if left := sweep(run, parts):
        print(f"stack: stopped {left} processes left by a supervisord that had died")


def main(argv: list[str] | None = None) -> None:
    """The CLI; a part that cannot start exits with status 1 and what to fix (SystemExit)."""
    parser = argparse.ArgumentParser(prog="python -m training.deploy.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("parts", nargs="*", help=f"default: all; {', '.join(PARTS['distributed'])}")
    args = parser.parse_args(argv)
    if not os.environ.get("CIFAR10_STATE_DIR"):
        parser.error("set CIFAR10_STATE_DIR (the Makefile does)")
    run = Path(os.environ["CIFAR10_STATE_DIR"]).resolve() / "stack"
    # Unset: the stack that runs on this state (make rollback restarts its Bento), else the local one.
    stack = os.environ.get("STACK") or (answering(manager(run)) or "cifar10-local").removeprefix("cifar10-")
    known = PARTS.get(stack, ()) if args.command == "up" else PARTS["distributed"]  # down: whichever runs
    if not known or set(args.parts) - set(known):
        parser.error(f"STACK={stack} has the parts {', '.join(known) or '(none: local or distributed)'}")
    if args.command == "up":
        os.environ.update(env := settings(stack, dict(os.environ)))  # for the checks run here too (boto3 reads it)
        up(env, [part for part in known if part in args.parts or not args.parts])
    else:
        down(run, [part for part in known if part in args.parts])


if __name__ == "__main__":
    main()
