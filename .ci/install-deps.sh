#!/usr/bin/env bash
# Debian packages the tests need beyond the Python venv: promtool (package prometheus) checks the /metrics
# scrape, chromium renders the status page. Non-interactive and idempotent: installs only what is missing,
# and runs apt-get update at most once.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ "${#need[@]}" -eq 0 ]; then
  echo "install-deps: promtool and chromium already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: need root (or sudo) to install: ${need[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing ${need[*]}"
$SUDO apt-get update -q
# fonts-dejavu-core gives the headless browser a font for the status-page screenshot.
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}" fonts-dejavu-core
# The prometheus package may start a server as a service; the tests need only promtool.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl stop prometheus || true
fi
command -v promtool >/dev/null && command -v chromium >/dev/null
