#!/usr/bin/env bash
# Make sure `promtool` (Debian's prometheus package: checks the /metrics exposition),
# `wrk` (an HTTP load generator outside the server's process tree, for the overload
# check and the soak) and `hey` (lockstep bursts, for SLO batching) are on PATH.
# Installs them with apt-get when missing; starts nothing.
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v hey >/dev/null 2>&1 || missing+=(hey)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian may start the packaged Prometheus service; nothing here needs it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  $sudo systemctl stop prometheus || true
fi
command -v promtool >/dev/null && command -v wrk >/dev/null && command -v hey >/dev/null
