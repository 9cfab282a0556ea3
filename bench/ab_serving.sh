#!/bin/bash
# A/B of server (a) at concurrency 32: alternate checkouts or settings on one machine, in one sitting
# (this VM's speed drifts ~30% within an hour, so only interleaved runs compare).
#
#   bench/ab_serving.sh ROUNDS "CHECKOUT [VAR=value ...]" "CHECKOUT [VAR=value ...]" ...
#   bench/ab_serving.sh 3 "/work/wt-base" ". CIFAR10_TRACE_REQUESTS=1" ". CIFAR10_TRACE_REQUESTS=0"
#   bench/ab_serving.sh 3 ". TAG_FILE=/tmp/serving-bench/model_tag_other" .   # another model
#
# Needs bench/bench_serving.py's state (its model and wrk script; run it once with --tta first).
# Each run: start `bentoml serve` from CHECKOUT, 4 s warm-up, 12 s measured with wrk -c32.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${BENCH_STATE:-/tmp/serving-bench}
TAG_FILE=${TAG_FILE:-$STATE/model_tag_64_128_128_tta}
[ -f "$TAG_FILE" ] || { echo "no $TAG_FILE: run python -m bench.bench_serving --widths 64,128,128 --tta once" >&2; exit 1; }
export BENTOML_HOME=$STATE/bentoml BENTOML_DO_NOT_TRACK=True BENCH_IMAGE=$STATE/img.jpg
PORT=${PORT:-3918}; ROUNDS=$1; shift; SPECS=("$@")
# Each server runs in its own session, so stopping it stops its workers and nothing else on the machine.
SERVER=
stop() { [ -z "$SERVER" ] || { kill -- "-$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; }; }
trap stop EXIT
for _ in $(seq "$ROUNDS"); do for spec in "${SPECS[@]}"; do
  read -r dir vars <<< "$spec"; dir=$(cd "$dir" && pwd)
  tag=$(cat "$(env TAG_FILE="$TAG_FILE" $vars printenv TAG_FILE)")  # a spec may name its own TAG_FILE
  (cd "$dir" && exec setsid env $vars "$ROOT/.venv/bin/bentoml" serve service:CIFAR10Classifier \
     --arg "model_tag=$tag" --host 127.0.0.1 --port "$PORT" > "$STATE/ab-serve.log" 2>&1) &
  SERVER=$!
  for _ in $(seq 180); do curl -sf "localhost:$PORT/readyz" > /dev/null && break; sleep 1; done
  wrk -t1 -c32 -d4s -s "$STATE/multipart.lua" "http://127.0.0.1:$PORT/predict" > /dev/null 2>&1
  out=$(wrk -t1 -c32 -d12s --latency -s "$STATE/multipart.lua" "http://127.0.0.1:$PORT/predict" 2>&1)
  echo "$spec | $(awk '/Requests\/sec/ {print $2}' <<< "$out") req/s, p50 $(awk '$1 == "50%" {print $2}' <<< "$out")," \
       "p99 $(awk '$1 == "99%" {print $2}' <<< "$out"), non-2xx: $(grep -c Non-2xx <<< "$out" || true)"
  stop
done; done
