#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver when they are missing: the Swagger UI test
# (tests/service/test_swagger_ui.py) drives the service's API page in a real headless browser.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "setup-browser: installing chromium and chromium-driver from apt"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver \
    >/dev/null
fi
echo "setup-browser: $(chromium --version 2>/dev/null | head -1), $(chromedriver --version | cut -d' ' -f1-2) ready"
