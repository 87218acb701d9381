#!/usr/bin/env bash
# The main job: install serveflow, serve the example pipeline on the embedded runtime
# and drive real requests through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
exec .venv/bin/python -m examples.comments "$@"
