#!/usr/bin/env bash
# Packages the tests need beyond the Python venv: promtool (Debian prometheus) checks the /metrics scrape,
# chromium renders the status page, check_flexlm (Debian monitoring-plugins-standard) and the lmstat parser
# of license-manager-agent (PyPI, without its service dependencies, into .ci/parsers) read lmutil lmstat as
# they read FlexNet's; PostgreSQL's server binaries (Debian postgresql: initdb, pg_ctl) let the activation
# service's tests start a throwaway cluster. Non-interactive and idempotent: installs only what is missing,
# apt-get update at most once.
set -euo pipefail
cd "$(dirname "$0")/.."

# The parser module of license-manager-agent imports only `re`; its agent's dependencies are not needed.
if [ ! -f .ci/parsers/lm_agent/parsing/flexlm.py ]; then
  echo "install-deps: installing license-manager-agent==3.0.12 (no deps) into .ci/parsers"
  "${PYTHON:-python3.11}" -m pip install -q --no-deps --target .ci/parsers license-manager-agent==3.0.12
fi

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/lib/nagios/plugins/check_flexlm ] || need+=(monitoring-plugins-standard)
# tinyproxy: a real HTTP CONNECT proxy for the activation service's HTTPS_PROXY tests (issue 10).
command -v tinyproxy >/dev/null 2>&1 || need+=(tinyproxy)
# The fault tests: libfaketime steps the daemon's wall clock; mkfs.ext4 and findmnt make and inspect the
# small file systems the disk-full / read-only tests mount (they need root, else they skip).
command -v faketime >/dev/null 2>&1 || need+=(faketime)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v findmnt >/dev/null 2>&1 || need+=(util-linux)
# The HA tests (tests/integration/test_ha.py) start real etcd members on loopback (Debian's 3.4).
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
have_initdb() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; }
have_initdb || need+=(postgresql)
if [ "${#need[@]}" -eq 0 ]; then
  echo "install-deps: promtool, chromium, check_flexlm, faketime, mkfs.ext4, findmnt, PostgreSQL, tinyproxy and etcd already present"
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
# The prometheus, postgresql, tinyproxy and etcd packages may start servers as services; the tests start their
# own (PostgreSQL clusters, tinyproxy and etcd members on free ports).
for svc in prometheus postgresql tinyproxy etcd; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" || true
  fi
done
command -v promtool >/dev/null && command -v chromium >/dev/null && [ -x /usr/lib/nagios/plugins/check_flexlm ] \
  && have_initdb && command -v tinyproxy >/dev/null && command -v faketime >/dev/null && command -v mkfs.ext4 >/dev/null \
  && command -v etcd >/dev/null && command -v etcdctl >/dev/null
