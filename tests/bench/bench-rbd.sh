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
#   BENCH_QUICK=1  smoke test: 64 MiB image, 2 s per job, no ramp
# One run (no rounds): each server in turn, then rbd bench.
# Exit status: 0 if every run succeeded, 1 otherwise.
set -euo pipefail

echo "command: $(printf '%q ' "$0" "$@")"
echo "env: STRATAD=${STRATAD-} BENCH_DIR=${BENCH_DIR-} BENCH_SIZE_MIB=${BENCH_SIZE_MIB-}" \
     "BENCH_RUNTIME=${BENCH_RUNTIME-} BENCH_RAMP=${BENCH_RAMP-} BENCH_QUICK=${BENCH_QUICK-}"

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
STRATAD=${STRATAD:-$top/build/daemon/stratad}
BENCH_DIR=${BENCH_DIR:-/var/tmp/strata-bench}
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    size_mib=${BENCH_SIZE_MIB:-64}
    runtime=${BENCH_RUNTIME:-2}
    ramp=${BENCH_RAMP:-0}
else
    size_mib=${BENCH_SIZE_MIB:-256}
    runtime=${BENCH_RUNTIME:-10}
    ramp=${BENCH_RAMP:-1}
fi

for tool in fio timeout rbd qemu-nbd ceph-mon ceph-osd; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
[ -x "$STRATAD" ] || { echo "bench: $STRATAD not found (build first)" >&2; exit 1; }

mkdir -p "$BENCH_DIR"
work=$(mktemp -d "$BENCH_DIR/rbd-run.XXXXXX")
cluster=$work/ceph
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        sleep 1
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    "$top/contrib/ceph-cluster.sh" stop "$cluster" || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

results=$work/results.txt       # server workload iops bw_bytes
: > "$results"
: > "$work/cpu.txt"             # server ticks ticks_per_second
failed=0

wait_socket() {                 # sock pid
    for _ in $(seq 1 400); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

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
    if ! wait_socket "$sock" "$server_pid"; then
        echo "bench: $s did not start:" >&2
        cat "$log" >&2
        return 1
    fi
}

stop_server() {                 # server
    local s=$1 status=0
    # CPU time (user + system, all threads) over the server's life: on a
    # 2-core machine shared with the OSD, what a server burns the OSD lacks
    local ticks
    ticks=$(awk '{print $14 + $15}' "/proc/$server_pid/stat" 2>/dev/null || echo "?")
    echo "$s $ticks $(getconf CLK_TCK)" >> "$work/cpu.txt"
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 200); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "bench: $s did not stop within 20 s of SIGTERM; killing it" >&2
        kill -KILL "$server_pid" 2>/dev/null || true
        failed=1
    fi
    wait "$server_pid" || status=$?
    if [ "$status" != 0 ]; then
        echo "note: $s exited with status $status after SIGTERM"
        [ "$s" = stratad ] && failed=1
    fi
    server_pid=
}

for s in stratad qemu-nbd; do
    sock=$work/$s.sock
    if ! start_server "$s" "$sock"; then
        failed=1
        continue
    fi
    for w in "${workloads[@]}"; do
        read -r name rw bs depth <<<"$w"
        json=$work/$s-$name.json
        fcmd=(fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs"
              --iodepth="$depth" --numjobs=1 --runtime="$runtime" --ramp_time="$ramp"
              --time_based --output-format=json --output="$json")
        echo "fio: ${fcmd[*]}"
        if ! timeout $((runtime + ramp + 60)) "${fcmd[@]}" >"$work/$s-$name.out" 2>&1; then
            echo "bench: fio failed for $s $name:" >&2
            tail -5 "$work/$s-$name.out" >&2
            echo "bench: $s's log (tail):" >&2
            tail -30 "$work/$s.log" >&2
            failed=1
            echo "$s $name FAIL FAIL" >> "$results"
            continue
        fi
        if ! "$PY" - "$json" "$s" "$name" "$rw" >> "$results" <<'EOF'
import json, sys
path, server, name, rw = sys.argv[1:5]
text = open(path).read()
j = json.loads(text[text.index("{"):])
job = j["jobs"][0]
if job.get("error", 0) != 0:
    sys.exit(f"fio job error {job['error']}")
d = job["write" if "write" in rw else "read"]
if d["io_bytes"] == 0:
    sys.exit("fio moved no data")
print(server, name, round(d["iops"], 1), d["bw_bytes"])
EOF
        then
            echo "bench: cannot use fio's output for $s $name" >&2
            failed=1
            echo "$s $name FAIL FAIL" >> "$results"
        fi
    done
    stop_server "$s"
done

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
"$PY" - "$results" "$work/cpu.txt" <<'EOF'
import sys
servers = ["stratad", "qemu-nbd", "rbd-bench"]
res, order = {}, []
for line in open(sys.argv[1]):
    s, name, iops, bw = line.split()
    if name not in order:
        order.append(name)
    res[(s, name)] = None if iops == "FAIL" else (float(iops), float(bw) / (1 << 20))
hdr = f"{'workload':<14}"
for s in servers:
    hdr += f" | {s + ' IOPS':>15} {s + ' MiB/s':>15}"
hdr += f" | {'stratad/qemu-nbd':>16} | {'stratad/rbd-bench':>17}"
print(hdr)
print("-" * len(hdr))
for name in order:
    row = f"{name:<14}"
    for s in servers:
        v = res.get((s, name))
        row += f" | {'FAIL':>15} {'FAIL':>15}" if v is None else f" | {v[0]:>15.0f} {v[1]:>15.1f}"
    for o, wdt in (("qemu-nbd", 16), ("rbd-bench", 17)):
        a, b = res.get(("stratad", name)), res.get((o, name))
        row += f" | {'-':>{wdt}}" if not a or not b or b[0] == 0 else f" | {a[0] / b[0]:>{wdt}.2f}"
    print(row)
cpu = []
for line in open(sys.argv[2]):
    s, ticks, hz = line.split()
    if ticks.replace(".", "").isdigit():
        cpu.append(f"{s} {float(ticks) / float(hz):.1f} s")
print()
print("server CPU time over all four jobs (user+system): " + ", ".join(cpu))
EOF

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
