#!/usr/bin/env bash
# The README's main job as a new user meets it: `make run` on a generated image-folder archive
# with the tiny recipe, under a minimal PATH (system directories and the project's own folders),
# then the seed's client call and a batch call against the Bento that `make run` serves.
# `make run` runs the DAG in Airflow's scheduler; the job checks that the run Airflow recorded is
# an ordinary manual one that succeeded, and that no Airflow process outlives `make run`.
# Everything it starts is stopped at the end. Run it locally with: bash .ci/main-job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH="$ROOT/.venv/bin:$ROOT/.uv/bin:$SYSTEM_PATH"
WORK=$(mktemp -d /tmp/cifar10-main-job.XXXXXX)
RUN_LOG=$WORK/make-run.log
READY_TIMEOUT_S=${MAIN_JOB_READY_TIMEOUT_S:-900}
step_start=$SECONDS

fail() { echo "main-job: FAILED: $*" >&2; exit 1; }
say() { echo "main-job: [$((SECONDS - step_start)) s] $*"; }

make_pid=""
cleanup() {
  if [[ -n $make_pid ]] && kill -0 "$make_pid" 2>/dev/null; then
    kill -TERM -- "-$make_pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$make_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$make_pid" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# The environment comes from the project's files alone (a no-op when `make test` built it).
make venv
# Every tool the project or its libraries call must resolve inside the project: one found in a
# system folder instead was installed by hand, and a clean machine will not have it.
for tool in uv bentoml airflow mlflow python; do
  where=$(command -v "$tool" || true)
  [[ $where == "$ROOT"/* ]] || fail "'$tool' resolves to '${where:-nothing}', not inside $ROOT; the project's" \
    "files must install it (pyproject.toml/uv.lock), nothing installed by hand may stand in for it"
done
say "tools resolve inside the project: $(command -v uv), $(command -v bentoml)"

# Below the ephemeral range, so no outgoing connection takes the port before the server binds it.
free_port() { python -c 'from training.packaging.verify import free_port; print(free_port())'; }
PORT=$(free_port)
AIRFLOW_PORT=$(free_port)
STATE=$WORK/state
python -m tests.helpers archive "$WORK/mini.zip" --per-class 30 >/dev/null
python -m tests.helpers image "$WORK/car2.png" >/dev/null

# Its own process group, so that stopping it stops the Bento server and its workers too.
setsid make run DATA_URL="file://$WORK/mini.zip" RECIPE=tiny STATE="$STATE" PORT="$PORT" \
  AIRFLOW_PORT="$AIRFLOW_PORT" CIFAR10_SCHEDULE=none >"$RUN_LOG" 2>&1 &
make_pid=$!
say "make run started (pid $make_pid, port $PORT, Airflow on $AIRFLOW_PORT, log $RUN_LOG)"

deadline=$((SECONDS + READY_TIMEOUT_S))
until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null; do
  kill -0 "$make_pid" 2>/dev/null || { cat "$RUN_LOG"; fail "make run exited before the Bento was served"; }
  ((SECONDS < deadline)) || { cat "$RUN_LOG"; fail "the Bento was not ready within $READY_TIMEOUT_S s"; }
  sleep 2
done
say "the Bento answers /readyz; make run's console:"
sed 's/^/  | /' "$RUN_LOG"

grep -q "✓ pipeline finished" "$RUN_LOG" || fail "the console has no '✓ pipeline finished' line"
grep -q "Starting Airflow" "$RUN_LOG" || fail "make run did not start Airflow's scheduler for the run"
ls "$STATE"/bentoml/bentos/cifar10-classifier/*/bento.yaml >/dev/null 2>&1 ||
  fail "no Bento in $STATE/bentoml: the scheduler's task processes did not get make's BENTOML_HOME"

# What Airflow itself recorded, from its metadata database (Airflow is stopped by now): one run,
# started through the REST API as an ordinary manual run, not `airflow dags test`'s test run.
runs=$(python - "$STATE/airflow/airflow.db" <<'PY'
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute(
    "SELECT run_id, run_type, state, triggered_by FROM dag_run WHERE dag_id = 'cifar10_pipeline'").fetchall()
print(" ".join("/".join(map(str, row)) for row in rows))
if [(r[1], r[2], r[3]) for r in rows] != [("manual", "success", "REST_API")]:
    sys.exit(f"expected one manual run triggered through the REST API that succeeded; Airflow recorded: {rows}")
PY
) || fail "Airflow's record of the run: $runs"
say "Airflow recorded the run (run_id/run_type/state/triggered_by): $runs"
! supervisorctl -s "unix://$STATE/stack/supervisor.sock" status 'airflow:*' >/dev/null ||
  fail "make run left Airflow running (make status STATE=$STATE): it did not stop the Airflow it started"
grep -q "Swagger UI: http://localhost:$PORT/" "$RUN_LOG" || fail "the console does not show the Swagger URL"
if grep -nE "Falling back|uv is not available|Failed to install uv|No module named pip" "$WORK"/state/logs/*.log; then
  fail "a library fell back (above): a tool it needs is missing from the project's environment"
fi

check_prediction() {  # stdin: a JSON answer; $1: "one" or the expected list length
  python -c '
import json, math, sys
classes = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
text = sys.stdin.read()
try:
    body = json.loads(text)
except ValueError:
    sys.exit(f"not JSON: {text[:300]!r}")
answers = [body] if sys.argv[1] == "one" else body
if sys.argv[1] != "one" and (not isinstance(body, list) or len(body) != int(sys.argv[1])):
    sys.exit(f"expected a list of {sys.argv[1]} predictions, got: {text[:300]}")
for a in answers:
    if a.get("label") not in classes or not math.isclose(sum(a["probabilities"].values()), 1, abs_tol=1e-4):
        sys.exit(f"not a prediction: {text[:300]}")
print(", ".join("%s %.2f" % (a["label"], a["confidence"]) for a in answers))
' "$1"
}

cd "$WORK"
# The seed's client call, verbatim but for the port.
answer=$(curl -sS -X 'POST' "http://localhost:$PORT/predict/" -H 'accept: application/json' \
  -H 'Content-Type: multipart/form-data' -F 'file=@car2.png;type=image/png')
summary=$(check_prediction one <<<"$answer") || fail "/predict/ answered: $answer"
say "POST /predict/ (the seed's curl): $summary"
answer=$(curl -sS -X POST "http://localhost:$PORT/predict_batch" -F files=@car2.png -F files=@car2.png \
  -F files=@car2.png)
summary=$(check_prediction 3 <<<"$answer") || fail "/predict_batch answered: $answer"
say "POST /predict_batch (3 files): $summary"
# Lineage: the answer names the champion's model version (the first run's: 1) and its Bento.
headers=$(curl -sS -o /dev/null -D - -X POST "http://localhost:$PORT/predict" -F file=@car2.png | tr -d '\r')
grep -qx "x-mlflow-model-version: 1" <<<"${headers,,}" || fail "no lineage header naming version 1: $headers"
bento=$(sed -n 's/^x-bento-tag: //Ip' <<<"$headers")
grep -q "Serving $bento (the champion's Bento)" "$RUN_LOG" || fail "the served Bento '$bento' is not the one make serve named"
say "lineage headers: model version 1, Bento $bento"
# What an operator's Prometheus scrapes: the class mix, confidence and a drift score for the 5 images.
for _ in $(seq 20); do  # the drift gauges are set once a second, off the request path
  metrics=$(curl -fsS "http://localhost:$PORT/metrics") || fail "GET /metrics failed"
  awk '/^cifar10_drift_window_images/ && $2 > 0 {found = 1} END {exit !found}' <<<"$metrics" && break
  sleep 0.5
done
for name in cifar10_predictions_total cifar10_prediction_confidence_count cifar10_drift_score \
  cifar10_drift_window_images; do
  grep -q "^$name" <<<"$metrics" || fail "/metrics has no $name series; it has: $(grep -o '^cifar10_[a-z_]*' <<<"$metrics" | sort -u | tr '\n' ' ')"
done
awk '/^cifar10_drift_window_images/ && $2 > 0 {found = 1} END {exit !found}' <<<"$metrics" ||
  fail "no worker's drift window holds the images just sent: $(grep '^cifar10_drift' <<<"$metrics" | tr '\n' ' ')"
say "/metrics: $(grep '^cifar10_drift' <<<"$metrics" | tr '\n' ' ')"
cd "$ROOT"

kill -TERM -- "-$make_pid"
for _ in $(seq 30); do kill -0 "$make_pid" 2>/dev/null || break; sleep 1; done
! kill -0 "$make_pid" 2>/dev/null || fail "make run did not stop within 30 s of SIGTERM"
! curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null || fail "the Bento still answers after make run stopped"
# No process of this state's Airflow (scheduler, API server, task runners) may remain.
left=$(grep -lsz "^AIRFLOW_HOME=$STATE/airflow\$" /proc/[0-9]*/environ | cut -d/ -f3 | tr '\n' ' ' || true)
[[ -z $left ]] || { ps -o pid,args -p "$(echo $left | tr " " ,)" || true; fail "Airflow processes of $STATE outlived make run: $left"; }
! curl -fsS -o /dev/null "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" 2>/dev/null ||
  fail "Airflow still answers on :$AIRFLOW_PORT after make run stopped"
make_pid=""
say "passed: make run ran the DAG in Airflow's scheduler, served the Bento, and everything it started has stopped"
