#!/usr/bin/env bash
# Installs redis-server and redis-cli (Debian's packages) when they are missing.
# The tests start their own servers on free ports; they never use a system service.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq redis-server redis-tools >/dev/null
redis-server --version
