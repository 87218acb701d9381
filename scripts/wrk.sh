#!/usr/bin/env bash
# Make sure Debian's `wrk` and `hey` (HTTP load generators, used by benchmarks.pipelines
# for saturation runs and benchmarks.http_slo) are on PATH; installs the missing ones with
# apt-get.
set -euo pipefail
missing=()
for tool in wrk hey; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
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
command -v wrk >/dev/null && command -v hey >/dev/null
