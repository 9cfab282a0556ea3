#!/usr/bin/env bash
# The local stack with its UIs, all on one state folder:
#   Airflow (`airflow standalone`: scheduler, dag-processor, triggerer, API server + UI),
#   the MLflow tracking server over the pipeline's store, and `bentoml serve` of the newest Bento.
#
#   scripts/stack.sh up [NAME...] | down [NAME...] | status
#   NAME: airflow, mlflow, bento (default: all of them)
#
# Configuration, all from the environment (the Makefile sets them):
#   CIFAR10_STATE_DIR   state folder (Airflow home, MLflow store, BentoML home); required
#   AIRFLOW_PORT=8080 MLFLOW_PORT=5000 BENTO_PORT=3000 STACK_HOST=127.0.0.1
#   AIRFLOW_HOME, MLFLOW_TRACKING_URI, BENTOML_HOME: as for `make run`
# Logs and pid files: $CIFAR10_STATE_DIR/stack/<name>.{log,pid}. `down` stops exactly
# the process groups recorded in those pid files.
set -euo pipefail

STATE="${CIFAR10_STATE_DIR:?set CIFAR10_STATE_DIR (the Makefile does)}"
BIN="${VENV_BIN:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin}"
RUN="$STATE/stack"
AIRFLOW_PORT="${AIRFLOW_PORT:-8080}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
BENTO_PORT="${BENTO_PORT:-3000}"
HOST="${STACK_HOST:-127.0.0.1}"
BENTO="${BENTO_TAG:-cifar10-classifier:latest}"
mkdir -p "$RUN"
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

# wait_http NAME URL SECONDS: until URL answers 200, or the process died, or time is up.
wait_http() {
  local name=$1 url=$2 deadline=$((SECONDS + $3))
  until curl -fs -o /dev/null --max-time 3 "$url"; do
    if ! running "$name"; then echo "$name: exited; last log lines:" >&2; tail -20 "$RUN/$name.log" >&2; return 1; fi
    if [ $SECONDS -ge $deadline ]; then echo "$name: not ready after $3 s; see $RUN/$name.log" >&2; return 1; fi
    sleep 2
  done
  echo "$name: $url ready"
}

# wanted NAME: whether NAME is among the names given to up/down (all when none were given).
wanted() { [ ${#NAMES[@]} -eq 0 ] || [[ " ${NAMES[*]} " == *" $1 "* ]]; }

up() {
  # Tasks that airflow standalone runs reach its execution API on this port.
  export AIRFLOW__API__PORT="$AIRFLOW_PORT" AIRFLOW__API__HOST="$HOST"
  export AIRFLOW__API__BASE_URL="http://localhost:$AIRFLOW_PORT"
  # Task processes call that API; its 5 s default timed out here on a busy 2-core machine
  # (httpx.ReadTimeout, task marked up_for_retry).
  export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="${AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT:-60}"
  ! wanted airflow || start airflow "$BIN/airflow" standalone
  if wanted mlflow; then
    mkdir -p "$STATE/mlflow"
    start mlflow "$BIN/mlflow" server --backend-store-uri "${MLFLOW_TRACKING_URI:?}" \
      --default-artifact-root "file://$STATE/mlflow/artifacts" --host "$HOST" --port "$MLFLOW_PORT" --workers 1
  fi
  if ! wanted bento; then :
  elif "$BIN/bentoml" get "$BENTO" >/dev/null 2>&1; then
    start bento "$BIN/bentoml" serve "$BENTO" --host "$HOST" --port "$BENTO_PORT"
  else
    echo "bento: no $BENTO in $BENTOML_HOME yet: trigger the DAG in the Airflow UI, then run this again"
  fi
  # Generous limits: on a busy 2-core machine each of them took minutes to start.
  local limit="${STACK_START_TIMEOUT:-600}"
  ! wanted mlflow || wait_http mlflow "http://$HOST:$MLFLOW_PORT/health" "$limit"
  ! wanted bento || ! running bento || wait_http bento "http://$HOST:$BENTO_PORT/readyz" "$limit"
  ! wanted airflow || wait_http airflow "http://$HOST:$AIRFLOW_PORT/api/v2/monitor/health" "$limit"
  [ ${#NAMES[@]} -eq 0 ] || return 0
  cat <<EOF

Airflow UI  http://localhost:$AIRFLOW_PORT  user "admin", password in
            $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated
            (the DAG starts paused: unpause it for weekly retraining, or trigger it with its params form)
MLflow UI   http://localhost:$MLFLOW_PORT
Bento       http://localhost:$BENTO_PORT  (Swagger UI; POST /predict)
Logs        $RUN/*.log        Stop: make down
EOF
}

down() {
  local name pid
  for name in bento mlflow airflow; do
    wanted "$name" && [ -f "$RUN/$name.pid" ] || continue
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
  for name in airflow mlflow bento; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"), log $RUN/$name.log)"
    else echo "$name: stopped"; fi
  done
}

COMMAND="${1:-}"; shift || true
NAMES=("$@")
for name in "${NAMES[@]}"; do
  case "$name" in airflow|mlflow|bento) ;; *) echo "$0: unknown part '$name' (airflow, mlflow, bento)" >&2; exit 2 ;; esac
done
case "$COMMAND" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [NAME...] | down [NAME...] | status" >&2; exit 2 ;;
esac
