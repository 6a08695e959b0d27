#!/bin/sh
# Installs the system packages the test suite needs on Debian 12 (run as root).
# Idempotent: does nothing when everything is present. Python packages are
# not handled here; the Makefile puts them in .venv.
set -eu

# bazel-*: the end-to-end tests (libnetty-tcnative-jni: Bazel 4's only TLS, for grpcs://,
# see tests/e2e/test_bazel_tls.py); bubblewrap: the sandbox runner; b3sum: the BLAKE3
# reference; gcc, libc6-dev, libssl-dev, python3-dev: the native core; libseccomp-dev: the
# spawn helper (native/spawn/); python3-venv: .venv.
# The deployment tests (tests/deploy): debootstrap makes the base image (no registry is
# reachable), podman builds and runs the Dockerfile with runc (crun refuses this machine's
# hybrid cgroups), and the rest are podman's networking and storage helpers; systemd brings
# systemd-analyze, which checks the unit file (nothing here runs systemd as init); docker.io:
# the docker runner's tests start its daemon themselves.
# postgresql-15: /usr/lib/postgresql/15/bin, for the private cluster that BuildGrid 0.9.1
# needs in tests/buildgrid and bench/bench_buildgrid.py (no system cluster is used).
BUILD_PACKAGES="gcc libc6-dev libssl-dev libseccomp-dev python3-venv"
DEPLOY_PACKAGES="debootstrap podman runc uidmap fuse-overlayfs slirp4netns containernetworking-plugins iptables systemd docker.io"
# `--build`: only what building and running Stoker needs (make up); default: the tests too.
if [ "${1:-}" = "--build" ]; then PACKAGES="$BUILD_PACKAGES"; else PACKAGES="bazel-bootstrap bazel-platforms libnetty-tcnative-jni bubblewrap b3sum gcc libc6-dev libssl-dev libseccomp-dev python3-dev python3-venv postgresql-15 $DEPLOY_PACKAGES"; fi

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        "install ok installed") ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: missing packages:$missing (run this script as root)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Another apt (e.g. a background install) may hold the lock; wait for it
# instead of failing.
apt_get() {
    apt-get -q -y -o DPkg::Lock::Timeout=600 "$@" >"$log" 2>&1 || {
        cat "$log" >&2
        echo "install-test-deps: apt-get $* failed" >&2
        exit 1
    }
}

# Refresh the package lists only when they are absent or cannot place a
# missing package.
# shellcheck disable=SC2086
if ! apt-get -s -q install $missing >/dev/null 2>&1; then
    apt_get update
fi

echo "install-test-deps: installing$missing"
# shellcheck disable=SC2086
apt_get install --no-install-recommends $missing
