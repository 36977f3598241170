#!/bin/bash
# strata benchmark on a 3-layer backing chain: raw base (1 GiB of random
# data) <- qcow2 middle (a quarter of it rewritten) <- empty qcow2 top.
# Servers, one after another on the same chain (a fresh empty top each):
#   stratad              format=qcow2, cache=writeback
#   qsd                  qemu-storage-daemon: file driver aio=io_uring for
#                        every layer, qcow2 on top, NBD export on a unix
#                        socket
#   qemu-nbd             -f qcow2 --aio=io_uring
#   nbdkit-memory        nbdkit's memory plugin: no storage at all, the
#                        ceiling of the NBD path itself
# driven by fio's nbd engine.  Jobs, in this order, each on a new top:
#   4k-randread qd32 (reads fall through the top to mid and base),
#   4k-randwrite qd32 (allocating writes into the empty top, copy-on-write
#   from the backing chain), 1M-seqread qd8, 1M-seqwrite qd8 (allocating).
# Prints IOPS, MiB/s, stratad's ratio to each other server, peak RSS.
#
# Environment: STRATAD, BENCH_DIR, BENCH_RUNTIME, BENCH_RAMP, BENCH_QUICK,
# BENCH_SERVERS, BENCH_ROUNDS (default 3) as for bench-raw.sh;
# STRATAD_ARGS and STRATAD_REF_ARGS: extra arguments of stratad and of
# stratad-ref (e.g. STRATAD_REF=$STRATAD STRATAD_REF_ARGS="--threads 2"
# measures two loops against one in the same run); BENCH_ONLY: a regular
# expression, only the workloads whose names match it run.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
servers=${BENCH_SERVERS:-stratad${STRATAD_REF:+ stratad-ref} qsd qemu-nbd nbdkit-memory}

for tool in fio timeout dd qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done

base=$BENCH_DIR/chain-base-${size_mib}M.raw
mid=$BENCH_DIR/chain-mid-${size_mib}M.qcow2
if [ ! -f "$base" ] || [ "$(stat -c %s "$base")" != $((size_mib << 20)) ]; then
    echo "creating $base ($size_mib MiB of random data, once)"
    rm -f "$mid"
    timeout 600 dd if=/dev/urandom of="$base.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$base.tmp" "$base"
fi
if [ ! -f "$mid" ]; then
    echo "creating $mid (every 4th MiB rewritten, once)"
    qemu-img create -q -f qcow2 -b "$base" -F raw "$mid.tmp"
    script=()
    for ((m = 0; m < size_mib; m += 4)); do
        script+=(-c "write -P $((m % 251 + 1)) ${m}M 1M")
    done
    timeout 600 qemu-io -f qcow2 "${script[@]}" "$mid.tmp" >/dev/null
    mv "$mid.tmp" "$mid"
fi

bench_warm=("$base" "$mid")
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

new_top() {
    rm -f "$work/top.qcow2"
    qemu-img create -q -f qcow2 -b "$mid" -F qcow2 "$work/top.qcow2"
}

start_server() {                # server sock -> sets server_pid, uri
    local s=$1 sock=$2 log=$work/$1.log
    local t=$work/top.qcow2
    case $s in
    stratad|stratad-ref)
        bin=$(stratad_bin "$s")
        [ -x "$bin" ] || { echo "bench: $bin not found (build first)" >&2; return 1; }
        local extra=${STRATAD_ARGS:-}
        [ "$s" = stratad-ref ] && extra=${STRATAD_REF_ARGS:-}
        read -r -a extra <<<"$extra"
        cmd=("$bin" --listen "unix:$sock" --pid-file "$work/$s.pid"
             --export "name=bench,file=$t,format=qcow2,cache=writeback,backing-root=$BENCH_DIR"
             "${extra[@]}")
        uri="nbd+unix:///bench?socket=$sock" ;;
    qsd)
        local f='"driver":"file","aio":"io_uring","filename"'
        cmd=(qemu-storage-daemon
             --blockdev "{\"driver\":\"qcow2\",\"node-name\":\"top\",\"file\":{$f:\"$t\"},\
\"backing\":{\"driver\":\"qcow2\",\"file\":{$f:\"$mid\"},\
\"backing\":{\"driver\":\"raw\",\"file\":{$f:\"$base\"}}}}"
             --nbd-server "addr.type=unix,addr.path=$sock,max-connections=4"
             --export "type=nbd,id=e0,node-name=top,name=bench,writable=on")
        uri="nbd+unix:///bench?socket=$sock" ;;
    qemu-nbd)
        cmd=(qemu-nbd -f qcow2 --aio=io_uring --cache=writeback -t -e 4 -x bench -k "$sock" "$t")
        uri="nbd+unix:///bench?socket=$sock" ;;
    nbdkit-memory)
        cmd=(nbdkit -U "$sock" -f memory "${size_mib}M")
        uri="nbd+unix:///?socket=$sock" ;;
    *)  echo "bench: unknown server $s" >&2; return 1 ;;
    esac
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
  # each round starts with a different server (see run_rounds in lib.sh)
  for ((k = 0; k < ${#server_list[@]}; k++)); do
    s=${server_list[$(((k + round) % ${#server_list[@]}))]}
    case $s in
    qsd) bin=qemu-storage-daemon ;;
    nbdkit-memory) bin=nbdkit ;;
    *) bin=$s ;;
    esac
    if [ "${s#stratad}" = "$s" ] && ! command -v "$bin" >/dev/null; then
        echo "note: $bin is not installed; skipping $s"
        continue
    fi
    for w in "${workloads[@]}"; do
        read -r name rw bs depth jobs <<<"$w"
        [[ $name =~ ${BENCH_ONLY:-.} ]] || continue
        # A fresh empty top per job: reads fall through the chain, writes
        # allocate.  One server process per job.
        new_top
        sock=$work/$s.sock
        rm -f "$sock"
        if ! start_server "$s" "$sock"; then
            failed=1
            echo "$s $name FAIL FAIL - -" >> "$results"
            continue
        fi
        run_fio "$s" "$name" "$rw" "$bs" "$depth" "${jobs:-1}"
        stop_server "$s"
        if [ "$s" = stratad ] && ! qemu-img check -q "$work/top.qcow2"; then
            echo "bench: qemu-img check found errors in the top stratad wrote" >&2
            failed=1
        fi
    done
  done
done

echo
echo "chain: $base <- $mid <- top.qcow2 (${size_mib} MiB), runtime ${runtime}s per job" \
     "(+${ramp}s ramp), $(nproc) CPUs, $(uname -r)"
echo "median of $rounds round(s), server order rotated each round; a fresh top and server process per job"
ratio_to="${STRATAD_REF:+stratad-ref }qsd qemu-nbd nbdkit-memory"
summary

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
