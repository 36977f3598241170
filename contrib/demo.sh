#!/usr/bin/env bash
# README command 1: from nothing to a running stratad on a demo image.
# Installs missing packages, configures and builds, creates a small demo
# disk in ./demo/ and serves it in the foreground until Ctrl-C.
# Each step's output goes to build-logs/NAME.log; a step that fails says
# so, with the end of its log and what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
source contrib/lib.sh

contrib/deps.sh demo
# the daemon only: the tests' dependencies are not needed here
# (a set-up that failed before leaves build/ without build.ninja: redone)
if [[ ! -f build/build.ninja ]]; then
    setup=(meson setup build --buildtype=release)
    [[ -f build/meson-private/coredata.dat ]] && setup+=(--wipe)
    step meson-setup "the configuration failed (see the lines above); 'contrib/deps.sh demo' installs what it needs" \
        "${setup[@]}"
fi
step ninja "the build failed (see the compiler's messages above)" \
    ninja -C build

# A 3-layer chain: base.raw <- mid.qcow2 <- top.qcow2 (the export).
mkdir -p demo
if [[ ! -f demo/top.qcow2 ]]; then
    rm -f demo/base.raw demo/mid.qcow2
    # (set -e does not reach into a function run by step: every command
    # says itself when it fails; the top is made last)
    make_chain() {
        # 64 MiB, sparse, with a recognisable first MiB
        truncate -s 64M demo/base.raw || return
        # (yes dies of SIGPIPE when head has enough: not an error here)
        { yes "strata demo disk, base layer" || true; } | head -c 1M |
            dd of=demo/base.raw conv=notrunc status=none || return
        qemu-img create -f qcow2 -b base.raw -F raw demo/mid.qcow2 || return
        qemu-io -f qcow2 -c "write -P 0x6d 1M 1M" demo/mid.qcow2 || return
        qemu-img create -f qcow2 -b mid.qcow2 -F qcow2 demo/top.qcow2
    }
    step demo-images "making the demo chain with qemu-img failed; 'contrib/deps.sh demo' installs qemu-utils (remove demo/ and run this again)" \
        make_chain
fi
sock=$PWD/demo/stratad.sock
cat <<MSG
stratad is serving the chain demo/base.raw <- demo/mid.qcow2 <- demo/top.qcow2
as export "demo" (read-write); connect with:
  nbdinfo --map=qemu:allocation-depth 'nbd+unix:///demo?socket=$sock'
  qemu-img info 'nbd+unix:///demo?socket=$sock'
  qemu-io -f raw -c 'write -P 0x74 2M 64k' nbd://127.0.0.1:10809/demo
Stop it with Ctrl-C.
MSG
# In the foreground from here on: its log is the terminal.
exec build/daemon/stratad --listen "unix:$sock" --listen 127.0.0.1:10809 \
    --export "name=demo,file=demo/top.qcow2,format=qcow2,description=strata demo chain"
