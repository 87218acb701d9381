#!/usr/bin/env bash
# The main job: install serveflow, serve the example pipeline on the embedded runtime
# over HTTP and drive a short load run through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "examples,serve"
exec .venv/bin/python -m examples.comments "$@"
