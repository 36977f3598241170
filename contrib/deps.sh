#!/usr/bin/env bash
# Installs what strata needs on Debian 12, and nothing when all is present.
# Usage: contrib/deps.sh [build|demo|test|bench]
#   build: compile (and the man pages: perl's pod2man); demo: + qemu-img
#   to make the demo chain; test, bench: + everything the test suite and
#   the benchmarks run
set -euo pipefail
source "$(dirname "$0")/lib.sh"

level=${1:-build}
case $level in
build|demo|test|bench) ;;
*) echo "usage: contrib/deps.sh [build|demo|test|bench]" >&2; exit 2 ;;
esac
pkgs=(gcc pkg-config meson ninja-build liburing-dev zlib1g-dev libzstd-dev
      libjson-c-dev perl)
# TLS (--tls): GnuTLS
pkgs+=(libgnutls28-dev)
# optional at build time: sd_notify through libsystemd (stratad speaks the
# protocol itself without it), the Prometheus endpoint (--metrics)
pkgs+=(libsystemd-dev libmicrohttpd-dev)
# optional at build time: the nbdkit plugin and filter (nbdkit/), the
# nbd backend (libnbd)
pkgs+=(nbdkit-plugin-dev libnbd-dev)
if [[ $level == demo ]]; then
    pkgs+=(qemu-utils)
fi
if [[ $level == test || $level == bench ]]; then
    # cmocka for unit tests; real clients for integration tests;
    # qemu-storage-daemon (qemu-system-common) for the chain benchmark
    # and to compare the control socket with
    pkgs+=(libcmocka-dev libnbd-bin python3-libnbd qemu-utils nbdkit fio
           python3 qemu-system-common)
    # man -l renders the man pages in the docs test
    pkgs+=(man-db)
    # certtool and psktool make the TLS tests' certificates and keys
    pkgs+=(gnutls-bin)
    # a third-party QMP client (Go) for test-qmp-tools.py
    pkgs+=(golang-go golang-github-digitalocean-go-qemu-dev)
    # VM tests (tests/vm): QEMU boots a stock Debian kernel, socat carries
    # its guestfwd connections, e2fsprogs checks the guest's file system
    pkgs+=(qemu-system-x86 socat e2fsprogs)
    # operations tests: systemd-socket-activate and systemd-analyze
    # (systemd), scraping /metrics (curl) and checking it (promtool, from
    # prometheus)
    pkgs+=(systemd curl prometheus)
    # static analysis of the C sources (contrib/cppcheck.sh)
    pkgs+=(cppcheck)
    # the libFuzzer targets of tests/fuzz, built with clang (build-fuzz)
    # and fuzzed briefly by the suite: libFuzzer's runtime is in
    # libclang-rt-14-dev, which clang only recommends
    pkgs+=(clang libclang-rt-14-dev)
    # the rbd backend, and a throw-away Ceph cluster to test it against
    # (contrib/ceph-cluster.sh); qemu's rbd driver for the comparisons
    pkgs+=(librbd-dev librados-dev ceph-mon ceph-osd ceph-common
           qemu-block-extra)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0

echo "strata: installing ${missing[*]} (log: $STRATA_LOG_DIR/apt-get-install.log)" >&2
sudo=()
if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || {
        echo "strata: need root or sudo to install ${missing[*]}:" \
             "run 'apt-get install ${missing[*]}' as root, then this again" >&2
        exit 1
    }
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
step apt-get-update "check the network and the apt sources (/etc/apt/sources.list*), then run this again" \
    "${sudo[@]}" apt-get update
step apt-get-install "install them by hand ('apt-get install ${missing[*]}' as root) to see why, then run this again" \
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
