#!/bin/bash
# strata RBD benchmark: a raw RBD image served by stratad vs qemu-nbd's rbd
# driver (qemu-block-extra), driven by fio's nbd engine over a unix socket,
# with `rbd bench` (librbd directly, no NBD hop) as the ceiling.  The
# cluster is a throw-away one (contrib/ceph-cluster.sh: one mon, one
# memstore OSD on 127.0.0.1), started here and stopped at exit.
# See tests/bench/README.md.
#
# Environment:
#   STRATAD        stratad binary (default: build/daemon/stratad of this tree)
#   BENCH_DIR      where the cluster lives while running (default /var/tmp/strata-bench)
#   BENCH_SIZE_MIB image size (default 256; memstore holds it in RAM, twice)
#   BENCH_RUNTIME  seconds per fio job (default 10)
#   BENCH_RAMP     fio ramp_time seconds, not measured (default 1)
#   BENCH_QUICK=1  smoke test: 64 MiB image, 2 s per job, no ramp, 1 round
#   BENCH_ROUNDS   rounds (default 3): each runs both NBD servers, starting
#                  with a different one; the table shows the medians.
#                  Then rbd bench, once.
# Exit status: 0 if every run succeeded, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
default_size_mib=256
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
servers="stratad qemu-nbd rbd-bench"

for tool in fio timeout rbd qemu-nbd ceph-mon ceph-osd; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
[ -x "$STRATAD" ] || { echo "bench: $STRATAD not found (build first)" >&2; exit 1; }

bench_workdir
cluster=$work/ceph
bench_cleanup_extra() {
    "$top/contrib/ceph-cluster.sh" stop "$cluster"
}

"$top/contrib/ceph-cluster.sh" start "$cluster"
export CEPH_CONF=$cluster/ceph.conf
image=rbd/bench
timeout 60 rbd create --size "${size_mib}M" "$image"
# written once in full, so that reads hit data and writes overwrite it
timeout 300 rbd bench --io-type write --io-size 4M --io-threads 4 \
    --io-pattern seq --io-total "${size_mib}M" "$image" >/dev/null

# name rw bs iodepth
workloads=(
    "4k-randread   randread  4k 32"
    "4k-randwrite  randwrite 4k 32"
    "4M-seqread    read      4M 4"
    "4M-seqwrite   write     4M 4"
)

start_server() {                # server sock -> sets server_pid, uri
    local s=$1 sock=$2 log=$work/$1.log
    case $s in
    stratad)
        cmd=("$STRATAD" --listen "unix:$sock"
             --export "name=bench,file=rbd:$image,format=raw,cache=writeback") ;;
    qemu-nbd)
        cmd=(qemu-nbd -f raw --cache=writeback -t -e 4 -x bench -k "$sock" "rbd:$image") ;;
    esac
    uri="nbd+unix:///bench?socket=$sock"
    echo "server: ${cmd[*]}"
    "${cmd[@]}" >"$log" 2>&1 &
    server_pid=$!
    if ! wait_socket "$sock" "$server_pid" 20; then
        echo "bench: $s did not start:" >&2
        cat "$log" >&2
        return 1
    fi
}

# Rounds with the server order rotated (lib.sh): the first server would
# otherwise always meet an OSD still busy with the fill.
run_rounds 20 stratad qemu-nbd

# The ceiling: librbd itself.  rbd bench runs a byte count, not a time:
# aim at about the fio runtime from the rate of a short first pass.
for w in "${workloads[@]}"; do
    read -r name rw bs depth <<<"$w"
    case $rw in
    randread)  type=read;  pattern=rand ;;
    randwrite) type=write; pattern=rand ;;
    read)      type=read;  pattern=seq ;;
    write)     type=write; pattern=seq ;;
    esac
    bsb=$(( ${bs%[kM]} << $([ "${bs: -1}" = k ] && echo 10 || echo 20) ))
    rb() {                      # total_bytes -> "ops/s bytes/s"
        # its last line: "elapsed: S  ops: N  ops/sec: R  bytes/sec: X MiB/s"
        timeout $((runtime * 6 + 120)) rbd bench --io-type "$type" --io-size "$bsb" \
            --io-threads "$depth" --io-pattern "$pattern" --io-total "$1" "$image" |
            awk -v bs="$bsb" '/^elapsed:/ {printf "%s %.0f\n", $6, $6 * bs}'
    }
    min_ops=$((bsb >= 1048576 ? 16 : 2000))
    probe=$(rb $((bsb * min_ops))) || probe=
    if [ -z "$probe" ]; then
        echo "bench: rbd bench failed for $name" >&2
        failed=1
        echo "rbd-bench $name FAIL FAIL" >> "$results"
        continue
    fi
    total=$("$PY" -c "import sys; r=float('${probe% *}'); print(max($min_ops, int(r * $runtime)) * $bsb)")
    echo "rbd bench: --io-type $type --io-size $bsb --io-threads $depth --io-pattern $pattern --io-total $total $image"
    out=$(rb "$total") || out=
    if [ -z "$out" ]; then
        echo "bench: rbd bench failed for $name" >&2
        failed=1
        echo "rbd-bench $name FAIL FAIL" >> "$results"
        continue
    fi
    echo "rbd-bench $name $out" >> "$results"
done

echo
echo "image: $image (${size_mib} MiB, memstore OSD), runtime ${runtime}s per fio job (+${ramp}s ramp), $(nproc) CPUs, $(uname -r)"
echo "median of $rounds round(s) for the NBD servers (order rotated each round); rbd bench once"
ratio_to="qemu-nbd rbd-bench"
summary

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
