#!/usr/bin/env bash
# Install Debian's nginx when it is missing: the front door of the local stacks (make up) and its
# end-to-end tests. Nothing is started here: the stack runs its own nginx (daemon off, config in its
# state folder) under supervisord, and Debian's own service is left stopped so it holds no port.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "setup-nginx: installing nginx from apt"
  as_root apt-get update -qq
  # policy-rc.d 101: the package's post-install must not start the machine-wide service on port 80.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    trap 'as_root rm -f "$policy"' EXIT
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
fi
echo "setup-nginx: $(PATH="$PATH:/usr/sbin" nginx -v 2>&1) ready (started by the stack, not here)"
