#!/bin/bash
# strata inside nbdkit: the plugin (nbdkit strata) against qemu-nbd, and
# stratad beside them, on the 3-layer chain of bench-chain.sh: raw base
# (random data) <- qcow2 middle (every 4th MiB rewritten) <- empty qcow2
# top, a fresh top and server process per job.  Servers on the chain:
#   nbdkit-strata   nbdkit -U SOCK -f PLUGIN file=TOP format=qcow2
#   qemu-nbd        qemu-nbd -f qcow2 --aio=io_uring --cache=writeback -t -e 4
#   stratad         stratad --export ...,format=qcow2,cache=writeback
#   nbdkit-memory   nbdkit -U SOCK -f memory SIZE: nbdkit's own request
#                   path with no storage behind it, i.e. the most any nbdkit
#                   plugin can do on this machine (the ceiling row)
# Read-only rows on one flat qcow2 image (the chain converted, no backing
# file: nbdkit's qcow2dec filter reads no backing files):
#   nbdkit-strata-flat  the plugin, readonly=true
#   qcow2dec-flat       nbdkit --filter=qcow2dec file FLAT (nbdkit >= 1.36;
#                       skipped with a note when the filter is missing)
#   qemu-nbd-flat       qemu-nbd -r -f qcow2 --aio=io_uring
# driven by fio's nbd engine: one connection, and 4 connections (fio
# numjobs=4, a connection each) for 4k random reads.  BENCH_ROUNDS rounds
# (default 3), the servers' order rotated each round; prints the medians
# (IOPS, MiB/s, server CPU per request), the ratios of the plugin to each
# other server and of the ceiling to qemu-nbd, and the load average.
#
# Environment: as bench-chain.sh (STRATAD, BENCH_DIR, BENCH_RUNTIME,
# BENCH_RAMP, BENCH_QUICK, BENCH_SIZE_MIB, BENCH_ROUNDS), and
# STRATA_NBDKIT_PLUGIN (the plugin; default
# build/nbdkit/nbdkit-strata-plugin.so).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
PLUGIN=${STRATA_NBDKIT_PLUGIN:-$top/build/nbdkit/nbdkit-strata-plugin.so}

for tool in fio timeout dd qemu-img qemu-io qemu-nbd nbdkit; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
[ -f "$PLUGIN" ] || { echo "bench: $PLUGIN not found (build with nbdkit-plugin-dev)" >&2; exit 1; }

base=$BENCH_DIR/chain-base-${size_mib}M.raw
mid=$BENCH_DIR/chain-mid-${size_mib}M.qcow2
flat=$BENCH_DIR/chain-flat-${size_mib}M.qcow2
if [ ! -f "$base" ] || [ "$(stat -c %s "$base")" != $((size_mib << 20)) ]; then
    echo "creating $base ($size_mib MiB of random data, once)"
    rm -f "$mid" "$flat"
    timeout 600 dd if=/dev/urandom of="$base.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$base.tmp" "$base"
fi
if [ ! -f "$mid" ]; then
    echo "creating $mid (every 4th MiB rewritten, once)"
    rm -f "$flat"
    qemu-img create -q -f qcow2 -b "$base" -F raw "$mid.tmp"
    script=()
    for ((m = 0; m < size_mib; m += 4)); do
        script+=(-c "write -P $((m % 251 + 1)) ${m}M 1M")
    done
    timeout 600 qemu-io -f qcow2 "${script[@]}" "$mid.tmp" >/dev/null
    mv "$mid.tmp" "$mid"
fi
if [ ! -f "$flat" ]; then
    echo "creating $flat (the chain in one image, once)"
    timeout 600 qemu-img convert -f qcow2 -O qcow2 "$mid" "$flat.tmp"
    mv "$flat.tmp" "$flat"
fi
have_qcow2dec=0
if [ -e "$(nbdkit --dump-config | sed -n 's/^filterdir=//p')/nbdkit-qcow2dec-filter.so" ]; then
    have_qcow2dec=1
fi

bench_warm=("$base" "$mid" "$flat")
bench_workdir

chain_workloads=(
    "4k-randread   randread  4k 32"
    "4k-randread-4conn randread 4k 32 4"
    "4k-randwrite  randwrite 4k 32"
    "1M-seqread    read      1M 8"
    "1M-seqwrite   write     1M 8"
)
flat_workloads=(
    "4k-randread   randread  4k 32"
    "1M-seqread    read      1M 8"
)

start_server() {                # server sock -> sets server_pid, uri
    local s=$1 sock=$2 log=$work/$1.log t=$work/top.qcow2
    case $s in
    nbdkit-strata)
        cmd=(nbdkit -U "$sock" -f "$PLUGIN" "file=$t" format=qcow2 "backing-root=$BENCH_DIR")
        uri="nbd+unix:///?socket=$sock" ;;
    qemu-nbd)
        cmd=(qemu-nbd -f qcow2 --aio=io_uring --cache=writeback -t -e 4 -x bench -k "$sock" "$t")
        uri="nbd+unix:///bench?socket=$sock" ;;
    stratad)
        cmd=("$STRATAD" --listen "unix:$sock" --pid-file "$work/$s.pid"
             --export "name=bench,file=$t,format=qcow2,cache=writeback,backing-root=$BENCH_DIR")
        uri="nbd+unix:///bench?socket=$sock" ;;
    nbdkit-memory)
        cmd=(nbdkit -U "$sock" -f memory "${size_mib}M")
        uri="nbd+unix:///?socket=$sock" ;;
    nbdkit-strata-flat)
        cmd=(nbdkit -U "$sock" -f -r "$PLUGIN" "file=$flat" format=qcow2 readonly=true)
        uri="nbd+unix:///?socket=$sock" ;;
    qcow2dec-flat)
        cmd=(nbdkit -U "$sock" -f -r --filter=qcow2dec file "$flat")
        uri="nbd+unix:///?socket=$sock" ;;
    qemu-nbd-flat)
        cmd=(qemu-nbd -r -f qcow2 --aio=io_uring --cache=writeback -t -e 4 -x bench -k "$sock" "$flat")
        uri="nbd+unix:///bench?socket=$sock" ;;
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

one_job() {                     # server workload-line
    local s=$1 name rw bs depth jobs
    read -r name rw bs depth jobs <<<"$2"
    rm -f "$work/top.qcow2"
    qemu-img create -q -f qcow2 -b "$mid" -F qcow2 "$work/top.qcow2"
    local sock=$work/$s.sock
    rm -f "$sock"
    if ! start_server "$s" "$sock"; then
        failed=1
        echo "$s $name FAIL FAIL" >> "$results"
        return 0
    fi
    run_fio "$s" "$name" "$rw" "$bs" "$depth" "${jobs:-1}"
    stop_server "$s"
    if [ "$s" = nbdkit-strata ] && ! qemu-img check -q "$work/top.qcow2"; then
        echo "bench: qemu-img check found errors in the top the plugin wrote" >&2
        failed=1
    fi
}

# Every job of every server, $rounds times; within a round each workload
# starts with a different server (whichever runs right after another's
# write job meets its writeback).
run_set() {                     # "servers" workload-lines...
    local list=($1) w k round
    shift
    for ((round = 0; round < rounds; round++)); do
        for w in "$@"; do
            for ((k = 0; k < ${#list[@]}; k++)); do
                one_job "${list[$(((k + round) % ${#list[@]}))]}" "$w"
            done
        done
    done
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run_set "nbdkit-strata qemu-nbd stratad nbdkit-memory" "${chain_workloads[@]}"
flat_servers="nbdkit-strata-flat qemu-nbd-flat"
if [ "$have_qcow2dec" = 1 ]; then
    flat_servers="nbdkit-strata-flat qcow2dec-flat qemu-nbd-flat"
else
    echo "note: nbdkit's qcow2dec filter is not installed (nbdkit >= 1.36); its rows are skipped"
fi
run_set "$flat_servers" "${flat_workloads[@]}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "chain: $base <- $mid <- top.qcow2; flat: $flat (${size_mib} MiB)," \
     "runtime ${runtime}s per job (+${ramp}s ramp), median of $rounds round(s)," \
     "$(nproc) CPUs, $(uname -r), $(nbdkit --version), $(qemu-nbd --version | head -1)"
"$PY" - "$results" <<'PYEOF'
import sys
res = {}
cpus = {}
order = []
for line in open(sys.argv[1]):
    f = line.split()  # server workload iops bw cpu_us_per_request io-wq_peak
    s, name, iops, bw = f[:4]
    res.setdefault((s, name), []).append(
        None if iops == "FAIL" else (float(iops), float(bw) / (1 << 20)))
    if len(f) >= 5 and f[4] not in ("-", "FAIL"):
        cpus.setdefault((s, name), []).append(float(f[4]))
    if name not in order:
        order.append(name)


def median(vals):
    if not vals or any(v is None for v in vals):
        return None                    # a failed run fails the cell
    return sorted(vals)[len(vals) // 2]


res = {k: median(v) for k, v in res.items()}
cpus = {k: median(v) for k, v in cpus.items()}


def ratio(a, b):
    a, b = res.get(a), res.get(b)
    return "-" if not a or not b or not b[0] else f"{a[0] / b[0]:.2f}"


def table(title, servers, pairs):
    servers = [s for s in servers if any(k[0] == s for k in res)]
    pairs = [(a, b) for a, b in pairs if a in servers and b in servers]
    rows = [n for n in order if any((s, n) in res for s in servers)]
    hdr = f"{title:<18}" + "".join(f" | {s + ' IOPS (MiB/s) CPU us':>36}" for s in servers) + \
          "".join(f" | {a.replace('-flat', '') + '/' + b.replace('-flat', ''):>27}" for a, b in pairs)
    print(hdr)
    print("-" * len(hdr))
    for n in rows:
        row = f"{n:<18}"
        for s in servers:
            v, c = res.get((s, n)), cpus.get((s, n))
            cell = ("-" if (s, n) not in res else "FAIL" if v is None else
                    f"{v[0]:.0f} ({v[1]:.0f}) {'-' if c is None else f'{c:.2f}'}")
            row += f" | {cell:>36}"
        for a, b in pairs:
            row += f" | {ratio((a, n), (b, n)):>27}"
        print(row)
    print()


print("IOPS, MiB/s and server CPU per request in microseconds (user+system, "
      "all threads), medians")
table("3-layer chain", ["nbdkit-strata", "qemu-nbd", "stratad", "nbdkit-memory"],
      [("nbdkit-strata", "qemu-nbd"), ("nbdkit-strata", "stratad"),
       ("nbdkit-strata", "nbdkit-memory"), ("nbdkit-memory", "qemu-nbd")])
table("flat, read", ["nbdkit-strata-flat", "qcow2dec-flat", "qemu-nbd-flat"],
      [("nbdkit-strata-flat", "qcow2dec-flat"), ("nbdkit-strata-flat", "qemu-nbd-flat")])
print("nbdkit-memory/qemu-nbd is the most any nbdkit plugin can reach against "
      "qemu-nbd here: nbdkit's request path with no storage at all")
PYEOF
if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
