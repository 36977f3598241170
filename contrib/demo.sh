#!/usr/bin/env bash
# README command 1: from nothing to a running stratad on a demo image.
# Installs missing packages, configures and builds, creates a small demo
# disk in ./demo/ and serves it in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

contrib/deps.sh build
[[ -f build/build.ninja ]] || meson setup build --buildtype=release >/dev/null
ninja -C build >/dev/null

mkdir -p demo
img=demo/base.raw
if [[ ! -f $img ]]; then
    # 64 MiB, sparse, with a recognisable first MiB
    truncate -s 64M "$img"
    # (yes dies of SIGPIPE when head has enough: not an error here)
    { yes "strata demo disk" || true; } | head -c 1M |
        dd of="$img" conv=notrunc status=none
fi
sock=$PWD/demo/stratad.sock
cat <<MSG
stratad is serving $img as export "demo"; connect with:
  nbdinfo 'nbd+unix:///demo?socket=$sock'
  qemu-img info 'nbd+unix:///demo?socket=$sock'
  nbdinfo nbd://127.0.0.1:10809/demo
Stop it with Ctrl-C.
MSG
exec build/daemon/stratad --listen "unix:$sock" --listen 127.0.0.1:10809 \
    --export "name=demo,file=$img,format=raw,description=strata demo disk"
