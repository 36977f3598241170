#!/bin/bash
# strata benchmark: stratad vs qemu-nbd vs nbdkit (file plugin) serving the
# same raw file over a unix socket, driven by fio's nbd engine.
# See tests/bench/README.md.
#
# Environment:
#   STRATAD        stratad binary (default: build/daemon/stratad of this tree)
#   STRATAD_REF    a second stratad build (e.g. the previous commit's), run as
#                  server "stratad-ref" with the same arguments; ratios to it
#                  show what a change costs or gains
#   BENCH_DIR      where the test image is cached (default /var/tmp/strata-bench)
#   BENCH_RUNTIME  seconds per fio job (default 10)
#   BENCH_RAMP     fio ramp_time seconds, not measured (default 1)
#   BENCH_QUICK=1  smoke test: 64 MiB image, 2 s per job, no ramp
#   BENCH_SERVERS  servers to run, default "stratad qemu-nbd nbdkit"
#   BENCH_ROUNDS   rounds (default 3; 1 with BENCH_QUICK): each round runs
#                  every server, starting with a different one; the table
#                  shows the median of the rounds (on a shared 2-core VM,
#                  whichever server runs right after another's write jobs
#                  loses, so one round measures the order as much as the
#                  servers)
# Exit status: 0 if every fio run succeeded, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
servers=${BENCH_SERVERS:-stratad${STRATAD_REF:+ stratad-ref} qemu-nbd nbdkit}

for tool in fio timeout dd; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done

img=$BENCH_DIR/bench-${size_mib}M.img
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" != $((size_mib << 20)) ]; then
    echo "creating $img ($size_mib MiB of random data, once)"
    timeout 600 dd if=/dev/urandom of="$img.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$img.tmp" "$img"
fi

bench_warm=("$img")
bench_workdir

# name rw bs iodepth [fio jobs, each its own connection; default 1]
workloads=(
    "4k-randread     randread  4k 32"
    "4k-randwrite    randwrite 4k 32"
    "1M-seqread      read      1M 8"
    "1M-seqwrite     write     1M 8"
    "4k-randread-4c  randread  4k 16 4"
    "4k-randwrite-4c randwrite 4k 16 4"
)

start_server() {                # server sock -> sets server_pid, uri
    local s=$1 sock=$2 log=$work/$1.log
    case $s in
    stratad|stratad-ref)
        bin=$(stratad_bin "$s")
        [ -x "$bin" ] || { echo "bench: $bin not found (build first)" >&2; return 1; }
        cmd=("$bin" --listen "unix:$sock" --pid-file "$work/$s.pid"
             --export "name=bench,file=$img,format=raw,cache=writeback")
        uri="nbd+unix:///bench?socket=$sock" ;;
    qemu-nbd)
        cmd=(qemu-nbd -f raw --aio=io_uring --cache=writeback -t -e 4 -x bench -k "$sock" "$img")
        uri="nbd+unix:///bench?socket=$sock" ;;
    nbdkit)
        cmd=(nbdkit -U "$sock" -f file "$img")
        uri="nbd+unix:///?socket=$sock" ;;       # nbdkit's export is nameless
    *)  echo "bench: unknown server $s" >&2; return 1 ;;
    esac
    echo "server: ${cmd[*]}"
    "${cmd[@]}" >"$log" 2>&1 &
    server_pid=$!
    if ! wait_socket "$sock" "$server_pid"; then
        if [ "$s" = qemu-nbd ] && ! kill -0 "$server_pid" 2>/dev/null; then
            echo "note: qemu-nbd refused --aio=io_uring ($(tail -1 "$log")); using --aio=threads"
            cmd=(qemu-nbd -f raw --aio=threads --cache=writeback -t -e 4 -x bench -k "$sock" "$img")
            echo "server: ${cmd[*]}"
            "${cmd[@]}" >"$log" 2>&1 &
            server_pid=$!
            wait_socket "$sock" "$server_pid" && return 0
        fi
        echo "bench: $s did not start:" >&2
        cat "$log" >&2
        return 1
    fi
}

read -r -a server_list <<<"$servers"
run_rounds 10 "${server_list[@]}"

echo
echo "image: $img (${size_mib} MiB), runtime ${runtime}s per job (+${ramp}s ramp), $(nproc) CPUs, $(uname -r)"
echo "median of $rounds round(s), server order rotated each round"
ratio_to="${STRATAD_REF:+stratad-ref }qemu-nbd nbdkit"
summary

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
