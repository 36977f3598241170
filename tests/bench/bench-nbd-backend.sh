#!/bin/bash
# strata benchmark of the nbd: backend: the golden-image case.  A raw base
# (random data) is served read-only by nbdkit's file plugin on a unix
# socket, started once; an empty qcow2 top names it as its backing file
# (nbd+unix:///?socket=...).  Servers, one after another (a fresh empty top
# and a fresh server process per job):
#   stratad    format=qcow2, the base opened by the nbd backend (libnbd)
#   qemu-nbd   -f qcow2 --aio=io_uring, the base opened by QEMU's nbd
#              driver
# driven by fio's nbd engine: 4k-randread qd32 (every read falls through
# to the NBD base), 4k-randwrite qd32 (copy-on-write from the base),
# 1M-seqread qd8, 1M-seqwrite qd8.  Prints IOPS, MiB/s, stratad's ratio to
# qemu-nbd, peak RSS; qemu-img check on every top stratad wrote.
#
# Environment: STRATAD, BENCH_DIR, BENCH_RUNTIME, BENCH_RAMP, BENCH_QUICK,
# BENCH_SERVERS, BENCH_ROUNDS (default 1), BENCH_SIZE_MIB as for
# bench-raw.sh.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=1
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
servers=${BENCH_SERVERS:-stratad${STRATAD_REF:+ stratad-ref} qemu-nbd}

for tool in fio timeout dd qemu-img nbdkit; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done

base=$BENCH_DIR/nbd-base-${size_mib}M.raw
if [ ! -f "$base" ] || [ "$(stat -c %s "$base")" != $((size_mib << 20)) ]; then
    echo "creating $base ($size_mib MiB of random data, once)"
    timeout 600 dd if=/dev/urandom of="$base.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$base.tmp" "$base"
fi

bench_workdir
base_sock=$work/base.sock
base_pid=
bench_cleanup_extra() {
    if [ -n "$base_pid" ]; then
        kill -TERM "$base_pid" 2>/dev/null || true
    fi
}
echo "base server: nbdkit -r -U $base_sock -f file $base"
nbdkit -r -U "$base_sock" -f file "$base" >"$work/base.log" 2>&1 &
base_pid=$!
wait_socket "$base_sock" "$base_pid" || { echo "bench: nbdkit did not start" >&2; exit 1; }
base_uri="nbd+unix:///?socket=$base_sock"

workloads=(
    "4k-randread   randread  4k 32"
    "4k-randwrite  randwrite 4k 32"
    "1M-seqread    read      1M 8"
    "1M-seqwrite   write     1M 8"
)

new_top() {
    rm -f "$work/top.qcow2"
    qemu-img create -q -f qcow2 -b "$base_uri" -F raw "$work/top.qcow2"
}

start_server() {                # server sock -> sets server_pid, uri
    local s=$1 sock=$2 log=$work/$1.log
    local t=$work/top.qcow2
    case $s in
    stratad|stratad-ref)
        bin=$(stratad_bin "$s")
        [ -x "$bin" ] || { echo "bench: $bin not found (build first)" >&2; return 1; }
        cmd=("$bin" --listen "unix:$sock" --pid-file "$work/$s.pid"
             --export "name=bench,file=$t,format=qcow2,cache=writeback,backing-remote=nbd:unix:$base_sock") ;;
    qemu-nbd)
        cmd=(qemu-nbd -f qcow2 --aio=io_uring --cache=writeback -t -e 4 -x bench -k "$sock" "$t") ;;
    *)  echo "bench: unknown server $s" >&2; return 1 ;;
    esac
    uri="nbd+unix:///bench?socket=$sock"
    echo "server: ${cmd[*]}"
    "${cmd[@]}" >"$log" 2>&1 &
    server_pid=$!
    if ! wait_socket "$sock" "$server_pid"; then
        echo "bench: $s did not start:" >&2
        cat "$log" >&2
        return 1
    fi
}

read -r -a server_list <<<"$servers"
for ((round = 0; round < rounds; round++)); do
  echo "round $((round + 1)) of $rounds"
  for ((k = 0; k < ${#server_list[@]}; k++)); do
    s=${server_list[$(((k + round) % ${#server_list[@]}))]}
    if [ "$s" = qemu-nbd ] && ! command -v qemu-nbd >/dev/null; then
        echo "note: qemu-nbd is not installed; skipping it"
        continue
    fi
    for w in "${workloads[@]}"; do
        read -r name rw bs depth <<<"$w"
        new_top
        sock=$work/$s.sock
        rm -f "$sock"
        if ! start_server "$s" "$sock"; then
            failed=1
            echo "$s $name FAIL FAIL" >> "$results"
            continue
        fi
        run_fio "$s" "$name" "$rw" "$bs" "$depth"
        stop_server "$s"
        if [ "${s#stratad}" != "$s" ] && ! qemu-img check -q "$work/top.qcow2"; then
            echo "bench: qemu-img check found errors in the top stratad wrote" >&2
            failed=1
        fi
    done
  done
done

echo
echo "chain: nbdkit file $base (${size_mib} MiB, over NBD) <- top.qcow2," \
     "runtime ${runtime}s per job (+${ramp}s ramp), $(nproc) CPUs, $(uname -r)"
echo "median of $rounds round(s); a fresh top and server process per job"
ratio_to="${STRATAD_REF:+stratad-ref }qemu-nbd"
summary

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
