#!/usr/bin/env bash
# Runs hexfleet's whole test suite. Tests start their own redis-server on free
# ports, and the dashboard test drives a headless Chromium through
# chromedriver, so those must be installed; on Debian this script installs them
# when missing (as root), or says exactly what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

need_package() { # command package
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing $2 (Debian package) for the tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
  else
    echo "The tests need '$1'. Install it first, e.g.: sudo apt-get install $2" >&2
    exit 1
  fi
}

need_package redis-server redis-server
need_package redis-cli redis-tools
need_package chromium chromium
need_package chromedriver chromium-driver
need_package systemd-analyze systemd
need_package python3 python3
python3 -c 'import venv, ensurepip' 2>/dev/null || need_package python3-venv python3-venv

# Every test binary runs even after one fails, so one run shows everything
# that is red; the output is kept, and its failures are summed up at the end.
log=target/test-logs/test-$(date +%Y%m%d-%H%M%S).log
mkdir -p "$(dirname "$log")"
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# What deploy/ holds, checked by the tools made for each (see the script).
deploy/validate.sh || status=$?
scripts/test-summary.sh "$log"
exit "$status"
