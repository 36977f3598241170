# strata benchmarks: what bench-raw.sh, bench-chain.sh and bench-rbd.sh
# share.  Sourced first (needs $here, $default_rounds and, optionally,
# $default_size_mib); the caller's start_server sets $server_pid and $uri
# and logs the server to $work/SERVER.log; an optional bench_cleanup_extra
# runs at exit, an optional bench_after_fio SERVER WORKLOAD JSON after each
# fio job.

# The settings both benchmarks take from the environment (see
# bench-raw.sh's header).  $default_rounds is the caller's.
echo "command: $(printf '%q ' "$0" "$@")"
echo "env: STRATAD=${STRATAD-} STRATAD_REF=${STRATAD_REF-} BENCH_DIR=${BENCH_DIR-} BENCH_RUNTIME=${BENCH_RUNTIME-}" \
     "BENCH_RAMP=${BENCH_RAMP-} BENCH_QUICK=${BENCH_QUICK-} BENCH_SERVERS=${BENCH_SERVERS-}" \
     "BENCH_SIZE_MIB=${BENCH_SIZE_MIB-}"
top=$(cd "$here/../.." && pwd)
STRATAD=${STRATAD:-$top/build/daemon/stratad}
# STRATAD_REF: a second stratad build (say, the previous commit's) run as
# the server "stratad-ref" with the same arguments, so a change is measured
# against what it replaces in the same run (added to the default servers).
STRATAD_REF=${STRATAD_REF:-}
# stratad_bin SERVER: the binary of stratad or stratad-ref
stratad_bin() {
    if [ "$1" = stratad-ref ]; then echo "$STRATAD_REF"; else echo "$STRATAD"; fi
}
BENCH_DIR=${BENCH_DIR:-/var/tmp/strata-bench}
# Files read into the page cache before each job (the caller's images):
# a host that reclaims idle pages (this project's VM pages out what nobody
# read for a minute) would otherwise make whichever server runs first
# after a pause read from the disk.  BENCH_COLD_BASE=1 leaves them as
# they are.
bench_warm=()
bench_warm_cache() {
    [ "${BENCH_COLD_BASE:-0}" = 1 ] && return 0
    local f
    for f in "${bench_warm[@]}"; do
        [ -f "$f" ] && cat "$f" > /dev/null
    done
    return 0
}
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
if [ "${BENCH_QUICK:-0}" = 1 ]; then
    size_mib=${BENCH_SIZE_MIB:-64}
    runtime=${BENCH_RUNTIME:-2}
    ramp=${BENCH_RAMP:-0}
    rounds=${BENCH_ROUNDS:-1}
else
    size_mib=${BENCH_SIZE_MIB:-${default_size_mib:-1024}}
    runtime=${BENCH_RUNTIME:-10}
    ramp=${BENCH_RAMP:-1}
    rounds=${BENCH_ROUNDS:-$default_rounds}
fi
mkdir -p "$BENCH_DIR"

# Makes the run's work directory (removed at exit, with the server).
bench_workdir() {
    work=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
    server_pid=
    cleanup() {
        if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
            kill -TERM "$server_pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$server_pid" 2>/dev/null || true
        fi
        if declare -F bench_cleanup_extra >/dev/null; then
            bench_cleanup_extra || true
        fi
        rm -rf "$work"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    results=$work/results.txt       # server workload iops bw_bytes
    : > "$results"
    rss=$work/rss.txt               # server kB
    : > "$rss"
    cpu=$work/cpu.txt               # server ticks ticks_per_second
    : > "$cpu"
    failed=0
}

# Waits until 127.0.0.1:PORT accepts (1: PID exited or 10 s passed);
# free_port prints a TCP port of 127.0.0.1 nothing listens on.
wait_port() {                   # port pid
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A CA, a server certificate (CN=localhost, IP 127.0.0.1) and a client's,
# made with certtool (ECDSA keys) under $work/pki; then SERVER_DIR gets
# ca-cert.pem server-cert.pem server-key.pem (what stratad, qemu-nbd and
# nbdkit read) and CLIENT_DIR ca-cert.pem client-cert.pem client-key.pem
# (what libnbd and QEMU's tls-creds-x509 endpoint=client read).
bench_certs() {                 # server_dir client_dir
    local d=$work/pki who
    command -v certtool >/dev/null || { echo "bench: certtool (gnutls-bin) is not installed" >&2; return 1; }
    mkdir -p "$d" "$1" "$2"
    printf 'cn = bench CA\nca\ncert_signing_key\nexpiration_days = 2\n' > "$d/ca.info"
    printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' > "$d/server.info"
    printf 'cn = bench client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n' > "$d/client.info"
    certtool --generate-privkey --key-type ecdsa --outfile "$d/ca-key.pem" 2>/dev/null
    certtool --generate-self-signed --load-privkey "$d/ca-key.pem" \
        --template "$d/ca.info" --outfile "$d/ca-cert.pem" 2>/dev/null
    for who in server client; do
        certtool --generate-privkey --key-type ecdsa --outfile "$d/$who-key.pem" 2>/dev/null
        certtool --generate-certificate --load-ca-certificate "$d/ca-cert.pem" \
            --load-ca-privkey "$d/ca-key.pem" --load-privkey "$d/$who-key.pem" \
            --template "$d/$who.info" --outfile "$d/$who-cert.pem" 2>/dev/null
    done
    cp "$d/ca-cert.pem" "$d/server-cert.pem" "$d/server-key.pem" "$1/"
    cp "$d/ca-cert.pem" "$d/client-cert.pem" "$d/client-key.pem" "$2/"
}

wait_socket() {                 # sock pid [seconds, default 10]
    for _ in $(seq 1 $((${3:-10} * 20))); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

stop_server() {                 # server [seconds to stop, default 10]
    local s=$1 wait_s=${2:-10} status=0
    # peak resident set size and CPU time (user + system, all threads) over
    # the server's life
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$server_pid/status" 2>/dev/null || echo "?")
    echo "$s ${hwm:-?}" >> "$rss"
    ticks=$(awk '{print $14 + $15}' "/proc/$server_pid/stat" 2>/dev/null || echo "?")
    echo "$s $ticks $(getconf CLK_TCK)" >> "$cpu"
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 $((wait_s * 10))); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "bench: $s did not stop within $wait_s s of SIGTERM; killing it" >&2
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

# Runs one fio job against $uri and appends "server workload iops bw" to
# $results (FAIL on failure).
# Runs every workload on every server, $rounds times, each round starting
# with a different server (whichever runs right after another's write jobs,
# or right after a fill, meets a busy host or cluster).  qemu-nbd and
# nbdkit are skipped with a note when not installed.
# Args: stop-timeout-seconds server...
run_rounds() {
    local stop_s=$1 round k s sock w name rw bs depth jobs
    shift
    local list=("$@")
    for ((round = 0; round < rounds; round++)); do
        echo "round $((round + 1)) of $rounds"
        for ((k = 0; k < ${#list[@]}; k++)); do
            s=${list[$(((k + round) % ${#list[@]}))]}
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
                read -r name rw bs depth jobs <<<"$w"
                run_fio "$s" "$name" "$rw" "$bs" "$depth" "${jobs:-1}"
            done
            stop_server "$s" "$stop_s"
        done
    done
}

# CPU time (user + system) the server process has used so far, in clock
# ticks: every thread, io_uring's workers (iou-wrk-*) included, and the
# threads that have exited already.
server_ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo "?"
}

# io_uring worker threads (iou-wrk-*) the server has right now.
server_iowq() {
    { grep -l '^iou-wrk' /proc/"$1"/task/*/comm 2>/dev/null || true; } | wc -l
}

# Runs one fio job against $uri (jobs > 1: that many fio jobs, each with a
# connection of its own, reported as one group) and appends "server
# workload iops bw cpu_us_per_request io-wq_peak" to $results (FAIL on
# failure).  The server's CPU is sampled after the ramp and when fio ends:
# CPU per request is that CPU time over the requests fio counted (which
# exclude the ramp).  io-wq_peak: the most io_uring worker threads seen in
# samples every half second.
run_fio() {                     # server name rw bs depth [jobs]
    local s=$1 name=$2 rw=$3 bs=$4 depth=$5 jobs=${6:-1}
    local json=$work/$s-$name.json
    fcmd=(fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs"
          --iodepth="$depth" --numjobs="$jobs" --group_reporting
          --runtime="$runtime" --ramp_time="$ramp"
          --time_based --output-format=json --output="$json")
    echo "fio: ${fcmd[*]}"
    # Earlier write jobs leave GiBs of dirty page cache; without this
    # their writeback lands on whichever job runs next.
    sync
    bench_warm_cache
    timeout $((runtime + ramp + 60)) "${fcmd[@]}" >"$work/$s-$name.out" 2>&1 &
    local fio_pid=$! t0 t1 iowq=0 n fio_status=0
    # the ramp (whole half seconds), then the measured part
    for _ in $(seq 1 $((ramp * 2))); do
        kill -0 "$fio_pid" 2>/dev/null || break
        sleep 0.5
    done
    t0=$(server_ticks "$server_pid")
    while kill -0 "$fio_pid" 2>/dev/null; do
        n=$(server_iowq "$server_pid")
        [ "$n" -gt "$iowq" ] && iowq=$n
        sleep 0.5
    done
    t1=$(server_ticks "$server_pid")
    wait "$fio_pid" || fio_status=$?
    if [ "$fio_status" != 0 ]; then
        echo "bench: fio failed for $s $name:" >&2
        cat "$work/$s-$name.out" >&2
        if [ -f "$work/$s.log" ]; then
            echo "bench: $s's log (tail):" >&2
            tail -30 "$work/$s.log" >&2
        fi
        failed=1
        echo "$s $name FAIL FAIL - -" >> "$results"
        return 0
    fi
    if ! "$PY" - "$json" "$s" "$name" "$rw" "$t0" "$t1" "$(getconf CLK_TCK)" "$iowq" \
            >> "$results" <<'PYEOF'
import json, sys
path, server, name, rw, t0, t1, hz, iowq = sys.argv[1:9]
text = open(path).read()
j = json.loads(text[text.index("{"):])
job = j["jobs"][0]
if job.get("error", 0) != 0:
    sys.exit(f"fio job error {job['error']}")
d = job["write" if "write" in rw else "read"]
if d["io_bytes"] == 0:
    sys.exit("fio moved no data")
reqs = job["read"]["total_ios"] + job["write"]["total_ios"]
try:
    us = (float(t1) - float(t0)) / float(hz) * 1e6 / reqs
    cpu = f"{us:.2f}"
except (ValueError, ZeroDivisionError):
    cpu = "-"
print(server, name, round(d["iops"], 1), d["bw_bytes"], cpu, iowq)
PYEOF
    then
        echo "bench: cannot use fio's output for $s $name" >&2
        failed=1
        echo "$s $name FAIL FAIL - -" >> "$results"
    fi
    # an optional hook of the caller's, given each successful job's JSON
    if declare -F bench_after_fio >/dev/null; then
        bench_after_fio "$s" "$name" "$json"
    fi
}

# Prints the table: medians per server and workload (IOPS, MiB/s, server
# CPU per request), the IOPS ratios of stratad to each server named in
# $ratio_to, the ratios of their CPU per request, the io_uring workers seen,
# the load average, and the peak RSS and CPU time of each server process.
summary() {
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$results" "$rss" "$servers" "$ratio_to" "$cpu" <<'PYEOF'
import sys
results, rss, servers = sys.argv[1], sys.argv[2], sys.argv[3].split()
ratio_to = sys.argv[4].split()
cpu_file = sys.argv[5]
res = {}
cpus = {}
iowq = {}
order = []
for line in open(results):
    f = line.split()
    s, name, iops, bw = f[:4]
    if name not in order:
        order.append(name)
    res.setdefault((s, name), []).append(
        None if iops == "FAIL" else (float(iops), float(bw) / (1 << 20)))
    if len(f) >= 5 and f[4] not in ("-", "FAIL"):
        cpus.setdefault((s, name), []).append(float(f[4]))
    if len(f) >= 6 and f[5].isdigit():
        iowq[(s, name)] = max(iowq.get((s, name), 0), int(f[5]))


def median(vals):
    if not vals or any(v is None for v in vals):
        return None                    # a failed run fails the cell
    vals = sorted(vals)
    return vals[len(vals) // 2]


res = {k: median(v) for k, v in res.items()}
cpus = {k: median(v) for k, v in cpus.items()}
servers = [s for s in servers if any(k[0] == s for k in res)]
ratios = [o for o in ratio_to if o in servers and "stratad" in servers]

print("IOPS and MiB/s (medians), server CPU per request in microseconds "
      "(median; user+system, all threads), wq: most io_uring workers seen")
hdr = f"{'workload':<16}"
for s in servers:
    hdr += f" | {s + ' IOPS':>14} {'MiB/s':>8} {'CPU us':>7} {'wq':>3}"
print(hdr)
print("-" * len(hdr))
for name in order:
    row = f"{name:<16}"
    for s in servers:
        v = res.get((s, name))
        c = cpus.get((s, name))
        cs = f"{c:>7.2f}" if c is not None else f"{'-':>7}"
        q = iowq.get((s, name))
        cs += f" {q:>3}" if q is not None else f" {'-':>3}"
        row += (f" | {'FAIL':>14} {'FAIL':>8} {cs}" if v is None
                else f" | {v[0]:>14.0f} {v[1]:>8.1f} {cs}")
    print(row)
if ratios:
    print()
    print("ratios: stratad's IOPS / the other's (above 1: stratad faster), and "
          "stratad's CPU per request / the other's (below 1: stratad cheaper)")
    hdr = f"{'workload':<16}"
    for o in ratios:
        hdr += f" | {'IOPS vs ' + o:>22} {'CPU vs ' + o:>22}"
    print(hdr)
    print("-" * len(hdr))
    for name in order:
        row = f"{name:<16}"
        for o in ratios:
            a, b = res.get(("stratad", name)), res.get((o, name))
            row += (f" | {'-':>22}" if not a or not b or b[0] == 0
                    else f" | {a[0] / b[0]:>22.2f}")
            ca, cb = cpus.get(("stratad", name)), cpus.get((o, name))
            row += (f" {'-':>22}" if ca is None or not cb
                    else f" {ca / cb:>22.2f}")
        print(row)
peak = {}
for line in open(rss):
    srv, hwm = line.split()
    if hwm.isdigit() and (not peak.get(srv, "?").isdigit() or int(hwm) > int(peak[srv])):
        peak[srv] = hwm
    peak.setdefault(srv, hwm)
cpu = {}
for line in open(cpu_file):
    srv, ticks, hz = line.split()
    if ticks.replace(".", "").isdigit():
        cpu[srv] = cpu.get(srv, 0.0) + float(ticks) / float(hz)
processes = [s for s in servers if s in peak]
print()
print("peak RSS (VmHWM): " + ", ".join(
    f"{s} {int(peak[s]) / 1024:.1f} MiB" if peak[s].isdigit() else f"{s} ?"
    for s in processes))
print("server CPU time, all jobs (user+system): " + ", ".join(
    f"{s} {cpu[s]:.1f} s" for s in processes if s in cpu))
PYEOF
}
