#!/bin/bash
# strata benchmark: NBD over TLS (X.509) on TCP loopback -- stratad vs
# qemu-nbd (--object tls-creds-x509 --tls-creds) vs nbdkit (--tls=require)
# on the same raw file, each also in plaintext on TCP for its own baseline.
# Driven by fio's nbd engine: fio gives libnbd an nbds:// URI and libnbd
# finds the client's certificates in its default directory
# ($HOME/.pki/libnbd, HOME pointed at the run's directory), so the same
# fio jobs as bench-raw.sh run over TLS.  See tests/bench/README.md.
#
# Environment: as bench-raw.sh (STRATAD, BENCH_DIR, BENCH_RUNTIME,
# BENCH_RAMP, BENCH_QUICK=1 smoke mode, BENCH_ROUNDS), and
#   BENCH_SERVERS  default "stratad-tls qemu-nbd-tls nbdkit-tls stratad
#                  qemu-nbd nbdkit" (the names without -tls are plaintext
#                  TCP), with STRATAD_REF also stratad-ref-tls
#                  stratad-gnutls-tls: $STRATAD with STRATA_TLS_RECORDS=gnutls
#                  (GnuTLS's record layer instead of stratad's own records)
#   STRATAD_REF    a second stratad build (say, main's), run over TLS as
#                  server "stratad-ref-tls" (and, if BENCH_SERVERS names
#                  it, "stratad-ref" in plaintext) with the same arguments,
#                  to judge a change against what it replaces in one run
# Exit status: 0 if every fio run succeeded, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
servers=${BENCH_SERVERS:-stratad-tls${STRATAD_REF:+ stratad-ref-tls} qemu-nbd-tls nbdkit-tls stratad qemu-nbd nbdkit}

for tool in fio timeout dd certtool; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done

img=$BENCH_DIR/bench-${size_mib}M.img
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" != $((size_mib << 20)) ]; then
    echo "creating $img ($size_mib MiB of random data, once)"
    timeout 600 dd if=/dev/urandom of="$img.tmp" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    mv "$img.tmp" "$img"
fi

bench_workdir

# The client's side: fio's job thread runs libnbd and GnuTLS, so its CPU
# time (user+system, from fio's JSON) is what decrypting the replies and
# sealing the requests costs the client.  Appended per job to
# $clientcpu as "server workload cpu_seconds bytes".
clientcpu=$work/client-cpu.txt
: > "$clientcpu"
bench_after_fio() {             # server name json (lib.sh's hook)
    "$PY" - "$3" "$1" "$2" >> "$clientcpu" 2>/dev/null <<'PYEOF' || true
import json, sys
path, server, name = sys.argv[1:4]
text = open(path).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
moved = job["read"]["io_bytes"] + job["write"]["io_bytes"]
secs = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
if moved:
    print(server, name, round(secs, 3), moved)
PYEOF
}

# Certificates: the server's in $work/server, the client's in
# $work/home/.pki/libnbd where libnbd looks.
bench_certs "$work/server" "$work/home/.pki/libnbd" || exit 1
export HOME=$work/home          # fio's libnbd reads ~/.pki/libnbd


start_server() {                # server sock(unused) -> sets server_pid, uri
    local s=$1 log=$work/$1.log port
    port=$(free_port)
    local scheme=nbd tls=0
    case $s in *-tls) scheme=nbds; tls=1 ;; esac
    case $s in
    stratad*)
        local bin
        bin=$(stratad_bin "${s%-tls}")
        [ -x "$bin" ] || { echo "bench: $bin not found (build first)" >&2; return 1; }
        cmd=("$bin" --listen "127.0.0.1:$port" --pid-file "$work/$s.pid"
             --export "name=bench,file=$img,format=raw,cache=writeback")
        [ $tls = 1 ] && cmd+=(--tls=require --tls-certificates "$work/server")
        uri="$scheme://127.0.0.1:$port/bench" ;;
    qemu-nbd*)
        cmd=(qemu-nbd -f raw --aio=io_uring --cache=writeback -t -e 4 -x bench
             -b 127.0.0.1 -p "$port")
        [ $tls = 1 ] && cmd+=(--object "tls-creds-x509,id=tls0,dir=$work/server,endpoint=server,verify-peer=off"
                              --tls-creds tls0)
        cmd+=("$img")
        uri="$scheme://127.0.0.1:$port/bench" ;;
    nbdkit*)
        cmd=(nbdkit -f -i 127.0.0.1 -p "$port")
        [ $tls = 1 ] && cmd+=(--tls=require --tls-certificates "$work/server")
        cmd+=(file "$img")
        uri="$scheme://127.0.0.1:$port/" ;;
    *)  echo "bench: unknown server $s" >&2; return 1 ;;
    esac
    command -v "${cmd[0]}" >/dev/null || { echo "note: ${cmd[0]} is not installed"; return 1; }
    echo "server: ${cmd[*]}"
    case $s in
    stratad-gnutls*) STRATA_TLS_RECORDS=gnutls "${cmd[@]}" >"$log" 2>&1 & ;;
    *) "${cmd[@]}" >"$log" 2>&1 & ;;
    esac
    server_pid=$!
    if ! wait_port "$port" "$server_pid"; then
        echo "bench: $s did not start:" >&2
        cat "$log" >&2
        return 1
    fi
}

# name rw bs iodepth
workloads=(
    "4k-randread   randread  4k 32"
    "4k-randwrite  randwrite 4k 32"
    "1M-seqread    read      1M 8"
    "1M-seqwrite   write     1M 8"
)

read -r -a server_list <<<"$servers"
run_rounds 10 "${server_list[@]}"

echo
echo "image: $img (${size_mib} MiB), runtime ${runtime}s per job (+${ramp}s ramp), $(nproc) CPUs, $(uname -r)"
echo "median of $rounds round(s), server order rotated each round; TCP loopback"
echo "load average before the summary: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$results" "$servers" "$cpu" "$runtime" "$clientcpu" <<'PYEOF'
import sys
results, servers, cpu_file = sys.argv[1], sys.argv[2].split(), sys.argv[3]
runtime = float(sys.argv[4])
client_file = sys.argv[5]
moved = {}                               # server -> bytes over all runs
for line in open(results):
    s, name, iops, bw = line.split()[:4]  # then CPU per request, io-wq peak
    if bw != "FAIL":
        moved[s] = moved.get(s, 0.0) + float(bw) * runtime
res, order = {}, []
for line in open(results):
    s, name, iops, bw = line.split()[:4]  # then CPU per request, io-wq peak
    if name not in order:
        order.append(name)
    res.setdefault((s, name), []).append(
        None if iops == "FAIL" else (float(iops), float(bw) / (1 << 20)))


def median(v):
    if not v or any(x is None for x in v):
        return None
    v = sorted(v)
    return v[len(v) // 2]


# the server's CPU time (all threads) per request over the measured part
# of each job, in microseconds: what a loaded machine disturbs least
cpureq = {}
for line in open(results):
    f = line.split()
    if len(f) >= 5 and f[4] not in ("-", "FAIL"):
        cpureq.setdefault((f[0], f[1]), []).append(float(f[4]))
res = {k: median(v) for k, v in res.items()}
cpureq = {k: median(v) for k, v in cpureq.items()}
servers = [s for s in servers if any(k[0] == s for k in res)]
hdr = f"{'workload':<14}" + "".join(f" | {s + ' IOPS':>17} {'MiB/s':>8}" for s in servers)
ratios = [("stratad-tls", "qemu-nbd-tls"), ("stratad-tls", "nbdkit-tls"),
          ("stratad-ref-tls", "qemu-nbd-tls"), ("stratad-tls", "stratad-ref-tls"),
          ("stratad-gnutls-tls", "qemu-nbd-tls"), ("stratad-tls", "stratad-gnutls-tls")]
ratios += [(s + "-tls", s) for s in ("stratad", "stratad-ref", "qemu-nbd", "nbdkit")]
ratios = [r for r in ratios if r[0] in servers and r[1] in servers]
hdr += "".join(f" | {a.replace('-tls', '+tls') + '/' + b:>24}" for a, b in ratios)
print(hdr)
print("-" * len(hdr))
for name in order:
    row = f"{name:<14}"
    for s in servers:
        v = res.get((s, name))
        row += f" | {'FAIL':>17} {'FAIL':>8}" if v is None else f" | {v[0]:>17.0f} {v[1]:>8.1f}"
    for a, b in ratios:
        x, y = res.get((a, name)), res.get((b, name))
        row += f" | {'-':>24}" if not x or not y or y[0] == 0 else f" | {x[0] / y[0]:>24.2f}"
    print(row)
print()
print("server CPU per request, microseconds (median; user+system, all threads):")
print(f"{'workload':<14}" + "".join(f" | {s:>15}" for s in servers))
for name in order:
    row = f"{name:<14}"
    for s in servers:
        c = cpureq.get((s, name))
        row += f" | {c:>15.2f}" if c is not None else f" | {'-':>15}"
    print(row)
# CPU time is steadier than rates on a loaded machine: what each server
# burnt over its four jobs
cpu = {}
for line in open(cpu_file):
    srv, ticks, hz = line.split()
    if ticks.replace(".", "").isdigit():
        cpu[srv] = cpu.get(srv, 0.0) + float(ticks) / float(hz)
print()
print("server CPU time, all jobs (user+system), and per GiB moved: " + ", ".join(
    f"{s} {cpu[s]:.1f} s ({cpu[s] / (moved[s] / (1 << 30)):.2f} s/GiB)"
    if moved.get(s) else f"{s} {cpu[s]:.1f} s" for s in servers if s in cpu))
# The client (fio: libnbd + GnuTLS) per GiB it moved, each workload over
# all rounds: with TLS the client decrypts every read on the same cores,
# and one fio job is one thread, so 1 / (client s/GiB) bounds its rate.
ccpu = {}
for line in open(client_file):
    srv, name, secs, nbytes = line.split()
    c = ccpu.setdefault((srv, name), [0.0, 0])
    c[0] += float(secs)
    c[1] += int(nbytes)
if ccpu:
    print()
    print("client (fio) CPU time per GiB moved (user+system of the job thread):")
    print(f"{'workload':<14}" + "".join(f" | {s:>12}" for s in servers))
    for name in order:
        row = f"{name:<14}"
        for s in servers:
            c = ccpu.get((s, name))
            row += f" | {c[0] / (c[1] / (1 << 30)):>12.2f}" if c and c[1] else f" | {'-':>12}"
        print(row)
PYEOF

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
