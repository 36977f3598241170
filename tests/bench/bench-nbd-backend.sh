#!/bin/bash
# strata benchmark of the nbd: backend: the golden-image case.  A raw base
# (random data) is served read-only by nbdkit's file plugin on a unix
# socket, started once; an empty qcow2 top names it as its backing file
# (nbd+unix:///?socket=...).  Servers, one after another (a fresh empty top
# and a fresh server process per job):
#   stratad    format=qcow2, the base opened by the nbd backend (libnbd)
#   qemu-nbd   -f qcow2 --aio=io_uring, the base opened by QEMU's nbd
#              driver
# and, with the base served over TLS instead (a second nbdkit, --tls=require
# --tls-verify-peer, X.509 certificates made by certtool, on TCP loopback;
# the top names nbd://127.0.0.1:PORT):
#   stratad-tls   backing-remote=nbd:127.0.0.1:PORT;tls-certificates=DIR
#   qemu-nbd-tls  the same top with backing.tls-creds (tls-creds-x509,
#                 endpoint=client) through --image-opts
# driven by fio's nbd engine: 4k-randread qd32 (every read falls through
# to the NBD base), 4k-randwrite qd32 (copy-on-write from the base),
# 1M-seqread qd8, 1M-seqwrite qd8.  Prints IOPS, MiB/s, stratad's ratio to
# qemu-nbd (and stratad-tls's to qemu-nbd-tls), peak RSS; qemu-img check
# on every top stratad wrote.
#
# Environment: STRATAD, BENCH_DIR, BENCH_RUNTIME, BENCH_RAMP, BENCH_QUICK,
# BENCH_SERVERS (default "stratad qemu-nbd stratad-tls qemu-nbd-tls"; the
# -tls ones need certtool), BENCH_ROUNDS (default 1), BENCH_SIZE_MIB as
# for bench-raw.sh.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=1
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
servers=${BENCH_SERVERS:-stratad${STRATAD_REF:+ stratad-ref} qemu-nbd stratad-tls qemu-nbd-tls}

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

bench_warm=("$base")
bench_workdir
base_sock=$work/base.sock
base_pid=
tls_pid=
bench_cleanup_extra() {
    for p in $base_pid $tls_pid; do
        kill -TERM "$p" 2>/dev/null || true
    done
}
echo "base server: nbdkit -r -U $base_sock -f file $base"
nbdkit -r -U "$base_sock" -f file "$base" >"$work/base.log" 2>&1 &
base_pid=$!
wait_socket "$base_sock" "$base_pid" || { echo "bench: nbdkit did not start" >&2; exit 1; }
base_uri="nbd+unix:///?socket=$base_sock"

# The base over TLS: a CA, the server's certificate (CN=localhost, IP
# 127.0.0.1) and a client's, which nbdkit requires (--tls-verify-peer).
tls_port=
if [[ " $servers " == *-tls* ]]; then
    bench_certs "$work/tls-server" "$work/tls-client" || exit 1
    tls_port=$(free_port)
    echo "TLS base server: nbdkit -r -i 127.0.0.1 -p $tls_port --tls=require --tls-verify-peer -f file $base"
    nbdkit -r -i 127.0.0.1 -p "$tls_port" --tls=require --tls-verify-peer \
        --tls-certificates "$work/tls-server" -f file "$base" >"$work/tls-base.log" 2>&1 &
    tls_pid=$!
    wait_port "$tls_port" "$tls_pid" ||
        { echo "bench: the TLS nbdkit did not start" >&2; cat "$work/tls-base.log" >&2; exit 1; }
fi

workloads=(
    "4k-randread   randread  4k 32"
    "4k-randwrite  randwrite 4k 32"
    "1M-seqread    read      1M 8"
    "1M-seqwrite   write     1M 8"
)

new_top() {                     # server
    rm -f "$work/top.qcow2"
    case $1 in
    stratad-tls)  # qemu-img cannot open a TLS backing without credentials: -u
        qemu-img create -q -f qcow2 -u -b "nbd://127.0.0.1:$tls_port" -F raw \
            "$work/top.qcow2" "${size_mib}M" ;;
    qemu-nbd-tls) # its backing comes from --image-opts (QEMU refuses the
                  # server options beside a backing file name)
        qemu-img create -q -f qcow2 "$work/top.qcow2" "${size_mib}M" ;;
    *)  qemu-img create -q -f qcow2 -b "$base_uri" -F raw "$work/top.qcow2" ;;
    esac
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
    stratad-tls)
        [ -x "$STRATAD" ] || { echo "bench: $STRATAD not found (build first)" >&2; return 1; }
        cmd=("$STRATAD" --listen "unix:$sock" --pid-file "$work/$s.pid"
             --export "name=bench,file=$t,format=qcow2,cache=writeback,backing-remote=nbd:127.0.0.1:$tls_port;tls-certificates=$work/tls-client") ;;
    qemu-nbd)
        cmd=(qemu-nbd -f qcow2 --aio=io_uring --cache=writeback -t -e 4 -x bench -k "$sock" "$t") ;;
    qemu-nbd-tls)
        cmd=(qemu-nbd --aio=io_uring --cache=writeback -t -e 4 -x bench -k "$sock"
             --object "tls-creds-x509,id=tls0,dir=$work/tls-client,endpoint=client"
             --image-opts "driver=qcow2,file.driver=file,file.filename=$t,backing.driver=nbd,backing.server.type=inet,backing.server.host=127.0.0.1,backing.server.port=$tls_port,backing.tls-creds=tls0") ;;
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
    if [ "${s#qemu-nbd}" != "$s" ] && ! command -v qemu-nbd >/dev/null; then
        echo "note: qemu-nbd is not installed; skipping it"
        continue
    fi
    for w in "${workloads[@]}"; do
        read -r name rw bs depth <<<"$w"
        new_top "$s"
        sock=$work/$s.sock
        rm -f "$sock"
        if ! start_server "$s" "$sock"; then
            failed=1
            echo "$s $name FAIL FAIL" >> "$results"
            continue
        fi
        run_fio "$s" "$name" "$rw" "$bs" "$depth"
        stop_server "$s"
        # (a TLS top is checked without opening its backing)
        if [ "${s#stratad}" != "$s" ] && ! qemu-img check -q \
            "json:{\"driver\": \"qcow2\", \"backing\": null, \"file\": {\"driver\": \"file\", \"filename\": \"$work/top.qcow2\"}}"; then
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
if [[ " $servers " == *" stratad-tls "* && " $servers " == *" qemu-nbd-tls "* ]]; then
    echo
    echo "over TLS (the base on nbdkit --tls=require, TCP loopback), medians:"
    "$PY" - "$results" <<'PYEOF'
import sys
res = {}
for line in open(sys.argv[1]):
    s, name, iops, bw = line.split()[:4]  # then CPU per request, io-wq peak
    res.setdefault((s, name), []).append(None if iops == "FAIL" else float(iops))
names = []
for (s, name) in res:
    if name not in names:
        names.append(name)
def med(v):
    return None if not v or None in v else sorted(v)[len(v) // 2]
print(f"{'workload':<14} | {'stratad-tls IOPS':>16} | {'qemu-nbd-tls IOPS':>17} | {'stratad-tls/qemu-nbd-tls':>24} | {'stratad tls/plain':>17}")
for n in names:
    a, b = med(res.get(("stratad-tls", n))), med(res.get(("qemu-nbd-tls", n)))
    p = med(res.get(("stratad", n)))
    r = f"{a / b:.2f}" if a and b else "-"
    tp = f"{a / p:.2f}" if a and p else "-"
    print(f"{n:<14} | {a or 0:>16.0f} | {b or 0:>17.0f} | {r:>24} | {tp:>17}")
PYEOF
fi

if [ "$failed" != 0 ]; then
    echo "bench: FAILED (see messages above)" >&2
    exit 1
fi
