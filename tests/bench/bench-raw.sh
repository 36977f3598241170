#!/bin/bash
# strata benchmark: stratad vs qemu-nbd vs nbdkit (file plugin) serving the
# same raw file over a unix socket, driven by fio's nbd engine.
# See tests/bench/README.md.
#
# Environment:
#   STRATAD        stratad binary (default: build/daemon/stratad of this tree)
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

echo "command: $(printf '%q ' "$0" "$@")"
echo "env: STRATAD=${STRATAD-} BENCH_DIR=${BENCH_DIR-} BENCH_RUNTIME=${BENCH_RUNTIME-}" \
     "BENCH_RAMP=${BENCH_RAMP-} BENCH_QUICK=${BENCH_QUICK-} BENCH_SERVERS=${BENCH_SERVERS-}"

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
STRATAD=${STRATAD:-$top/build/daemon/stratad}
BENCH_DIR=${BENCH_DIR:-/var/tmp/strata-bench}
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    size_mib=64
    runtime=${BENCH_RUNTIME:-2}
    ramp=${BENCH_RAMP:-0}
    rounds=${BENCH_ROUNDS:-1}
else
    size_mib=1024
    runtime=${BENCH_RUNTIME:-10}
    ramp=${BENCH_RAMP:-1}
    rounds=${BENCH_ROUNDS:-3}
fi
servers=${BENCH_SERVERS:-stratad qemu-nbd nbdkit}

for tool in fio timeout dd; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done

mkdir -p "$BENCH_DIR"
img=$BENCH_DIR/bench-${size_mib}M.img
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" != $((size_mib << 20)) ]; then
    echo "creating $img ($size_mib MiB of random data, once)"
    timeout 600 dd if=/dev/urandom of="$img.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$img.tmp" "$img"
fi

work=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        sleep 1
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# name rw bs iodepth
workloads=(
    "4k-randread   randread  4k 32"
    "4k-randwrite  randwrite 4k 32"
    "1M-seqread    read      1M 8"
    "1M-seqwrite   write     1M 8"
)

results=$work/results.txt       # server workload iops bw_bytes
: > "$results"
rss=$work/rss.txt               # server kB
: > "$rss"
failed=0

wait_socket() {                 # sock pid
    for _ in $(seq 1 200); do
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
        [ -x "$STRATAD" ] || { echo "bench: $STRATAD not found (build first)" >&2; return 1; }
        cmd=("$STRATAD" --listen "unix:$sock" --pid-file "$work/$s.pid"
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

stop_server() {                 # server
    local s=$1 status=0
    # peak resident set size over the server's life
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$server_pid/status" 2>/dev/null || echo "?")
    echo "$s ${hwm:-?}" >> "$rss"
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "bench: $s did not stop within 10 s of SIGTERM; killing it" >&2
        kill -KILL "$server_pid" 2>/dev/null || true
        [ "$s" = stratad ] && failed=1
    fi
    wait "$server_pid" || status=$?
    if [ "$status" != 0 ]; then
        echo "note: $s exited with status $status after SIGTERM"
        [ "$s" = stratad ] && failed=1
    fi
    server_pid=
}

read -r -a server_list <<<"$servers"
n_servers=${#server_list[@]}
for ((round = 0; round < rounds; round++)); do
  echo "round $((round + 1)) of $rounds"
  for ((k = 0; k < n_servers; k++)); do
    s=${server_list[$(((k + round) % n_servers))]}
    case $s in
    qemu-nbd|nbdkit)
        if ! command -v "$s" >/dev/null; then
            echo "note: $s is not installed; skipping it"
            continue
        fi ;;
    esac
    sock=$work/$s.sock
    rm -f "$sock"   # a round before left it; a stale path must not look ready
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
        # Earlier write jobs leave GiBs of dirty page cache; without this
        # their writeback lands on whichever job runs next.
        sync
        if ! timeout $((runtime + ramp + 60)) "${fcmd[@]}" >"$work/$s-$name.out" 2>&1; then
            echo "bench: fio failed for $s $name:" >&2
            cat "$work/$s-$name.out" >&2
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
done

echo
echo "image: $img (${size_mib} MiB), runtime ${runtime}s per job (+${ramp}s ramp), $(nproc) CPUs, $(uname -r)"
echo "median of $rounds round(s), server order rotated each round"
"$PY" - "$results" "$rss" "$servers" <<'EOF'
import sys
results, rss, servers = sys.argv[1], sys.argv[2], sys.argv[3].split()
res = {}
order = []
for line in open(results):
    s, name, iops, bw = line.split()
    if name not in order:
        order.append(name)
    res.setdefault((s, name), []).append(
        None if iops == "FAIL" else (float(iops), float(bw) / (1 << 20)))


def median(vals):
    if not vals or any(v is None for v in vals):
        return None                    # a failed run fails the cell
    vals = sorted(vals)
    return vals[len(vals) // 2]


res = {k: median(v) for k, v in res.items()}
servers = [s for s in servers if any(k[0] == s for k in res)]
hdr = f"{'workload':<14}"
for s in servers:
    hdr += f" | {s + ' IOPS':>15} {s + ' MiB/s':>15}"
ratios = [o for o in ("qemu-nbd", "nbdkit") if o in servers and "stratad" in servers]
for o in ratios:
    hdr += f" | {'stratad/' + o:>16}"
print(hdr)
print("-" * len(hdr))
for name in order:
    row = f"{name:<14}"
    for s in servers:
        v = res.get((s, name))
        row += f" | {'FAIL':>15} {'FAIL':>15}" if v is None else f" | {v[0]:>15.0f} {v[1]:>15.1f}"
    for o in ratios:
        a, b = res.get(("stratad", name)), res.get((o, name))
        row += f" | {'-':>16}" if not a or not b or b[0] == 0 else f" | {a[0] / b[0]:>16.2f}"
    print(row)
peak = {}
for line in open(rss):
    srv, hwm = line.split()
    if hwm.isdigit() and (not peak.get(srv, "?").isdigit() or int(hwm) > int(peak[srv])):
        peak[srv] = hwm
    peak.setdefault(srv, hwm)
print()
print("peak RSS (VmHWM): " + ", ".join(
    f"{s} {int(peak[s]) / 1024:.1f} MiB" if peak.get(s, "?").isdigit() else f"{s} ?"
    for s in servers))
EOF

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
