#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install serveflow with the given extras.
# Usage: scripts/setup.sh EXTRAS   (e.g. "test" or "examples")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python=$(command -v python3.11 || command -v python3)
  "$python" -c 'import sys; assert sys.version_info >= (3, 11), "serveflow needs Python 3.11+"'
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# torch (the pipelines and bench extras) from PyTorch's CPU-only wheels, not the
# multi-gigabyte CUDA build PyPI serves; everything else from PyPI.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  --extra-index-url https://download.pytorch.org/whl/cpu -e ".${extras:+[$extras]}"
