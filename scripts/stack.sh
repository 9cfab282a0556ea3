#!/usr/bin/env bash
# The pipeline's services in the background, all on one state folder. Two shapes:
#
# STACK=local (default): Airflow (API server + UI, scheduler, dag-processor and triggerer, each its
#   own process, LocalExecutor on SQLite), the MLflow tracking server over the pipeline's store, and
#   `bentoml serve` of the champion's Bento. NAME: airflow, mlflow, bento (default: all).
#
# STACK=distributed: the deployed shape of deploy/compose.yaml on one machine, each part its
#   own process with the same settings: PostgreSQL (the machine's cluster, see
#   .ci/setup-postgres.sh; the stack creates its databases), Redis as the Celery broker,
#   SeaweedFS as the S3 store, the MLflow server on PostgreSQL with artifacts in S3, Airflow's
#   API server, scheduler, dag-processor, triggerer and a Celery worker on PostgreSQL, and the
#   champion's Bento, imported from S3 (the archive the registry records, its sha256 checked) into a
#   store of its own, as a serving machine would, and served.
#   NAME: postgres, redis, s3, mlflow, airflow, bento (default: all). Leave out a part that a
#   managed service provides and point its variable at that service (docs/deploy.md).
#
#   [STACK=distributed] scripts/stack.sh up [NAME...] | down [NAME...] | status
#
# Configuration, all from the environment (the Makefile sets the first ones):
#   CIFAR10_STATE_DIR   state folder (Airflow home, MLflow store, BentoML home); required
#   AIRFLOW_PORT=8080 MLFLOW_PORT=5000 BENTO_PORT=3000
#   STACK_HOST=127.0.0.1: the address every listener of either shape binds (this machine only;
#     0.0.0.0 opens them all to the network)
#   AIRFLOW_HOME, MLFLOW_TRACKING_URI, BENTOML_HOME: as for `make run`
#   distributed only (defaults in brackets):
#   POSTGRES_HOST [127.0.0.1] POSTGRES_PORT [5432] POSTGRES_USER [cifar10] POSTGRES_PASSWORD
#     [.ci/setup-postgres.sh's throw-away CI password] AIRFLOW_DB [airflow] MLFLOW_DB [mlflow]
#     MLFLOW_AUTH_DB [mlflow_auth]: MLflow's users and permissions (`--app-name basic-auth`)
#   REDIS_PORT [6380] S3_PORT [8333] S3_BUCKET [cifar10] WEED_PORTS [19330]: the first of 6
#     consecutive ports for SeaweedFS's other listeners (each gRPC twin at +10000)
#   WORKER_CONCURRENCY [1]
#   Full URLs win over the parts above: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN (unless sqlite),
#   MLFLOW_BACKEND_STORE_URI, AIRFLOW__CELERY__BROKER_URL, AWS_ENDPOINT_URL_S3,
#   MLFLOW_ARTIFACTS_DESTINATION, CIFAR10_BENTO_EXPORT_URI, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
#   MLFLOW_AUTH_DATABASE_URI.
#   Secrets every Airflow component must share (fernet key, JWT and API secrets), the S3 user's
#   keys and the MLflow admin's password (user MLFLOW_AUTH_ADMIN_USERNAME, admin) are generated
#   once into $CIFAR10_STATE_DIR/stack/secrets.env (mode 600).
# Logs and pid files: $CIFAR10_STATE_DIR/stack/<name>.{log,pid}. `down` stops exactly
# the process groups recorded in those pid files, whichever STACK started them.
set -euo pipefail

STATE="${CIFAR10_STATE_DIR:?set CIFAR10_STATE_DIR (the Makefile does)}"
BIN="${VENV_BIN:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin}"
RUN="$STATE/stack"
AIRFLOW_PORT="${AIRFLOW_PORT:-8080}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
BENTO_PORT="${BENTO_PORT:-3000}"
HOST="${STACK_HOST:-127.0.0.1}"
# Unset: the Bento the registry's champion names (python -m training.deploy.champion bento).
BENTO="${BENTO_TAG:-}"
mkdir -p "$RUN"
# The state folder holds the databases, the Airflow admin's generated password (Airflow writes it
# 644) and the stack's secrets: no other user of this machine may enter it. (A umask would also
# reach the image builds the pipeline runs, whose files the image's own user must read.)
chmod go-rwx "$STATE"
# airflow standalone starts its components as `airflow ...`: they must be on PATH.
export PATH="$BIN:$PATH"

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# start NAME CMD...: run CMD in its own session (so `down` can stop its whole group).
start() {
  local name=$1; shift
  if running "$name"; then echo "$name: already running (pid $(cat "$RUN/$name.pid"))"; return; fi
  setsid "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
}

# wait_for NAME SECONDS CMD...: until CMD succeeds, or the process NAME died, or time is up.
wait_for() {
  local name=$1 limit=$2 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if ! running "$name"; then echo "$name: exited; last log lines:" >&2; tail -20 "$RUN/$name.log" >&2; return 1; fi
    if [ $SECONDS -ge $deadline ]; then echo "$name: not ready after $limit s; see $RUN/$name.log" >&2; return 1; fi
    sleep 1
  done
}

# wait_http NAME URL SECONDS: until URL answers 200, or the process died, or time is up.
wait_http() { wait_for "$1" "$3" curl -fs -o /dev/null --max-time 3 "$2" && echo "$1: $2 ready"; }

# wanted NAME: whether NAME is among the names given to up/down (all when none were given).
wanted() { [ ${#NAMES[@]} -eq 0 ] || [[ " ${NAMES[*]} " == *" $1 "* ]]; }

up() {
  # Tasks that airflow standalone runs reach its execution API on this port.
  export AIRFLOW__API__PORT="$AIRFLOW_PORT" AIRFLOW__API__HOST="$HOST"
  export AIRFLOW__API__BASE_URL="http://localhost:$AIRFLOW_PORT"
  # Task processes call that API; its 5 s default timed out here on a busy 2-core machine
  # (httpx.ReadTimeout, task marked up_for_retry).
  export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="${AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT:-60}"
  # The drift monitor watches the Bento server this stack starts.
  export CIFAR10_MONITOR_URL="${CIFAR10_MONITOR_URL:-http://$HOST:$BENTO_PORT}"
  ! wanted airflow || start_airflow
  if wanted mlflow; then
    mkdir -p "$STATE/mlflow"
    start mlflow "$BIN/mlflow" server --backend-store-uri "${MLFLOW_TRACKING_URI:?}" \
      --default-artifact-root "file://$STATE/mlflow/artifacts" --host "$HOST" --port "$MLFLOW_PORT" --workers 1
  fi
  local bento="$BENTO"
  if ! wanted bento; then :
  elif [ -z "$bento" ] && ! bento=$("$BIN/python" -m training.deploy.champion bento 2>"$RUN/bento-champion.log"); then
    echo "bento: nothing to serve yet ($(tail -1 "$RUN/bento-champion.log")): trigger the DAG in the Airflow UI," \
         "then run this again"
  elif "$BIN/bentoml" get "$bento" >/dev/null 2>&1; then
    start bento "$BIN/bentoml" serve "$bento" --host "$HOST" --port "$BENTO_PORT"
  else
    echo "bento: no $bento in $BENTOML_HOME: trigger the DAG in the Airflow UI, then run this again"
  fi
  # Generous limits: on a busy 2-core machine each of them took minutes to start.
  local limit="${STACK_START_TIMEOUT:-600}"
  ! wanted mlflow || wait_http mlflow "http://$HOST:$MLFLOW_PORT/health" "$limit"
  ! wanted bento || ! running bento || wait_http bento "http://$HOST:$BENTO_PORT/readyz" "$limit"
  ! wanted airflow || wait_airflow "$limit"
  [ ${#NAMES[@]} -eq 0 ] || return 0
  cat <<EOF

Airflow UI  http://localhost:$AIRFLOW_PORT  user "admin", password in
            $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated
            (the DAG retrains on CIFAR10_SCHEDULE by itself; trigger a run with its params form)
MLflow UI   http://localhost:$MLFLOW_PORT
Bento       http://localhost:$BENTO_PORT  (Swagger UI; POST /predict)
Logs        $RUN/*.log        Stop: make down
EOF
}

# Every process either shape starts, in the order `down` stops them: users before what they use.
# ("airflow" is the `airflow standalone` of earlier versions of this script, still stopped by `down`.)
PROCESSES="bento airflow-worker airflow-triggerer airflow-dag-processor airflow-scheduler airflow-api-server
airflow mlflow s3 redis"

# start_airflow [celery]: Airflow's components, each its own process (with "celery", also a Celery
# worker): what `airflow standalone` runs, whose log servers could not be kept on STACK_HOST.
start_airflow() {
  mkdir -p "$AIRFLOW_HOME"
  # Only what each component reads; a scheduler health check, if someone turns it on, stays private too.
  export AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST="$HOST"
  echo "airflow: migrating the metadata database (log $RUN/airflow-migrate.log)"
  "$BIN/airflow" db migrate >"$RUN/airflow-migrate.log" 2>&1 || { tail -20 "$RUN/airflow-migrate.log" >&2; exit 1; }
  start airflow-api-server "$BIN/airflow" api-server --port "$AIRFLOW_PORT" --host "$HOST"
  # --skip-serve-logs: Airflow 3.3 has no setting for the address of the log servers that the
  # scheduler (LocalExecutor), the triggerer and a Celery worker start, and they listen on every
  # interface. On one machine the API server reads task logs from $AIRFLOW_HOME/logs itself.
  start airflow-scheduler "$BIN/airflow" scheduler --skip-serve-logs
  start airflow-dag-processor "$BIN/airflow" dag-processor
  start airflow-triggerer "$BIN/airflow" triggerer --skip-serve-logs
  if [ "${1:-}" = celery ]; then
    # Its own process, as on a worker machine; the name tells it apart in the task instances.
    start airflow-worker "$BIN/airflow" celery worker --celery-hostname "cifar10-worker@%h" \
      --concurrency "$AIRFLOW__CELERY__WORKER_CONCURRENCY" --skip-serve-logs
  fi
}

# wait_airflow SECONDS: the API server answers, and the other components are still running.
wait_airflow() {
  local name
  wait_http airflow-api-server "http://$HOST:$AIRFLOW_PORT/api/v2/monitor/health" "$1"
  for name in airflow-scheduler airflow-dag-processor airflow-triggerer; do
    running "$name" || { echo "$name: exited; last log lines:" >&2; tail -20 "$RUN/$name.log" >&2; exit 1; }
  done
}

down() {
  local name pid
  for name in $PROCESSES; do
    # airflow-* processes belong to the part "airflow".
    wanted "${name%%-*}" && [ -f "$RUN/$name.pid" ] || continue
    pid=$(cat "$RUN/$name.pid")
    # Signal the whole process group: airflow standalone's components and bentoml's
    # workers are children that can outlive their parent (seen: the API server).
    if kill -0 -- "-$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
      if kill -0 -- "-$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
      echo "$name: stopped (process group $pid)"
    fi
    rm -f "$RUN/$name.pid"
  done
}

status() {
  local name
  for name in $PROCESSES; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"), log $RUN/$name.log)"
    elif [ -f "$RUN/$name.pid" ]; then echo "$name: exited (log $RUN/$name.log)"
    elif [[ " airflow-api-server mlflow bento " == *" $name "* ]]; then echo "$name: stopped"; fi
  done
}

# --- STACK=distributed ---------------------------------------------------------

# urlquote: stdin -> percent-encoded, so a password never appears in a process list.
urlquote() { "$BIN/python" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.stdin.read(), safe=""))'; }

# secrets: the values every component must share, generated once and kept (one that this script
# newly needs is added to an existing file); values from the environment win.
secrets() {
  local file="$RUN/secrets.env"
  (umask 077; touch "$file"; "$BIN/python" - "$file" <<'PY'
import secrets
import sys

from cryptography.fernet import Fernet

path = sys.argv[1]
with open(path) as existing:
    have = {line.split("=", 1)[0] for line in existing if "=" in line}
token = lambda: secrets.token_urlsafe(32)  # noqa: E731
wanted = {"STACK_FERNET_KEY": lambda: Fernet.generate_key().decode(), "STACK_JWT_SECRET": token,
          "STACK_API_SECRET": token, "STACK_S3_SECRET_KEY": token,
          "STACK_S3_ACCESS_KEY": lambda: f"cifar10-{secrets.token_hex(4)}",
          "STACK_MLFLOW_ADMIN_PASSWORD": token, "STACK_MLFLOW_FLASK_SECRET": token,
          "STACK_WEED_JWT_KEY": token, "STACK_WEED_FILER_JWT_KEY": token, "STACK_WEED_FILER_READ_JWT_KEY": token}
with open(path, "a") as out:
    for name, make in wanted.items():
        if name not in have:
            out.write(f"{name}={make()}\n")
PY
  )
  # shellcheck disable=SC1090
  . "$file"
}

# distributed_settings: every variable the distributed parts read, with the names deploy/compose.yaml uses.
distributed_settings() {
  secrets
  local root
  root="$(cd "$(dirname "$0")/.." && pwd)"
  export AIRFLOW_HOME="${AIRFLOW_HOME:-$STATE/airflow}" BENTOML_HOME="${BENTOML_HOME:-$STATE/bentoml}"
  export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$root/dags}"
  export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
  export POSTGRES_HOST="${POSTGRES_HOST:-127.0.0.1}"
  export POSTGRES_PORT="${POSTGRES_PORT:-${CIFAR10_TEST_PG_PORT:-5432}}"
  export POSTGRES_USER="${POSTGRES_USER:-${CIFAR10_TEST_PG_USER:-cifar10}}"
  # .ci/setup-postgres.sh's throw-away CI password when none is given; never reuse it elsewhere.
  export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-${CIFAR10_TEST_PG_PASSWORD:-cifar10-ci-only}}"
  AIRFLOW_DB="${AIRFLOW_DB:-airflow}" MLFLOW_DB="${MLFLOW_DB:-mlflow}" MLFLOW_AUTH_DB="${MLFLOW_AUTH_DB:-mlflow_auth}"
  local pg
  pg="postgresql+psycopg2://$(printf %s "$POSTGRES_USER" | urlquote):$(printf %s "$POSTGRES_PASSWORD" | urlquote)@$POSTGRES_HOST:$POSTGRES_PORT"
  # The Makefile points Airflow and MLflow at SQLite for the local shape: a sqlite URL is replaced.
  [[ "${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite}" == sqlite* ]] && AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="$pg/$AIRFLOW_DB"
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
  export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-$pg/$MLFLOW_DB}"
  # No password in it: the MLflow server's libpq takes it from PGPASSWORD (start_mlflow_server).
  MLFLOW_AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-postgresql+psycopg2://$POSTGRES_HOST:$POSTGRES_PORT/$MLFLOW_AUTH_DB}"

  REDIS_PORT="${REDIS_PORT:-6380}"
  export AIRFLOW__CELERY__BROKER_URL="${AIRFLOW__CELERY__BROKER_URL:-redis://$HOST:$REDIS_PORT/0}"
  export AIRFLOW__CELERY__RESULT_BACKEND="${AIRFLOW__CELERY__RESULT_BACKEND:-db+$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN}"
  export AIRFLOW__CELERY__WORKER_CONCURRENCY="${WORKER_CONCURRENCY:-${AIRFLOW__CELERY__WORKER_CONCURRENCY:-1}}"
  export AIRFLOW__CORE__EXECUTOR=CeleryExecutor

  S3_PORT="${S3_PORT:-8333}" WEED_PORTS="${WEED_PORTS:-19330}"
  S3_BUCKET="${S3_BUCKET:-cifar10}"
  export AWS_ENDPOINT_URL_S3="${AWS_ENDPOINT_URL_S3:-http://$HOST:$S3_PORT}"
  export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-$STACK_S3_ACCESS_KEY}"
  export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-$STACK_S3_SECRET_KEY}"
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
  export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-$AWS_ENDPOINT_URL_S3}"
  export MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-s3://$S3_BUCKET/mlflow}"
  export CIFAR10_BENTO_EXPORT_URI="${CIFAR10_BENTO_EXPORT_URI:-s3://$S3_BUCKET/bentos/}"

  # The pipeline's tasks reach MLflow through its server (artifacts proxied to S3), which lets
  # nobody in without a login: the stack's tasks log in as its admin.
  [[ "${MLFLOW_TRACKING_URI:-sqlite}" == sqlite* ]] && MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT"
  export MLFLOW_TRACKING_URI
  MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
  MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD:-$STACK_MLFLOW_ADMIN_PASSWORD}"
  export MLFLOW_TRACKING_USERNAME="${MLFLOW_TRACKING_USERNAME:-$MLFLOW_AUTH_ADMIN_USERNAME}"
  export MLFLOW_TRACKING_PASSWORD="${MLFLOW_TRACKING_PASSWORD:-$MLFLOW_AUTH_ADMIN_PASSWORD}"
  # Workers have no container engine in the deployed shape: the image is built from the Bento in S3.
  export CIFAR10_CONTAINER_BACKEND="${CIFAR10_CONTAINER_BACKEND:-none}"

  export AIRFLOW__CORE__FERNET_KEY="${AIRFLOW__CORE__FERNET_KEY:-$STACK_FERNET_KEY}"
  export AIRFLOW__API_AUTH__JWT_SECRET="${AIRFLOW__API_AUTH__JWT_SECRET:-$STACK_JWT_SECRET}"
  export AIRFLOW__API__SECRET_KEY="${AIRFLOW__API__SECRET_KEY:-$STACK_API_SECRET}"
  export AIRFLOW__API__PORT="$AIRFLOW_PORT" AIRFLOW__API__HOST="$HOST"
  export AIRFLOW__API__BASE_URL="http://localhost:$AIRFLOW_PORT"
  export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://$HOST:$AIRFLOW_PORT/execution/"
  export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="${AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT:-60}"
  export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
  # The serving machine's store: empty until `up bento` imports the Bento from S3.
  SERVING_HOME="$STATE/serving/bentoml"
}

# preflight CHECK...: the services CHECK names answer, or stop here with what to fix.
preflight() { "$BIN/python" -m training.deploy.preflight "$@" || { echo "stack: fix the setting named above, then run this again" >&2; exit 1; }; }

# postgres_databases: create the Airflow and MLflow databases when missing (idempotent).
postgres_databases() {
  PGHOST="$POSTGRES_HOST" PGPORT="$POSTGRES_PORT" PGUSER="$POSTGRES_USER" PGPASSWORD="$POSTGRES_PASSWORD" \
    PGCONNECT_TIMEOUT=5 "$BIN/python" - "$AIRFLOW_DB" "$MLFLOW_DB" "$MLFLOW_AUTH_DB" <<'PY'
import sys

import psycopg2
from psycopg2 import sql

try:
    conn = psycopg2.connect(dbname="postgres")
except psycopg2.OperationalError as exc:
    sys.exit(f"postgres: cannot log in to PostgreSQL ({str(exc).strip().splitlines()[0]}): start it "
             "(.ci/setup-postgres.sh on Debian) or fix POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD")
conn.autocommit = True
with conn.cursor() as cur:
    for db in dict.fromkeys(sys.argv[1:]):
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            print(f"postgres: created database {db}")
print("postgres: databases " + ", ".join(dict.fromkeys(sys.argv[1:])) + " ready")
PY
}

start_redis() {
  command -v redis-server >/dev/null || { echo "redis: redis-server not found: run .ci/setup-redis.sh (Debian: apt-get install redis-server)" >&2; exit 1; }
  mkdir -p "$RUN/redis"
  # A broker only: no snapshots or append-only file; queued messages do not outlive the stack.
  start redis redis-server --port "$REDIS_PORT" --bind "$HOST" --save "" --appendonly no --dir "$RUN/redis" \
    --daemonize no
  wait_for redis 30 "$BIN/python" -m training.deploy.preflight broker && echo "redis: $AIRFLOW__CELERY__BROKER_URL ready"
}

# seaweedfs_tls DIR: a CA and one certificate signed by it (SeaweedFS checks no host names, so all its
# parts share it), made once; with them every gRPC listener of SeaweedFS asks for a client certificate.
seaweedfs_tls() {
  [ -s "$1/key.pem" ] && return
  (umask 077; mkdir -p "$1"; "$BIN/python" - "$1" <<'PY'
import datetime
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

out = Path(sys.argv[1])
now = datetime.datetime.now(datetime.timezone.utc)


def certificate(name, key, issuer, issuer_key, ca):
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cifar10 stack SeaweedFS CA")])
ca = certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
cert = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cifar10 stack SeaweedFS")]), key, ca_name,
                   ca_key, ca=False)
(out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
(out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
(out / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
PY
  )
}

start_s3() {
  mkdir -p "$STATE/s3"
  local p=$WEED_PORTS tls="$RUN/seaweedfs-tls" part
  seaweedfs_tls "$tls"
  # Every listener on a port of its own (gRPC twins at +10000): other SeaweedFS servers may run on
  # this machine. weed mini makes its one S3 user from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.
  # Everything shares loopback here, so binding to it keeps out only other machines; what keeps out
  # the other processes of this one (only the S3 API, with its keys, is for them):
  # - gRPC, between SeaweedFS's own parts, is mutual TLS with the certificate made above;
  # - writes to the volume server and reads and writes through the filer's HTTP API need a JWT
  #   signed with a key of secrets.env, which only SeaweedFS's parts sign (the S3 gateway for its users);
  # - -disableHttp turns off the master's HTTP API, which would hand a write token to anyone and
  #   delete whole collections (buckets) on request.
  (
    export WEED_JWT_SIGNING_KEY="$STACK_WEED_JWT_KEY" WEED_JWT_FILER_SIGNING_KEY="$STACK_WEED_FILER_JWT_KEY"
    export WEED_JWT_FILER_SIGNING_READ_KEY="$STACK_WEED_FILER_READ_JWT_KEY" WEED_GRPC_CA="$tls/ca.pem"
    for part in MASTER VOLUME FILER S3 ADMIN WORKER CLIENT; do
      export "WEED_GRPC_${part}_CERT=$tls/cert.pem" "WEED_GRPC_${part}_KEY=$tls/key.pem"
    done
    start s3 "$BIN/weed" -logtostderr mini -dir="$STATE/s3" -ip="$HOST" -ip.bind="$HOST" -disableHttp \
      -master.port=$p -master.port.grpc=$((p + 10000)) -volume.port=$((p + 1)) -volume.port.grpc=$((p + 10001)) \
      -filer.port=$((p + 2)) -filer.port.grpc=$((p + 10002)) -admin.ui=false -admin.port=$((p + 3)) \
      -admin.port.grpc=$((p + 10003)) -debug.port=$((p + 4)) -metricsPort=$((p + 5)) \
      -s3.port="$S3_PORT" -s3.port.grpc=$((S3_PORT + 10000)) -s3.port.iceberg=0 -s3.port.lance=0 \
      -webdav=false -master.telemetry=false -s3.autoCreateBucket=false -bucket="$S3_BUCKET" \
      -s3.localSocket="$RUN/s3.sock" -filer.localSocket="$RUN/filer.sock"
  )
  wait_for s3 60 "$BIN/python" -m training.deploy.preflight s3 && echo "s3: $AWS_ENDPOINT_URL_S3 ready"
}

start_mlflow_server() {
  preflight postgres s3
  # MLflow's own authentication (--app-name basic-auth): a login for every request but /health, users
  # and permissions in PostgreSQL, the admin created at the first start. Its settings go only to this
  # process, and by environment (as MLFLOW_BACKEND_STORE_URI and MLFLOW_ARTIFACTS_DESTINATION do), so
  # no password is on a command line or in the configuration file.
  local ini="$RUN/mlflow-basic-auth.ini"
  # configparser reads % as interpolation: a percent-encoded URL needs it doubled.
  (umask 077; printf '[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = %s\nauthorization_function = %s\n' \
    "${MLFLOW_AUTH_DATABASE_URI//%/%%}" "mlflow.server.auth:authenticate_request_basic_auth" >"$ini")
  (
    export MLFLOW_AUTH_CONFIG_PATH="$ini" MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_AUTH_ADMIN_USERNAME"
    export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD"
    export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$STACK_MLFLOW_FLASK_SECRET}"
    export PGUSER="$POSTGRES_USER" PGPASSWORD="$POSTGRES_PASSWORD"
    start mlflow "$BIN/mlflow" server --app-name basic-auth --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
      --allowed-hosts "localhost,localhost:*,$HOST,$HOST:*"
  )
  # The first start creates MLflow's schema in PostgreSQL: minutes on a busy machine.
  wait_http mlflow "http://$HOST:$MLFLOW_PORT/health" "${STACK_START_TIMEOUT:-600}"
  preflight mlflow
}

start_airflow_components() {
  preflight postgres broker s3 mlflow
  start_airflow celery
  local limit="${STACK_START_TIMEOUT:-600}"
  wait_airflow "$limit"
  wait_for airflow-worker "$limit" grep -q "ready\." "$RUN/airflow-worker.log" && echo "airflow-worker: ready"
}

# start_bento: the serving step of another machine: import the champion's Bento (the registry names it
# and its archive's sha256; a replaced archive is refused) from S3 into an empty store of its own, then
# serve it.
start_bento() {
  local tag rc=0
  tag=$(BENTOML_HOME="$SERVING_HOME" "$BIN/python" -m training.packaging.bento_store import \
    2>"$RUN/bento-import.log" | tail -1) || rc=$?
  if [ "$rc" -eq 3 ]; then
    echo "bento: nothing to serve yet ($(tail -1 "$RUN/bento-import.log")): trigger the DAG, then run this again" >&2
    return 0
  elif [ "$rc" -ne 0 ] || [ -z "$tag" ]; then
    echo "bento: not served: $(tail -1 "$RUN/bento-import.log")" >&2
    exit 1
  fi
  echo "bento: imported $tag (the champion's, sha256 checked) into $SERVING_HOME"
  BENTOML_HOME="$SERVING_HOME" start bento "$BIN/bentoml" serve "$tag" --host "$HOST" --port "$BENTO_PORT"
  wait_http bento "http://$HOST:$BENTO_PORT/readyz" "${STACK_START_TIMEOUT:-600}"
}

up_distributed() {
  echo "$MODE" >"$RUN/mode"
  ! wanted postgres || postgres_databases || exit 1
  ! wanted redis || start_redis
  ! wanted s3 || start_s3
  ! wanted mlflow || start_mlflow_server
  ! wanted airflow || start_airflow_components
  ! wanted bento || start_bento
  [ ${#NAMES[@]} -eq 0 ] || return 0
  cat <<MSG

Airflow UI  http://localhost:$AIRFLOW_PORT  user "admin", password in
            $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated (CeleryExecutor, worker log
            $RUN/airflow-worker.log)
MLflow UI   http://localhost:$MLFLOW_PORT  user "$MLFLOW_AUTH_ADMIN_USERNAME", password STACK_MLFLOW_ADMIN_PASSWORD in
            $RUN/secrets.env (PostgreSQL $POSTGRES_HOST:$POSTGRES_PORT/$MLFLOW_DB, artifacts $MLFLOW_ARTIFACTS_DESTINATION)
S3          $AWS_ENDPOINT_URL_S3  bucket $S3_BUCKET (keys in $RUN/secrets.env); Bentos go to $CIFAR10_BENTO_EXPORT_URI
Bento       http://localhost:$BENTO_PORT  (once a run has published one: scripts/stack.sh up bento)
Logs        $RUN/*.log        Stop: make down
MSG
}
COMMAND="${1:-}"; shift || true
NAMES=("$@")
MODE="${STACK:-local}"
case "$MODE" in
  local) PARTS="airflow mlflow bento" ;;
  distributed) PARTS="postgres redis s3 mlflow airflow bento" ;;
  *) echo "$0: unknown STACK=$MODE (local, distributed)" >&2; exit 2 ;;
esac
for name in "${NAMES[@]}"; do
  [[ " $PARTS " == *" $name "* ]] || { echo "$0: unknown part '$name' for STACK=$MODE (${PARTS// /, })" >&2; exit 2; }
done
case "$COMMAND:$MODE" in
  up:local) up ;;
  up:distributed) distributed_settings; up_distributed ;;
  down:*) down ;;
  status:*) status ;;
  *) echo "usage: [STACK=local|distributed] $0 up [NAME...] | down [NAME...] | status" >&2; exit 2 ;;
esac
