#!/usr/bin/env bash
# Make sure a `redis-server` binary is on PATH (tests start their own on a free port).
# Installs Debian's redis-server with apt-get when it is missing; does not start it.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# Debian may start the packaged service; the tests do not need it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
  $sudo systemctl stop redis-server || true
fi
command -v redis-server >/dev/null
