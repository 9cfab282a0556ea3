#!/usr/bin/env bash
# Install Debian's redis-server when it is missing: the Celery broker of the distributed
# stack (make up STACK=distributed) and its end-to-end test. Nothing is started
# here: the stack runs its own redis-server on a private port in its state folder, and
# Debian's own service is left stopped so it holds no port.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup-redis: installing redis-server from apt"
  as_root apt-get update -qq
  # policy-rc.d 101: the package's post-install must not start the machine-wide service.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    trap 'as_root rm -f "$policy"' EXIT
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
echo "setup-redis: $(redis-server --version | cut -d' ' -f1-3) ready (started by the stack, not here)"
