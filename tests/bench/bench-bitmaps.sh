#!/bin/bash
# strata benchmark: the cost of dirty bitmaps on guest writes.
#
# The same stratad binary serves the same raw image three times, with 0, 1
# and 4 recording dirty bitmaps on its node (block-dirty-bitmap-add over
# the control socket, default granularity 64 KiB, the 4 at 64K, 4K, 512 B
# and 1M), and fio's nbd engine runs 4k random writes, iodepth 32, one
# connection.  Servers rotate order every round; the table gives median
# IOPS, the median over rounds of each configuration's ratio to the run
# without bitmaps in the same round (target: >= 0.95), and every run.
#
# Environment: as bench-raw.sh (STRATAD, BENCH_DIR, BENCH_RUNTIME,
# BENCH_RAMP, BENCH_QUICK, BENCH_ROUNDS, default 3 rounds).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
servers="bitmaps-0 bitmaps-1 bitmaps-4"

for tool in fio timeout dd; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
[ -x "$STRATAD" ] || { echo "bench: $STRATAD not found (build first)" >&2; exit 1; }

img=$BENCH_DIR/bench-${size_mib}M.img
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" != $((size_mib << 20)) ]; then
    echo "creating $img ($size_mib MiB of random data, once)"
    timeout 600 dd if=/dev/urandom of="$img.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$img.tmp" "$img"
fi
bench_workdir

start_server() {                # server sock -> sets server_pid, uri
    local s=$1 sock=$2 log=$work/$1.log ctl=$work/$1.ctl n
    n=${s#bitmaps-}
    rm -f "$ctl"
    cmd=("$STRATAD" --listen "unix:$sock" --pid-file "$work/$s.pid" --control "$ctl"
         --export "name=bench,file=$img,format=raw,cache=writeback")
    uri="nbd+unix:///bench?socket=$sock"
    echo "server: ${cmd[*]}  (+ $n bitmap(s))"
    "${cmd[@]}" >"$log" 2>&1 &
    server_pid=$!
    if ! wait_socket "$sock" "$server_pid" || ! wait_socket "$ctl" "$server_pid"; then
        echo "bench: $s did not start:" >&2
        cat "$log" >&2
        return 1
    fi
    "$PY" - "$ctl" "$n" <<'PYEOF'
import json, socket, sys
ctl, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(ctl)
f = s.makefile("rw")
json.loads(f.readline())
def call(cmd, args=None):
    f.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n")
    f.flush()
    r = json.loads(f.readline())
    if "error" in r:
        sys.exit(f"{cmd}: {r['error']}")
call("qmp_capabilities")
grans = [65536, 4096, 512, 1 << 20] if n > 1 else [65536]
for i in range(n):
    call("block-dirty-bitmap-add", {"node": "bench", "name": f"b{i}", "granularity": grans[i]})
PYEOF
}

workloads=("4k-randwrite randwrite 4k 32")
run_rounds 10 $servers

echo
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)   nproc: $(nproc)"
"$PY" - "$results" <<'PYEOF'
import sys
# results: one line per run, in run order; each round runs the three
# configurations back to back (rotated), so a ratio taken inside a round
# compares runs made under the same load.
runs = [line.split() for line in open(sys.argv[1])]
names = ("bitmaps-0", "bitmaps-1", "bitmaps-4")
rounds = [runs[i:i + 3] for i in range(0, len(runs) - 2, 3)]
def med(v):
    v = sorted(v)
    return v[len(v) // 2] if v else None
iops = {n: [float(r[2]) for r in runs if r[0] == n and r[2] != "FAIL"] for n in names}
paired = {n: [] for n in names}
for rd in rounds:
    got = {r[0]: float(r[2]) for r in rd if r[2] != "FAIL"}
    if "bitmaps-0" in got:
        for n in names:
            if n in got:
                paired[n].append(got[n] / got["bitmaps-0"])
print(f"{'4k-randwrite':<12} | {'IOPS median':>11} | {'ratio to none (median of per-round ratios)':>44} | every run's IOPS")
for n in names:
    m, r = med(iops[n]), med(paired[n])
    print(f"{n:<12} | {m if m is None else round(m):>11} | {'-' if r is None else f'{r:.3f}':>44} | "
          + " ".join(str(round(x)) for x in iops[n]))
PYEOF
exit $failed
