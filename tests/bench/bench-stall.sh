#!/bin/bash
# strata benchmark: how long guest writes stall when a snapshot or a flush
# happens while lots of written data sits in the page cache.
#
# A fresh qcow2 overlay over a 512 MiB raw base (random data) takes fio's
# nbd engine: 4k random writes, iodepth 32, one connection, per-request
# latency log (write_lat_log, no averaging).  At 2.5 s into the job, one
# event:
#   snapshot   blockdev-snapshot-sync of the overlay (QMP)
#   flush      an NBD FLUSH on a second connection, no snapshot
#   pivot      an active block-commit of the overlay into a qcow2 layer
#              between it and the base (empty at the start), then, at
#              BLOCK_JOB_READY, block-job-complete: the commit's copy, its
#              mirrored writes and the pivot all fall after the event (the
#              run lasts BENCH_PIVOT_EXTRA, default 6, seconds longer)
# Servers, one after another, a fresh overlay and process per run:
#   stratad    format=qcow2, cache=writeback, --control socket
#   qsd        qemu-storage-daemon: qcow2 over file (aio=io_uring), QMP
#              monitor socket, NBD export on a unix socket
# For each run: p99 latency of the writes completed before the event
# (after the first 0.5 s), the worst latency of those completed after it
# (to the end of the run), and the worst of those completed within 1 s
# of it (the event itself: a snapshot takes up to about 1 s here; for a
# pivot, within 1 s of its block-job-complete, the copy before it being
# the commit's cost, not the pivot's); and, as the run's own baseline,
# the worst latency completed before the event (after the first 0.5 s):
# the stalls the write load has with no event at all.  The table shows
# the median over the rounds.  The target for stratad: worst-after
# within 10 ms of p99-before.
#
# Environment: STRATAD, BENCH_DIR, BENCH_RUNTIME (default 6 s; 4 with
# BENCH_QUICK), BENCH_ROUNDS (default 3; 1 with BENCH_QUICK),
# BENCH_QUICK=1 (64 MiB base, short: a smoke test), BENCH_SERVERS
# (default "stratad qsd", plus "stratad-ref" when STRATAD_REF names a
# second build to compare with), BENCH_EVENTS (default "snapshot flush
# pivot"),
# BENCH_KEEP=DIR (keep each run's fio latency log and server log there,
# named ROUND-SERVER-EVENT.*, for a closer look), BENCH_COLD_BASE=1 (do
# not read the base into the page cache before each run).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
default_size_mib=512
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
if [ "${BENCH_QUICK:-0}" = 1 ]; then
    runtime=${BENCH_RUNTIME:-4}
else
    runtime=${BENCH_RUNTIME:-6}
fi
servers=${BENCH_SERVERS:-stratad${STRATAD_REF:+ stratad-ref} qsd}
events=${BENCH_EVENTS:-snapshot flush pivot}
event_at=2.5

for tool in fio timeout dd qemu-img; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
"$PY" -c 'import nbd' 2>/dev/null || { echo "bench: python3-libnbd is not installed" >&2; exit 1; }

base=$BENCH_DIR/stall-base-${size_mib}M.raw
if [ ! -f "$base" ] || [ "$(stat -c %s "$base")" != $((size_mib << 20)) ]; then
    echo "creating $base ($size_mib MiB of random data, once)"
    timeout 600 dd if=/dev/urandom of="$base.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$base.tmp" "$base"
fi

bench_warm=("$base")
bench_workdir
: > "$work/stall.txt"               # server event p99_before worst_after samples worst_1s worst_before (ms)

start_server() {                # server sock ctl ev -> sets server_pid, uri
    local s=$1 sock=$2 ctl=$3 ev=$4 log=$work/$1.log t=$work/top.qcow2
    case $s in
    stratad|stratad-ref)
        local bin
        bin=$(stratad_bin "$s")
        [ -x "$bin" ] || { echo "bench: $bin not found (build first)" >&2; return 1; }
        cmd=("$bin" --listen "unix:$sock" --pid-file "$work/$s.pid" --control "$ctl"
             --verbose
             --export "name=bench,file=$t,format=qcow2,cache=writeback,backing-root=$BENCH_DIR") ;;
    qsd)
        local f='"driver":"file","aio":"io_uring","filename"'
        local below="{\"driver\":\"raw\",\"file\":{$f:\"$base\"}}"
        if [ "$ev" = pivot ]; then
            below="{\"driver\":\"qcow2\",\"node-name\":\"mid\",\"file\":{$f:\"$work/mid.qcow2\"},\
\"backing\":$below}"
        fi
        cmd=(qemu-storage-daemon
             --blockdev "{\"driver\":\"qcow2\",\"node-name\":\"top\",\"file\":{$f:\"$t\"},\
\"backing\":$below}"
             --chardev "socket,id=mon,path=$ctl,server=on,wait=off"
             --monitor "chardev=mon"
             --nbd-server "addr.type=unix,addr.path=$sock,max-connections=4"
             --export "type=nbd,id=e0,node-name=top,name=bench,writable=on") ;;
    *)  echo "bench: unknown server $s" >&2; return 1 ;;
    esac
    uri="nbd+unix:///bench?socket=$sock"
    echo "server: ${cmd[*]}"
    "${cmd[@]}" >"$log" 2>&1 &
    server_pid=$!
    if ! wait_socket "$sock" "$server_pid" || ! wait_socket "$ctl" "$server_pid"; then
        echo "bench: $s did not start:" >&2
        cat "$log" >&2
        return 1
    fi
}

# Fires the event at $event_at s: a QMP snapshot (stratad names the export,
# QEMU the node), an NBD FLUSH, or an active commit and its completion.
# Prints how long it took.
fire_event() {                  # server event ctl
    "$PY" - "$1" "$2" "$3" "$uri" "$work/snap.qcow2" "$event_at" "$work/mid.qcow2" \
        "$work/pivot-at.txt" "$work/event-at.txt" <<'PYEOF'
import json, socket, sys, time
server, event, ctl, uri, snap, at, mid, pivot_at, event_at = sys.argv[1:10]
def mark(path):                    # wall clock in ms: fio's log_unix_epoch
    with open(path, "w") as out:
        out.write(f"{time.time() * 1e3:.0f}\n")
# Everything but the event itself (imports, connections, negotiation) is
# done before the wait, so that it does not land near the event.
if event == "flush":
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    time.sleep(float(at))
    t0 = time.monotonic()
    mark(event_at)
    h.flush()
    t1 = time.monotonic()
    h.shutdown()
else:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(90)
    s.connect(ctl)
    f = s.makefile("rw")
    events = []
    def call(cmd, args=None):
        f.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r
            if "event" in r:
                events.append(r)
    def wait_event(name):
        while True:
            while events:
                e = events.pop(0)
                if e["event"] == name:
                    return e
            line = f.readline()
            if not line:
                sys.exit(f"the monitor closed while waiting for {name}")
            events.append(json.loads(line))
    json.loads(f.readline())                     # greeting
    call("qmp_capabilities")
    stratad = server.startswith("stratad")
    time.sleep(float(at))
    t0 = time.monotonic()
    mark(event_at)
    if event == "snapshot":
        who = ({"device": "bench"} if stratad
               else {"node-name": "top", "snapshot-node-name": "snap"})
        r = call("blockdev-snapshot-sync", dict(who, **{"snapshot-file": snap, "format": "qcow2"}))
        if "error" in r:
            sys.exit(f"snapshot failed: {r['error']}")
    else:
        args = ({"device": "bench", "job-id": "c", "base": mid} if stratad
                else {"device": "top", "job-id": "c", "base-node": "mid"})
        r = call("block-commit", args)
        if "error" in r:
            sys.exit(f"block-commit failed: {r['error']}")
        wait_event("BLOCK_JOB_READY")
        tr = time.monotonic()
        mark(pivot_at)
        r = call("block-job-complete", {"device": "c"})
        if "error" in r:
            sys.exit(f"block-job-complete failed: {r['error']}")
        e = wait_event("BLOCK_JOB_COMPLETED")
        if "error" in e.get("data", {}):
            sys.exit(f"the commit failed: {e['data']['error']}")
        print(f"commit ready after {(tr - t0) * 1e3:.1f} ms")
    t1 = time.monotonic()
print(f"event {event} took {(t1 - t0) * 1e3:.1f} ms (monotonic {t0 * 1e3:.1f} ms)")
PYEOF
}

read -r -a server_list <<<"$servers"
read -r -a event_list <<<"$events"
for ((round = 0; round < rounds; round++)); do
  echo "round $((round + 1)) of $rounds"
  for ev in "${event_list[@]}"; do
    for ((k = 0; k < ${#server_list[@]}; k++)); do
        s=${server_list[$(((k + round) % ${#server_list[@]}))]}
        if [ "$s" = qsd ] && ! command -v qemu-storage-daemon >/dev/null; then
            echo "note: qemu-storage-daemon is not installed; skipping qsd"
            continue
        fi
        rm -f "$work/top.qcow2" "$work/snap.qcow2" "$work/mid.qcow2" "$work"/lat_*.log \
              "$work/pivot-at.txt" "$work/event-at.txt"
        if [ "$ev" = pivot ]; then
            qemu-img create -q -f qcow2 -b "$base" -F raw "$work/mid.qcow2"
            qemu-img create -q -f qcow2 -b "$work/mid.qcow2" -F qcow2 "$work/top.qcow2"
        else
            qemu-img create -q -f qcow2 -b "$base" -F raw "$work/top.qcow2"
        fi
        sock=$work/$s.sock ctl=$work/$s.ctl
        rm -f "$sock" "$ctl"
        if ! start_server "$s" "$sock" "$ctl" "$ev"; then
            failed=1
            continue
        fi
        rt=$runtime
        # the commit copies what 2.5 s of writes put in the overlay first
        [ "$ev" = pivot ] && rt=$((runtime + ${BENCH_PIVOT_EXTRA:-6}))
        fcmd=(fio --name=stall --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k
              --iodepth=32 --numjobs=1 --runtime="$rt" --time_based
              --write_lat_log="$work/lat" --log_avg_msec=0 --log_unix_epoch=1
              --output-format=json --output="$work/fio.json")
        echo "fio: ${fcmd[*]}  (event: $ev at ${event_at}s)"
        sync
        # The base back in the page cache (lib.sh): cold pages of it would
        # make the overlay's copy-on-write reads queue behind the event's
        # write-back and cache flush on the device, a stall of the VM's
        # disk, not of the server.
        bench_warm_cache
        timeout $((rt + 60)) "${fcmd[@]}" >"$work/fio.out" 2>&1 &
        fio_pid=$!
        if ! fire_event "$s" "$ev" "$ctl"; then
            echo "bench: the $ev event failed on $s" >&2
            failed=1
        fi
        if ! wait "$fio_pid"; then
            echo "bench: fio failed for $s:" >&2
            cat "$work/fio.out" >&2
            failed=1
        fi
        stop_server "$s" 30
        if [ "$s" != qsd ]; then
            grep -h "snapshot:\|is the top of" "$work/$s.log" | tail -1 || true
            for img in "$work/top.qcow2" "$work/snap.qcow2" "$work/mid.qcow2"; do
                [ -f "$img" ] || continue
                if ! qemu-img check -q "$img"; then
                    echo "bench: qemu-img check found errors in $img" >&2
                    failed=1
                fi
            done
        fi
        # fio's lat log: "time_ms, latency_ns, ddir, bs, offset[, prio]",
        # time = the completion's wall clock in ms (log_unix_epoch), the
        # clock fire_event marks the event with (event-at.txt: the
        # command sent; pivot-at.txt: block-job-complete sent).  The
        # event's time is measured, not assumed to be 2.5 s after fio's
        # start: fio connects first, and the event fired some 100-200 ms
        # before 2.5 s of fio's time, inside the "before" window.
        # The 1 s window starts at the event; for a pivot, at its
        # block-job-complete (the commit's copy before it is not the pivot)
        if ! "$PY" - "$s" "$ev" "$(cat "$work/event-at.txt" 2>/dev/null)" \
                "$(cat "$work/pivot-at.txt" 2>/dev/null)" "$work"/lat_lat.*.log >> "$work/stall.txt" <<'PYEOF'
import sys
server, ev = sys.argv[1], sys.argv[2]
if not sys.argv[3]:
    sys.exit("the event's time was not recorded")
at = float(sys.argv[3])
win_at = float(sys.argv[4]) if ev == "pivot" and sys.argv[4] else at
samples = []
for path in sys.argv[5:]:
    for line in open(path):
        f = line.split(",")
        samples.append((int(f[0]), int(f[1]) / 1e6))
# the job's start: the first completion less its latency
start = min(t - lat for t, lat in samples)
before, after, window = [], [], [0.0]
for t, lat in samples:
    if start + 500 <= t < at:
        before.append(lat)
    elif t >= at:
        after.append(lat)
    if win_at <= t < win_at + 1000:
        window.append(lat)
if len(before) < 100 or not after:
    sys.exit(f"too few samples: {len(before)} before, {len(after)} after")
before.sort()
print(server, ev, f"{before[int(len(before) * 0.99)]:.3f}", f"{max(after):.3f}",
      len(before) + len(after), f"{max(window):.3f}", f"{before[-1]:.3f}")
PYEOF
        then
            echo "bench: cannot use fio's latency log for $s $ev" >&2
            failed=1
        fi
        tail -1 "$work/stall.txt"
        if [ -n "${BENCH_KEEP:-}" ]; then
            mkdir -p "$BENCH_KEEP"
            cat "$work"/lat_lat.*.log > "$BENCH_KEEP/$((round + 1))-$s-$ev.lat.log"
            cp "$work/$s.log" "$BENCH_KEEP/$((round + 1))-$s-$ev.server.log"
        fi
    done
  done
done

echo
echo "overlay on $base (${size_mib} MiB), 4k randwrite qd32, ${runtime}s per run, event at ${event_at}s," \
     "$(nproc) CPUs, $(uname -r)"
echo "median of $rounds round(s); latencies in ms"
"$PY" - "$work/stall.txt" <<'PYEOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    s, ev, p99, worst, n, win, wb = line.split()
    rows.setdefault((s, ev), []).append((float(p99), float(worst), float(win), float(wb)))
print(f"{'server':<11} {'event':<9} {'p99 before':>10} {'worst before':>12} {'worst after':>11} {'worst - p99':>11}"
      f" {'worst 1 s':>9} {'1 s - p99':>9}  rounds (p99/worst before/worst/worst 1 s)")
for (s, ev), v in rows.items():
    p = sorted(x[0] for x in v)[len(v) // 2]
    w = sorted(x[1] for x in v)[len(v) // 2]
    w1 = sorted(x[2] for x in v)[len(v) // 2]
    wb = sorted(x[3] for x in v)[len(v) // 2]
    each = " ".join(f"{a:.1f}/{d:.1f}/{b:.1f}/{c:.1f}" for a, b, c, d in v)
    print(f"{s:<11} {ev:<9} {p:>10.1f} {wb:>12.1f} {w:>11.1f} {w - p:>11.1f} {w1:>9.1f} {w1 - p:>9.1f}  {each}")
PYEOF
exit "$failed"
