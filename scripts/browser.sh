#!/usr/bin/env bash
# Install Debian's headless Chromium and its WebDriver (for tests/test_dashboard.py)
# when they are missing. Needs root (apt-get); a no-op when both are present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
