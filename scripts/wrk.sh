#!/usr/bin/env bash
# Make sure Debian's `wrk` (HTTP load generator, used by benchmarks.pipelines for
# saturation runs) is on PATH; installs it with apt-get when it is missing.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends wrk >/dev/null
command -v wrk >/dev/null
