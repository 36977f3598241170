#!/bin/bash
# strata benchmark: guest writes during a pull-mode backup, and the
# backup's read throughput, stratad against qemu-storage-daemon 7.2 doing
# the same backup in the same run.
#
# Each server serves its own copy of one qcow2 image (random data, 64 KiB
# clusters) as a writable export; the QEMU 7.2 backup sequence starts a
# backup (scratch qcow2, transaction of block-dirty-bitmap-add and
# blockdev-backup sync=none, snapshot-access view exported read-only);
# fio's nbd engine first runs BENCH_RUNTIME seconds of 4k random writes
# (iodepth 32, one connection) without a backup (the baseline of each
# server); then for BENCH_RUNTIME seconds the same writes run
# on the guest export while nbdcopy reads the
# whole view to null: again and again (every guest write to a cluster not
# copied yet pays the copy-before-write).  The table gives the guest's
# median IOPS, the median of per-round ratios stratad / qemu-storage-
# daemon (target >= 1.5), and the view's read throughput (MiB/s over the
# completed copies).  Servers alternate order every round.
#
# Environment: as bench-raw.sh (STRATAD, BENCH_DIR, BENCH_RUNTIME,
# BENCH_QUICK, BENCH_ROUNDS default 3, BENCH_SIZE_MIB default 512).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
default_size_mib=512
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
for tool in fio nbdcopy qemu-img qemu-storage-daemon timeout; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
[ -x "$STRATAD" ] || { echo "bench: $STRATAD not found (build first)" >&2; exit 1; }
bench_workdir

base=$BENCH_DIR/bench-backup-${size_mib}M.qcow2
if [ ! -f "$base" ]; then
    echo "creating $base ($size_mib MiB of random data, once)"
    timeout 600 dd if=/dev/urandom of="$base.raw" bs=1M count="$size_mib" \
        iflag=fullblock status=none
    qemu-img convert -f raw -O qcow2 "$base.raw" "$base.tmp"
    rm -f "$base.raw"
    mv "$base.tmp" "$base"
fi

echo "fio: fio --name=w --ioengine=nbd --uri=GUEST --rw=randwrite --bs=4k --iodepth=32" \
     "--direct=1 --time_based --runtime=$runtime --randrepeat=0 --output-format=json"
echo "reader: nbdcopy VIEW null: (repeated while fio runs)"
"$PY" - "$STRATAD" "$work" "$base" "$size_mib" "$runtime" "$rounds" <<'PYEOF'
import json, os, shutil, socket, subprocess, sys, time
stratad, work, base, size_mib, runtime, rounds = sys.argv[1:7]
size, runtime, rounds = int(size_mib) << 20, int(runtime), int(rounds)

class QMP:
    def __init__(self, path):
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")
    def cmd(self, cmdname, **args):
        self.f.write(json.dumps({"execute": cmdname, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                sys.exit(f"{cmdname}: {r['error']}")
            return r["return"]

def wait_sock(p, proc):
    for _ in range(400):
        if os.path.exists(p):
            return
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.returncode}")
        time.sleep(0.05)
    sys.exit(f"{p} did not appear")

def start(name, d):
    disk, ctl, nbd = f"{d}/disk.qcow2", f"{d}/ctl.sock", f"{d}/nbd.sock"
    if name == "stratad":
        cmd = [stratad, "--listen", f"unix:{nbd}", "--control", ctl,
               "--export", f"name=disk,file={disk},format=qcow2"]
    else:
        cmd = ["qemu-storage-daemon", "--nbd-server", f"addr.type=unix,addr.path={nbd}",
               "--chardev", f"socket,path={ctl},server=on,wait=off,id=mon",
               "--monitor", "chardev=mon",
               "--blockdev", f"driver=file,filename={disk},node-name=disk-file",
               "--blockdev", "driver=qcow2,file=disk-file,node-name=disk",
               "--export", "type=nbd,id=disk,node-name=disk,name=disk,writable=on"]
    print("server:", " ".join(cmd), flush=True)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"{d}/log", "w"))
    wait_sock(ctl, p)
    wait_sock(nbd, p)
    return p, QMP(ctl), nbd

results = []
for rd in range(rounds):
    order = ["stratad", "qemu-storage-daemon"]
    if rd % 2:
        order.reverse()
    got = {}
    for name in order:
        d = f"{work}/{name}-{rd}"
        os.makedirs(d)
        shutil.copyfile(base, f"{d}/disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{d}/scratch.qcow2",
                        str(size)], check=True)
        p, q, nbd = start(name, d)
        guest = f"nbd+unix:///disk?socket={nbd}"
        # the same writes without a backup: what the backup costs each server
        subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri={guest}",
                        "--rw=randwrite", "--bs=4k", "--iodepth=32", "--direct=1",
                        "--time_based", f"--runtime={runtime}", "--randrepeat=0",
                        "--output-format=json", f"--output={d}/fio0.json"],
                       stdout=subprocess.DEVNULL, check=True, timeout=runtime + 120)
        iops0 = json.load(open(f"{d}/fio0.json"))["jobs"][0]["write"]["iops"]
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "tmp"},
              file={"driver": "file", "filename": f"{d}/scratch.qcow2"})
        q.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}},
            {"type": "blockdev-backup", "data": {"job-id": "bk", "device": "disk",
             "target": "tmp", "sync": "none", "filter-node-name": "cbw"}}])
        q.cmd("blockdev-add", driver="snapshot-access", **{"node-name": "view"}, file="cbw")
        q.cmd("block-export-add", type="nbd", id="view", **{"node-name": "view"}, name="view")
        view = f"nbd+unix:///view?socket={nbd}"
        fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={guest}",
                                "--rw=randwrite", "--bs=4k", "--iodepth=32", "--direct=1",
                                "--time_based", f"--runtime={runtime}", "--randrepeat=0",
                                "--output-format=json", f"--output={d}/fio.json"],
                               stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        copies, t_last = 0, t0
        while fio.poll() is None:
            r = subprocess.run(["nbdcopy", view, "null:"], capture_output=True, timeout=600)
            if r.returncode != 0:
                sys.exit(f"nbdcopy: {r.stderr}")
            if fio.poll() is None or time.monotonic() - t0 <= runtime + 0.5:
                copies += 1
                t_last = time.monotonic()
        out = json.load(open(f"{d}/fio.json"))
        iops = out["jobs"][0]["write"]["iops"]
        mibs = copies * size / (1 << 20) / (t_last - t0) if copies else 0.0
        prog = [j for j in q.cmd("query-block-jobs") if j["device"] == "bk"]
        copied = prog[0]["offset"] if prog else 0
        q.cmd("block-export-del", id="view")
        p.terminate()
        p.wait(30)
        got[name] = (iops, mibs, copies, copied, iops0)
        print(f"round {rd + 1} {name}: guest 4k randwrite {iops0:.0f} IOPS without a "
              f"backup, {iops:.0f} IOPS during it; view read "
              f"{mibs:.0f} MiB/s ({copies} full reads), job offset {copied >> 20} MiB",
              flush=True)
        shutil.rmtree(d)
    results.append(got)

def med(v):
    v = sorted(v)
    return v[len(v) // 2]
print()
print(f"load average: {open('/proc/loadavg').read().split()[:3]}  nproc: {os.cpu_count()}")
print(f"{'server':<20} | {'IOPS, no backup':>15} | {'IOPS during backup':>18} | "
      f"{'during / no backup':>18} | {'view MiB/s':>10} | runs (no backup / during / MiB/s)")
for n in ("stratad", "qemu-storage-daemon"):
    print(f"{n:<20} | {med([r[n][4] for r in results]):>15.0f} | "
          f"{med([r[n][0] for r in results]):>18.0f} | "
          f"{med([r[n][0] / r[n][4] for r in results]):>18.2f} | "
          f"{med([r[n][1] for r in results]):>10.0f} | "
          + " ".join(f"{r[n][4]:.0f}/{r[n][0]:.0f}/{r[n][1]:.0f}" for r in results))
ratio = med([r["stratad"][0] / r["qemu-storage-daemon"][0] for r in results])
rratio = med([r["stratad"][1] / r["qemu-storage-daemon"][1] for r in results
              if r["qemu-storage-daemon"][1] > 0] or [0])
print(f"stratad / qemu-storage-daemon, median of per-round ratios: guest IOPS {ratio:.2f} "
      f"(target >= 1.5), view read {rratio:.2f}")
PYEOF
