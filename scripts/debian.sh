# Sourced by scripts/setup.sh and scripts/test-tools.sh: install the Debian packages named, if any.
# Usage: install_debian_packages WHO PACKAGE...   (WHO prefixes the log line)
install_debian_packages() {
    local who=$1
    shift
    [ $# -gt 0 ] || return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "$who: installing Debian packages: $*"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@"
}
