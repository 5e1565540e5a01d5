#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine: installs what cachefs needs, then runs
#   scripts/dev.sh demo    the main job: SeaweedFS on loopback, generated TFRecords, mounted, read
#   scripts/dev.sh test    the test suite (real FUSE mounts, real store servers on loopback)
#   scripts/dev.sh lint    ruff (lint) and mypy (types), configured in pyproject.toml
#   scripts/dev.sh bench   the benchmark (bench/README.md)
#   scripts/dev.sh setup   only the installation
# Extra arguments go to the command (e.g. `scripts/dev.sh test -k s3`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CACHEFS_VENV:-.venv}
PYTHON=${PYTHON:-python3}

install_system_packages() {
    local missing=()
    for pkg in fuse3 libfuse3-dev pkg-config gcc; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    # promtool (Debian's prometheus package) checks and unit-tests deploy/prometheus/'s rules
    # memcached (extstore built in) is the cluster tier's engine; iproute2 makes the network
    # namespaces the cluster tests run their "nodes" in
    if [[ ${1:-} == test || ${1:-} == bench ]]; then
        for pkg in prometheus memcached iproute2; do
            dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
        done
    fi
    # the benchmark compares against these peers; the tests do not need them
    if [[ ${1:-} == bench ]]; then
        for pkg in s3fs rclone; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    fi
    [[ ${#missing[@]} -eq 0 ]] && return
    local sudo=; [[ $(id -u) -ne 0 ]] && sudo=sudo
    echo "installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" python3-dev >/dev/null
}

install_python_packages() {
    if [[ ! -x $VENV/bin/python ]]; then
        "$PYTHON" -m venv "$VENV"
    fi
    # pyfuse3 builds from source against libfuse3-dev; the benchmark also needs its plots' deps
    local extras=test
    [[ ${1:-} == bench ]] && extras=test,bench
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
}

command=${1:-test}
shift || true
install_system_packages "$command"
install_python_packages "$command"
case $command in
    setup) ;;
    demo) exec "$VENV/bin/cachefs" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    lint) "$VENV/bin/ruff" check "$@" . && exec "$VENV/bin/mypy" ;;
    bench) exec "$VENV/bin/python" bench/run.py "$@" ;;
    *) echo "usage: scripts/dev.sh demo|test|lint|bench|setup [args]" >&2; exit 2 ;;
esac
