#!/usr/bin/env bash
# What `make cluster-demo` needs beyond set-up: PostgreSQL's server binaries (Debian's postgresql), for the
# private server the demo starts (daemon/tools/postgres.py). The machine's own server, if any, is not touched.
# Idempotent: installs nothing when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
. scripts/debian.sh
install_debian_packages cluster-demo ${need[@]+"${need[@]}"}
