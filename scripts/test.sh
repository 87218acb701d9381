#!/usr/bin/env bash
# Install serveflow with its test extras, lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/redis.sh      # a real redis-server for the Redis store tests
bash scripts/browser.sh    # Debian chromium + chromedriver for the dashboard test
bash scripts/reliability_tools.sh  # Debian prometheus (promtool) and wrk for tests/test_reliability.py
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
