#!/usr/bin/env bash
# README command 1: from nothing to a running stratad on a demo image.
# Installs missing packages, configures and builds, creates a small demo
# disk in ./demo/ and serves it in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

contrib/deps.sh demo
[[ -f build/build.ninja ]] || meson setup build --buildtype=release >/dev/null
ninja -C build >/dev/null

# A 3-layer chain: base.raw <- mid.qcow2 <- top.qcow2 (the export).
mkdir -p demo
if [[ ! -f demo/top.qcow2 ]]; then
    rm -f demo/base.raw demo/mid.qcow2
    # 64 MiB, sparse, with a recognisable first MiB
    truncate -s 64M demo/base.raw
    # (yes dies of SIGPIPE when head has enough: not an error here)
    { yes "strata demo disk, base layer" || true; } | head -c 1M |
        dd of=demo/base.raw conv=notrunc status=none
    qemu-img create -q -f qcow2 -b base.raw -F raw demo/mid.qcow2
    qemu-io -f qcow2 -c "write -P 0x6d 1M 1M" demo/mid.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 demo/top.qcow2
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
exec build/daemon/stratad --listen "unix:$sock" --listen 127.0.0.1:10809 \
    --export "name=demo,file=demo/top.qcow2,format=qcow2,description=strata demo chain"
