#!/usr/bin/env bash
# Install (when missing) and start Debian's PostgreSQL, and create the role the
# scale-out tests use. Idempotent: safe to run again on a machine that has it all.
#
# The role name and password come from the environment. The defaults are for a
# throw-away CI database on 127.0.0.1 only; never reuse them anywhere else.
# The test (tests/e2e/test_scaleout.py) reads the same variables, or one URL in
# CIFAR10_TEST_PG_URL, and creates and drops its own databases with this role.
set -euo pipefail

PG_ROLE="${CIFAR10_TEST_PG_USER:-cifar10}"
PG_PASSWORD="${CIFAR10_TEST_PG_PASSWORD:-cifar10-ci-only}"
PG_PORT="${CIFAR10_TEST_PG_PORT:-5432}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  echo "setup-postgres: installing postgresql from apt"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# The first cluster Debian created (e.g. "15 main"); start it when it is down.
read -r PG_VERSION PG_CLUSTER PG_CLUSTER_PORT PG_STATUS _ < <(pg_lsclusters -h | head -1)
if [ "$PG_CLUSTER_PORT" != "$PG_PORT" ]; then
  echo "setup-postgres: cluster $PG_VERSION/$PG_CLUSTER listens on $PG_CLUSTER_PORT, not $PG_PORT;" \
       "set CIFAR10_TEST_PG_PORT=$PG_CLUSTER_PORT" >&2
  exit 1
fi
if [ "$PG_STATUS" != "online" ]; then
  echo "setup-postgres: starting cluster $PG_VERSION/$PG_CLUSTER"
  as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start
fi

psql_admin() { as_root su postgres -c "psql -v ON_ERROR_STOP=1 -qtAX -p $PG_PORT $*"; }
for _ in $(seq 30); do psql_admin "-c 'select 1'" >/dev/null 2>&1 && break; sleep 1; done

# Create or update the role. The password reaches psql on stdin (a \set line), so
# it appears neither in the process list nor in this script's output.
quoted_pw="'${PG_PASSWORD//\'/\'\'}'"
{
  printf '\\set role %s\n\\set pw %s\n' "$PG_ROLE" "$quoted_pw"
  cat <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN CREATEDB PASSWORD %L', :'role', :'pw') \gexec
SQL
} | as_root su postgres -c "psql -v ON_ERROR_STOP=1 -qtAX -p $PG_PORT" >/dev/null
echo "setup-postgres: PostgreSQL $PG_VERSION on 127.0.0.1:$PG_PORT, role $PG_ROLE (CREATEDB) ready"
