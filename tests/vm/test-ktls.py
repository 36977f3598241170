#!/usr/bin/env python3
"""Kernel TLS test: stratad runs in a stock Debian kernel (QEMU TCG) that
has the tls module, with --tls=require and X.509 certificates, and host
clients read and write through it.

The guest loads the tls module and the AEADs it uses (vmlib.EXTRA_MODULES)
and starts three stratad instances, each on its own port that QEMU user
networking forwards from 127.0.0.1 on the host (hostfwd; restrict=on):

  ktls    --tls=require --tls-ktls=auto   exports disk (qcow2, writable)
                                          and bench (raw, read-only)
  gnutls  --tls=require --tls-ktls=off    the same, its own copy of disk
  plain   no TLS                          bench

Host, against ktls and gnutls alike:
  * qemu-img convert with --object tls-creds-x509 reads the whole export:
    the bytes equal the image's;
  * nbdinfo nbds://...?tls-certificates= sees the export and its size;
  * qemu-io writes patterns (TLS 1.3 with the default priority, TLS 1.2
    AES-128-GCM and TLS 1.3 CHACHA20-POLY1305 through tls-creds-x509's
    priority=, so each IV/salt layout the kernel takes is used), and a new
    connection reads them back; a final full read equals the image with
    the patterns applied (writes landed, nothing else changed).
Then the benchmark: nbdcopy of bench (1 MiB requests, 8 in flight, one
connection) to null:, rounds alternating plain / kTLS / GnuTLS; the MiB/s
and the ratios are printed (never asserted: TCG numbers are only
meaningful as ratios within one run).

The guest then stops the daemons (SIGTERM: exit 0 required) and prints
their -v logs on the serial console.  From them: every TLS 1.2 connection
of ktls ends on "TLS path kTLS tx+rx" and every TLS 1.3 one on "TLS path
kTLS tx" (its receive side stays with GnuTLS, which can follow a peer's
KeyUpdate); every one of gnutls says "TLS path GnuTLS (kernel TLS:
--tls-ktls=off)"; the cipher suites above were negotiated; no sanitizer
report.

Environment:
  STRATAD                 the daemon (meson sets it); it runs in the guest
                          with the host's shared libraries
  STRATA_VM_BOOT_TIMEOUT  seconds for the boot (default 600)
  STRATA_VM_KEEP=1        keep the work dir and print it
  STRATA_KTLS_BENCH_MIB   size of the bench export (default 32)
  STRATA_KTLS_BENCH_ROUNDS rounds of the benchmark (default 3)
  STRATA_KTLS_QEMU_CPU    the guest's -cpu (default max,-avx,-avx2: the
                          kernel's AES-GCM then runs its AES-NI/PCLMUL code
                          as GnuTLS (nettle) does, not its AVX2 code, which
                          TCG emulates far more slowly: the two paths pay
                          the emulator alike for their crypto)

Run alone: STRATAD=build/daemon/stratad /usr/bin/python3 tests/vm/test-ktls.py
"""
import os
import re
import shutil
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "integration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import tlscerts  # noqa: E402
import vmlib  # noqa: E402
import vmtest  # noqa: E402
from vmtest import sh, workdir  # noqa: E402

BOOT_TIMEOUT = int(os.environ.get("STRATA_VM_BOOT_TIMEOUT", "600"))
BENCH_MIB = int(os.environ.get("STRATA_KTLS_BENCH_MIB", "32"))
ROUNDS = int(os.environ.get("STRATA_KTLS_BENCH_ROUNDS", "3"))
QEMU_CPU = os.environ.get("STRATA_KTLS_QEMU_CPU", "max,-avx,-avx2")
MiB = 1 << 20
DISK_SIZE = 8 * MiB
MAILBOX_PORT = 7000
GUEST_PORTS = {"ktls": 10809, "gnutls": 10810, "plain": 10811}

# (what, tls-creds-x509 priority or None, expected "TLS established" text,
#  offset, length, pattern byte)
WRITES = [
    ("TLS 1.3, default priority", None, None, 1 * MiB, 192 << 10, 0x5a),
    ("TLS 1.2 AES-128-GCM",
     "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM",
     "TLS1.2 AES-128-GCM", 3 * MiB, 64 << 10, 0x3c),
    ("TLS 1.3 CHACHA20-POLY1305",
     "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305",
     "TLS1.3 CHACHA20-POLY1305", 5 * MiB + 4096, 100 << 10, 0xc3),
]

INIT = r"""#!/bin/sh
. /lib/strata-vm/common.sh
vm_setup
maddr=$(vm_arg strata.mailbox)
while read -r m; do
    case "$m" in
    aesni-intel.ko|ghash-clmulni-intel.ko)
        insmod "/lib/modules/strata/extra/$m" 2>/dev/null ||
            vm_log "optional module $m not loaded" ;;
    *)
        insmod "/lib/modules/strata/extra/$m" || vm_fail "insmod $m" ;;
    esac
done < /lib/modules/strata/extra/order
vm_log "aead drivers: $(grep -E '^driver .*(gcm|chacha)' /proc/crypto | tr -s ' ' | cut -d' ' -f3 | tr '\n' ' ')"
cp /data/disk.qcow2 /tmp/ktls.qcow2 && cp /data/disk.qcow2 /tmp/gnutls.qcow2 ||
    vm_fail "copy the images"
start() {
    name=$1
    port=$2
    shift 2
    /usr/sbin/stratad -v --listen 10.0.2.15:$port "$@" > /tmp/$name.log 2>&1 &
    echo $! > /tmp/$name.pid
}
bench=name=bench,file=/data/bench.raw,format=raw,readonly=on
start ktls %(ktls)d --tls=require --tls-certificates /certs --tls-ktls=auto \
    --export name=disk,file=/tmp/ktls.qcow2,format=qcow2 --export $bench
start gnutls %(gnutls)d --tls=require --tls-certificates /certs \
    --tls-ktls=off \
    --export name=disk,file=/tmp/gnutls.qcow2,format=qcow2 --export $bench
start plain %(plain)d --export $bench
for name in ktls:%(ktls)d gnutls:%(gnutls)d plain:%(plain)d; do
    port=${name#*:}
    name=${name%%:*}
    i=0
    # listening: local 10.0.2.15:port, state 0A in /proc/net/tcp
    until grep -qi ":$(printf %%04X $port) 00000000:0000 0A" /proc/net/tcp; do
        i=$((i + 1))
        [ $i -gt 300 ] && { cat /tmp/$name.log; vm_fail "stratad $name did not start"; }
        kill -0 "$(cat /tmp/$name.pid)" 2>/dev/null ||
            { cat /tmp/$name.log; vm_fail "stratad $name exited"; }
        sleep 0.2
    done
done
vm_log "ready"
vm_wait_mailbox $maddr %(mport)d done %(wait)d || vm_fail "the host never said done"
for name in ktls gnutls plain; do
    # utime and stime (clock ticks) of the daemon, its io_uring workers too
    vm_log "cpu $name $(cut -d' ' -f14,15 /proc/$(cat /tmp/$name.pid)/stat) $(getconf CLK_TCK 2>/dev/null || echo 100)"
done
for name in ktls gnutls plain; do
    kill -TERM "$(cat /tmp/$name.pid)"
done
for name in ktls gnutls plain; do
    pid=$(cat /tmp/$name.pid)
    i=0
    while kill -0 $pid 2>/dev/null; do
        i=$((i + 1))
        [ $i -gt 150 ] && break
        sleep 0.2
    done
    wait $pid
    vm_log "stratad $name exit $?"
    sed "s/^/$name-log: /" /tmp/$name.log
done
vm_log "logs printed"
vm_pass
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def creds(certs, prio=None):
    obj = (f"tls-creds-x509,id=tls0,dir={certs.path('alice')},"
           "endpoint=client")
    if prio:
        obj += f",priority={prio}"
    return obj


def nbd_opts(port, export="disk"):
    return (f"driver=nbd,host=127.0.0.1,port={port},export={export},"
            "tls-creds=tls0")


def guest_logs(serial, name):
    pre = f"{name}-log: "
    return "\n".join(line[len(pre):] for line in serial.splitlines()
                     if line.startswith(pre))


def check_data(certs, port, want, d, what):
    out = os.path.join(d, "read.raw")
    if os.path.exists(out):
        os.unlink(out)
    sh("qemu-img", "convert", "--object", creds(certs), "--image-opts",
       nbd_opts(port), "-O", "raw", out)
    with open(out, "rb") as f:
        got = f.read()
    H.check_hard(got == bytes(want), f"{what}: the bytes read differ from "
                 "the image's")


def bench_once(uri):
    t0 = time.monotonic()
    sh("nbdcopy", "--connections=1", "--requests=8", f"--request-size={MiB}",
       "--no-extents", uri, "null:")
    return time.monotonic() - t0


def main():
    vmtest.begin("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "certtool")
    image = vmtest.guest_image()
    H.check_hard("tls.ko" in image.manifest.get("extra_modules", []),
                 "the guest image has no tls module")
    d = workdir()
    certs = tlscerts.Certs()

    rnd = os.urandom(DISK_SIZE)
    raw = os.path.join(d, "disk.raw")
    with open(raw, "wb") as f:
        f.write(rnd)
    qcow = os.path.join(d, "disk.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    bench = os.urandom(BENCH_MIB * MiB)

    files = vmlib.host_binary_files(os.environ["STRATAD"], "/usr/sbin/stratad")
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        files["/certs/" + f] = open(os.path.join(certs.server, f), "rb").read()
    files["/data/disk.qcow2"] = open(qcow, "rb").read()
    files["/data/bench.raw"] = bench
    ports = {k: free_port() for k in GUEST_PORTS}
    mailbox = vmlib.Mailbox("wait")
    # the guest waits for the host's clients and benchmark (the meson
    # timeout bounds the whole test)
    init = INIT % dict(GUEST_PORTS, mport=MAILBOX_PORT, wait=1800)
    vm = vmlib.VM(image, d, "ktls", init, files=files,
                  guestfwd=[(MAILBOX_PORT, mailbox.port)],
                  hostfwd=[(ports[k], GUEST_PORTS[k]) for k in GUEST_PORTS],
                  cmdline=f"strata.mailbox={vmlib.guestfwd_addr(0)}",
                  # a later -cpu wins over vmlib's
                  qemu_args=["-cpu", QEMU_CPU] if QEMU_CPU else [],
                  memory=1024)
    vm.start()
    try:
        m = vm.wait_line(r"^strata-vm: ready$", BOOT_TIMEOUT)
        H.check_hard(m is not None, "the guest's daemons never got ready:\n"
                     + vm.tail())
        H.ok("guest: tls module loaded, three stratad instances listening")
        aead = vm.last_line(r"^strata-vm: aead drivers: (.*)$")
        if aead:
            print(f"guest AEAD drivers: {aead.group(1)}")

        for name in ("ktls", "gnutls"):
            port = ports[name]
            want = bytearray(rnd)
            check_data(certs, port, want, d, f"{name}: qemu-img convert")
            H.ok(f"{name}: qemu-img convert over TLS read the image's "
                 f"{DISK_SIZE >> 20} MiB exactly")
            r = sh("nbdinfo", f"nbds://127.0.0.1:{port}/disk"
                   f"?tls-certificates={certs.path('alice')}")
            out = r.stdout.decode(errors="replace")
            H.check_hard(re.search(rf"export-size:\s*{DISK_SIZE}\b", out),
                         f"{name}: nbdinfo nbds://: {out}")
            H.ok(f"{name}: nbdinfo nbds:// sees the export, {DISK_SIZE} bytes")
            for what, prio, _, off, length, pat in WRITES:
                sh("qemu-io", "--object", creds(certs, prio), "--image-opts",
                   nbd_opts(port), "-c", f"write -P {pat} {off} {length}",
                   "-c", f"read -P {pat} {off} {length}")
                sh("qemu-io", "--object", creds(certs, prio), "--image-opts",
                   nbd_opts(port), "-c", f"read -P {pat} {off} {length}",
                   "-c", f"read -P {rnd[off - 1]} {off - 1} 1")
                want[off:off + length] = bytes([pat]) * length
                H.ok(f"{name}: {what}: {length >> 10} KiB written at {off}, "
                     "read back on a new connection")
            check_data(certs, port, want, d, f"{name}: after the writes")
            H.ok(f"{name}: the whole export equals the image with the "
                 "writes applied")

        uris = {
            "plain": f"nbd://127.0.0.1:{ports['plain']}/bench",
            "ktls": f"nbds://127.0.0.1:{ports['ktls']}/bench"
                    f"?tls-certificates={certs.path('alice')}",
            "gnutls": f"nbds://127.0.0.1:{ports['gnutls']}/bench"
                      f"?tls-certificates={certs.path('alice')}",
        }
        times = {k: [] for k in uris}
        for _ in range(ROUNDS):
            for k in ("plain", "ktls", "gnutls"):
                times[k].append(bench_once(uris[k]))
        rate = {k: BENCH_MIB / min(v) for k, v in times.items()}
        load = os.getloadavg()
        print(f"bench: 1 MiB sequential reads, nbdcopy -R 8, one connection, "
              f"{BENCH_MIB} MiB x {ROUNDS} rounds (best), host load "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        for k in ("plain", "ktls", "gnutls"):
            print(f"bench:   {k:7s} {rate[k]:8.1f} MiB/s  "
                  f"({', '.join(f'{t:.2f}s' for t in times[k])})")
        print(f"bench: kTLS/GnuTLS {rate['ktls'] / rate['gnutls']:.2f}, "
              f"kTLS/plain {rate['ktls'] / rate['plain']:.2f}, "
              f"GnuTLS/plain {rate['gnutls'] / rate['plain']:.2f}")
    finally:
        mailbox.set("done")
    # VM.wait's timeout counts from the boot
    r = vm.wait(time.time() - vm.t0 + 180)
    serial = vm.serial_text()
    H.check_hard(r.passed, f"guest: {r.reason}\n{vm.tail()}")
    for name in GUEST_PORTS:
        H.check_hard(f"strata-vm: stratad {name} exit 0" in serial,
                     f"stratad {name} did not exit 0 on SIGTERM:\n"
                     + guest_logs(serial, name)[-3000:])
        H.check_hard(not re.search(r"Sanitizer|runtime error:",
                                   guest_logs(serial, name)),
                     f"sanitizer report in stratad {name}'s log:\n"
                     + guest_logs(serial, name)[-6000:])
    H.ok("the three daemons exited 0 on SIGTERM, no sanitizer report")
    cpu = {}
    for m in re.finditer(r"^strata-vm: cpu (\w+) (\d+) (\d+) (\d+)$", serial,
                         re.M):
        cpu[m.group(1)] = (int(m.group(2)) + int(m.group(3))) / int(m.group(4))
    if len(cpu) == 3:
        # ktls and gnutls served the same clients besides the benchmark
        print(f"bench: daemon CPU in the guest (user+system, whole run): "
              f"plain {cpu['plain']:.2f}s, ktls {cpu['ktls']:.2f}s, gnutls "
              f"{cpu['gnutls']:.2f}s; kTLS/GnuTLS "
              f"{cpu['ktls'] / max(cpu['gnutls'], 0.01):.2f}")

    # Each connection's lines: TLS 1.2 ends on kTLS tx+rx, TLS 1.3 on kTLS
    # tx (its receive side stays with GnuTLS: a peer's KeyUpdate).
    klog = guest_logs(serial, "ktls")
    conns = {}
    for line in klog.splitlines():
        m = re.search(r"conn (\d+): (.*)", line)
        if m:
            conns.setdefault(m.group(1), []).append(m.group(2))
    seen = {"TLS1.2": 0, "TLS1.3": 0}
    suites = set()
    for cid, lines in conns.items():
        est = [m for m in lines if m.startswith("TLS established (")]
        if not est:
            continue
        suite = est[0].split("(")[1].split(")")[0]
        suites.add(suite)
        paths = [m for m in lines if m.startswith("TLS path ")]
        want = ("TLS path kTLS tx+rx" if suite.startswith("TLS1.2")
                else "TLS path kTLS tx")
        H.check_hard(paths and paths[-1] == want,
                     f"ktls: conn {cid} ({suite}) took {paths}, not "
                     f"'{want}':\n" + "\n".join(lines))
        seen[suite.split()[0]] += 1
    H.check_hard(seen["TLS1.2"] > 0 and seen["TLS1.3"] > 0,
                 f"ktls: connections by version {seen}:\n{klog[-6000:]}")
    for _, _, suite, _, _, _ in WRITES:
        if suite:
            H.check_hard(suite in suites, f"ktls: no connection with {suite} "
                         f"(only {sorted(suites)})")
    H.ok(f"ktls: {seen['TLS1.2']} TLS 1.2 connection(s) on kTLS tx+rx, "
         f"{seen['TLS1.3']} TLS 1.3 on kTLS tx (suites: "
         f"{', '.join(sorted(suites))})")
    glog = guest_logs(serial, "gnutls")
    established = len(re.findall(r"TLS established", glog))
    gnutls = len(re.findall(r"TLS path GnuTLS \(kernel TLS: --tls-ktls=off\)",
                            glog))
    H.check_hard(established > 0 and gnutls == established and
                 "kTLS" not in glog,
                 f"gnutls: {established} TLS connection(s), {gnutls} said "
                 f"GnuTLS:\n{glog[-6000:]}")
    H.ok(f"gnutls: all {established} TLS connections stayed on GnuTLS "
         "(--tls-ktls=off)")
    if not vmtest.KEEP:
        shutil.rmtree(os.path.join(d, f"vm-{vm.name}"), ignore_errors=True)
    print("PASS: kernel TLS in a VM")


if __name__ == "__main__":
    main()
