#!/usr/bin/env bash
# Create benchmarks/.triton-venv: Python 3.12 (pyenv) with nvidia-pytriton, whose wheel
# carries the Triton Inference Server binary (runs on CPU here). Used by
# benchmarks/peers/triton.py as a second peer in benchmarks/overhead.py.
# Idempotent: re-running only re-checks the pins.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}"
VENV="$REPO/benchmarks/.triton-venv"
PYTRITON_PIN="nvidia-pytriton==0.7.0"
TRITONCLIENT_PIN="tritonclient[grpc]==2.73.0"
NUMPY_PIN="numpy==1.26.4"  # nvidia-pytriton 0.7.0 needs numpy<2

if [[ ! -x "$PY312" ]]; then
    echo "triton_env: Python 3.12 not found at $PY312 (set PY312=...)" >&2
    exit 1
fi
# The Triton server and its Python backend stub link against libpython3.12.
export LD_LIBRARY_PATH="$(dirname "$(dirname "$PY312")")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY312" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$PYTRITON_PIN" "$TRITONCLIENT_PIN" "$NUMPY_PIN"
"$VENV/bin/python" -c "import pytriton, tritonclient.grpc; print('triton_env: ready', pytriton.__file__)"
