#!/usr/bin/env bash
# Debian packages only the test suite needs (a service host does not): `make test` runs this.
# Idempotent: installs nothing when both are there.
set -euo pipefail
need=()
# Headless Chromium renders the status page in tests/test_status.py, as an operator's browser would.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# strace plays the unit's system-call filter around the real daemon in tests/test_systemd.py.
command -v strace >/dev/null 2>&1 || need+=(strace)
# mosquitto_pub sends the README's example messages in tests/test_readme.py, as a feed in any language would.
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
. "$(dirname "$0")/debian.sh"
install_debian_packages test-tools ${need[@]+"${need[@]}"}
