#!/bin/bash
# strata benchmark: how fast block-commit copies, stratad against
# qemu-storage-daemon 7.2 committing the same chain in the same run.
#
# The chain (made once with qemu-img and qemu-io, copied for every run):
#   base.qcow2  BENCH_SIZE_MIB (default 1024) virtual, its first quarter
#               random data
#   mid.qcow2   BENCH_MID_MIB (default 128) of qemu-io writes: 64k-1M
#               extents at random places, a few 4k ones and zero writes
#   top.qcow2   BENCH_TOP_MIB (default 384), the same kind of writes
# Each server opens top (its chain below it) and exports it over NBD on a
# unix socket; its QMP control socket then runs one case:
#   inter    block-commit of mid into base (stratad: top = mid's file,
#            base = base's file; qsd: top-node mid, base-node base); the
#            time to BLOCK_JOB_COMPLETED
#   active   block-commit of top into mid (stratad: base = mid's file;
#            qsd: base-node mid); the time to BLOCK_JOB_READY, then
#            block-job-complete at once, and the time to
#            BLOCK_JOB_COMPLETED (the whole job, pivot included)
# with one of two loads:
#   none     nothing else
#   light    fio's nbd engine on the export meanwhile: 4k random writes,
#            iodepth 4, at most 1000 IOPS, BENCH_LOAD_IOS (default 5000)
#            of them, fixed offsets and data (a fixed seed and pattern), so
#            both servers end with the same guest-visible bytes; started
#            1.5 s before block-commit
#   heavy    the same with iodepth 32 and no rate limit, BENCH_HEAVY_IOS
#            (default 100000) writes (a guest rewriting its disk while the
#            commit copies: what the copy must converge against)
# Timed from sending block-commit, on the monotonic clock of the QMP
# client.  Every run gets a fresh copy of the chain and a fresh process;
# the servers' order rotates every round.  After each run: qemu-img check
# of every image of the result, and qemu-img compare of the result's top
# with qsd's (with load none also with the chain before the commit):
# identical guest-visible bytes, or the benchmark fails.
#
# Servers:
#   stratad    --export name=bench,file=TOP,format=qcow2,cache=writeback,
#              backing-root=RUNDIR --control CTL
#   qsd        qemu-storage-daemon, qcow2 over file (aio=io_uring,
#              cache.direct=off) for each layer, QMP monitor on CTL, NBD
#              export of top
#
# Environment: STRATAD, STRATAD_REF (a second build, run as server
# "stratad-ref"), BENCH_DIR, BENCH_ROUNDS (default 3; 1 with BENCH_QUICK),
# BENCH_QUICK=1 (64 MiB disk, 24 MiB top, 8 MiB mid, one round, load
# none: a smoke test of a few seconds), BENCH_SIZE_MIB, BENCH_TOP_MIB,
# BENCH_MID_MIB, BENCH_SERVERS (default "stratad qsd", plus stratad-ref
# with STRATAD_REF), BENCH_CASES (default "inter active"), BENCH_LOADS
# (default "none light heavy"), BENCH_LOAD_IOS, BENCH_HEAVY_IOS, BENCH_KEEP=DIR (keeps each
# run's server log there, named ROUND-SERVER-CASE-LOAD.log).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
default_rounds=3
default_size_mib=1024
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"
if [ "${BENCH_QUICK:-0}" = 1 ]; then
    top_mib=${BENCH_TOP_MIB:-24}
    mid_mib=${BENCH_MID_MIB:-8}
    loads=${BENCH_LOADS:-none}
else
    top_mib=${BENCH_TOP_MIB:-384}
    mid_mib=${BENCH_MID_MIB:-128}
    loads=${BENCH_LOADS:-none light heavy}
fi
servers=${BENCH_SERVERS:-stratad${STRATAD_REF:+ stratad-ref} qsd}
cases=${BENCH_CASES:-inter active}
load_ios=${BENCH_LOAD_IOS:-5000}
heavy_ios=${BENCH_HEAVY_IOS:-100000}
echo "env: BENCH_TOP_MIB=${BENCH_TOP_MIB-} BENCH_MID_MIB=${BENCH_MID_MIB-} BENCH_CASES=${BENCH_CASES-}" \
     "BENCH_LOADS=${BENCH_LOADS-} BENCH_LOAD_IOS=${BENCH_LOAD_IOS-} BENCH_HEAVY_IOS=${BENCH_HEAVY_IOS-} BENCH_KEEP=${BENCH_KEEP-}"

for tool in qemu-img qemu-io qemu-storage-daemon fio timeout; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done
for s in $servers; do
    case $s in
    stratad|stratad-ref)
        bin=$(stratad_bin "$s")
        [ -x "$bin" ] || { echo "bench: $bin not found (build first)" >&2; exit 1; } ;;
    qsd) ;;
    *)  echo "bench: unknown server $s" >&2; exit 1 ;;
    esac
done
bench_workdir

# The starting chain, made once per size (a directory: the backing names
# are relative, so a copy of it is a chain of its own).
tpl=$BENCH_DIR/commit-chain-${size_mib}M-${mid_mib}M-${top_mib}M
if [ ! -f "$tpl/done" ]; then
    echo "creating the chain in $tpl (once)"
    rm -rf "$tpl"
    mkdir -p "$tpl"
    quarter=$((size_mib / 4))
    timeout 600 dd if=/dev/urandom of="$tpl/base.raw" bs=1M count="$quarter" \
        iflag=fullblock status=none
    truncate -s "${size_mib}M" "$tpl/base.raw"
    qemu-img convert -q -f raw -O qcow2 "$tpl/base.raw" "$tpl/base.qcow2"
    rm -f "$tpl/base.raw"
    (cd "$tpl" &&
     qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 &&
     qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2)
    # qemu-io commands: extents of 64k-1M (some unaligned to clusters: a
    # partial cluster copies the rest from below), some 4k ones, a few
    # zero writes, until the layer holds about MIB MiB
    cat > "$work/gen.py" <<'PYEOF'
import random, sys
size, want, seed = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20, int(sys.argv[3])
rnd = random.Random(seed)
done = 0
while done < want:
    k = rnd.random()
    if k < 0.1:
        n = 4096
    else:
        n = rnd.choice((64, 128, 256, 512, 1024)) << 10
    off = rnd.randrange(0, (size - n) // 4096) * 4096
    if k > 0.97:
        print(f"write -z {off} {n}")
    else:
        print(f"write -P {rnd.randrange(1, 256)} {off} {n}")
    done += n
PYEOF
    "$PY" "$work/gen.py" "$size_mib" "$mid_mib" 1 > "$work/mid.cmds"
    "$PY" "$work/gen.py" "$size_mib" "$top_mib" 2 > "$work/top.cmds"
    timeout 600 qemu-io -f qcow2 "$tpl/mid.qcow2" < "$work/mid.cmds" > /dev/null
    timeout 600 qemu-io -f qcow2 "$tpl/top.qcow2" < "$work/top.cmds" > /dev/null
    for f in base mid top; do
        qemu-img check -q "$tpl/$f.qcow2"
    done
    touch "$tpl/done"
fi
for f in base mid top; do
    echo "$f.qcow2: $(qemu-img info --output=json "$tpl/$f.qcow2" |
        "$PY" -c 'import json,sys; j=json.load(sys.stdin); print(j["virtual-size"] >> 20, "MiB virtual,", j["actual-size"] >> 20, "MiB on disk")')"
done

export STRATAD STRATAD_REF
timeout $((rounds * 3600)) "$PY" - "$work" "$tpl" "$rounds" "$servers" "$cases" "$loads" \
    "$load_ios" "$heavy_ios" "${BENCH_KEEP:-}" <<'PYEOF'
import json, os, shutil, signal, socket, subprocess, sys, time
work, tpl, rounds, servers, cases, loads, load_ios, heavy_ios, keep = sys.argv[1:10]
rounds, load_ios, heavy_ios = int(rounds), int(load_ios), int(heavy_ios)
servers, cases, loads = servers.split(), cases.split(), loads.split()
failed = False

class QMP:
    def __init__(self, path, proc):
        for _ in range(400):
            if os.path.exists(path):
                break
            if proc.poll() is not None:
                sys.exit(f"server exited: {proc.returncode}")
            time.sleep(0.05)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(600)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                self.events.append((time.monotonic(), r))
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            return r["return"]

    def wait_event(self, names):
        while True:
            while self.events:
                t, e = self.events.pop(0)
                if e["event"] in names:
                    return t, e
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"the monitor closed while waiting for {names}")
            self.events.append((time.monotonic(), json.loads(line)))

def start(name, d):
    top, ctl, nbd, log = f"{d}/top.qcow2", f"{d}/ctl.sock", f"{d}/nbd.sock", f"{d}/server.log"
    if name.startswith("stratad"):
        binary = os.environ["STRATAD_REF"] if name == "stratad-ref" else os.environ["STRATAD"]
        cmd = [binary, "--listen", f"unix:{nbd}", "--control", ctl, "--verbose",
               "--export", f"name=bench,file={top},format=qcow2,cache=writeback,backing-root={d}"]
    else:
        def layer(node, f, below=None):
            j = {"driver": "qcow2", "node-name": node,
                 "file": {"driver": "file", "aio": "io_uring", "filename": f"{d}/{f}"}}
            j["backing"] = below
            return j
        chain = layer("top", "top.qcow2", layer("mid", "mid.qcow2", layer("base", "base.qcow2")))
        cmd = ["qemu-storage-daemon", "--blockdev", json.dumps(chain),
               "--chardev", f"socket,id=mon,path={ctl},server=on,wait=off",
               "--monitor", "chardev=mon",
               "--nbd-server", f"addr.type=unix,addr.path={nbd},max-connections=4",
               "--export", "type=nbd,id=e0,node-name=top,name=bench,writable=on"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    q = QMP(ctl, p)
    for _ in range(400):
        if os.path.exists(nbd):
            break
        time.sleep(0.05)
    return p, q, cmd, f"nbd+unix:///bench?socket={nbd}"

def stop(p, name):
    global failed
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        print(f"bench: {name} did not stop within 60 s of SIGTERM; killing it", flush=True)
        p.kill()
        p.wait()
        failed = True
    if p.returncode != 0 and name.startswith("stratad"):
        print(f"bench: {name} exited with status {p.returncode}", flush=True)
        failed = True

def one_run(name, case, load, d):
    """Returns (ready s or None, done s, load p99 ms or None, load IOPS or None)."""
    p, q, cmd, uri = start(name, d)
    fio = None
    try:
        if load != "none":
            shape = (["--iodepth=4", "--rate_iops=1000", f"--number_ios={load_ios}"]
                     if load == "light" else ["--iodepth=32", f"--number_ios={heavy_ios}"])
            fio = subprocess.Popen(
                ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                 "--bs=4k"] + shape +
                ["--randrepeat=1", "--randseed=7", "--buffer_pattern=0x5a17c3e1",
                 "--size=100%", "--output-format=json", f"--output={d}/fio.json"],
                stdout=subprocess.DEVNULL, stderr=open(f"{d}/fio.err", "w"))
            # the writes are under way when the commit starts (fio takes a
            # while to start on a loaded host)
            time.sleep(1.5)
        stratad = name.startswith("stratad")
        if case == "inter":
            args = ({"device": "bench", "top": f"{d}/mid.qcow2", "base": f"{d}/base.qcow2"}
                    if stratad else {"device": "top", "top-node": "mid", "base-node": "base"})
        else:
            args = ({"device": "bench", "base": f"{d}/mid.qcow2"} if stratad
                    else {"device": "top", "base-node": "mid"})
        t0 = time.monotonic()
        q.cmd("block-commit", **{"job-id": "c"}, **args)
        ready = None
        if case == "active":
            tr, _ = q.wait_event(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                                  "BLOCK_JOB_CANCELLED"))
            ready = tr - t0
            q.cmd("block-job-complete", device="c")
        td, e = q.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"))
        if e["event"] != "BLOCK_JOB_COMPLETED" or "error" in e.get("data", {}):
            raise RuntimeError(f"the commit failed: {e}")
        p99 = iops = None
        if fio:
            if fio.wait(600) != 0:
                raise RuntimeError(f"fio failed: {open(d + '/fio.err').read()}")
            j = json.load(open(f"{d}/fio.json"))["jobs"][0]["write"]
            p99 = j["clat_ns"]["percentile"]["99.000000"] / 1e6
            iops = j["iops"]
        return ready, td - t0, p99, iops, cmd
    finally:
        if fio and fio.poll() is None:
            fio.kill()
            fio.wait()
        q.s.close()
        stop(p, name)
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copyfile(f"{d}/server.log", f"{keep}/{rd + 1}-{name}-{case}-{load}.log")

def check(d, files):
    global failed
    for f in files:
        r = subprocess.run(["qemu-img", "check", "-q", f"{d}/{f}"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"bench: qemu-img check {d}/{f}: {r.stdout}{r.stderr}", flush=True)
            failed = True

def compare(a, b, what):
    global failed
    r = subprocess.run(["qemu-img", "compare", "-q", a, b], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"bench: {what}: qemu-img compare {a} {b} found a difference "
              f"({r.returncode}): {r.stdout}{r.stderr}", flush=True)
        failed = True

results = []                       # (round, server, case, load, ready, done, p99, iops)
shown = set()
for rd in range(rounds):
    print(f"round {rd + 1} of {rounds}", flush=True)
    for case in cases:
        for load in loads:
            order = servers[rd % len(servers):] + servers[:rd % len(servers)]
            dirs = {}
            for name in order:
                d = f"{work}/{rd}-{name}-{case}-{load}"
                shutil.copytree(tpl, d)
                os.unlink(f"{d}/done")
                subprocess.run(["sync"])
                try:
                    ready, done, p99, iops, cmd = one_run(name, case, load, d)
                except Exception as ex:
                    print(f"bench: {name} {case} {load}: {ex}", flush=True)
                    print(open(f"{d}/server.log").read()[-3000:], flush=True)
                    failed = True
                    shutil.rmtree(d)
                    continue
                if name not in shown:
                    print("server: " + " ".join(cmd), flush=True)
                    shown.add(name)
                results.append((rd, name, case, load, ready, done, p99, iops))
                line = f"  {name:<11} {case:<6} {load:<5}"
                if ready is not None:
                    line += f" ready {ready:7.3f} s"
                line += f" completed {done:7.3f} s"
                if p99 is not None:
                    line += f"  load: {iops:.0f} IOPS, p99 {p99:.1f} ms"
                print(line, flush=True)
                result_top = "mid.qcow2" if case == "active" else "top.qcow2"
                check(d, ["base.qcow2", "mid.qcow2", "top.qcow2"])
                if load == "none":
                    compare(f"{tpl}/top.qcow2", f"{d}/{result_top}",
                            f"{name} {case}: the guest's view before and after")
                dirs[name] = (d, result_top)
            if "qsd" in dirs:
                qd, qtop = dirs["qsd"]
                for name, (d, t) in dirs.items():
                    if name != "qsd":
                        compare(f"{d}/{t}", f"{qd}/{qtop}", f"{name} against qsd, {case} {load}")
            for d, _ in dirs.values():
                shutil.rmtree(d)

def med(v):
    v = sorted(x for x in v if x is not None)
    return v[len(v) // 2] if v else None

def fmt(x, unit=""):
    return "-" if x is None else f"{x:.3f}{unit}"

print()
print(f"load average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}, "
      f"nproc {os.cpu_count()}")
print(f"median of {rounds} round(s); seconds from block-commit")
print(f"{'case':<6} {'load':<5} {'server':<11} | {'ready':>8} | {'completed':>9} | "
      f"{'load p99 ms':>11} | {'load IOPS':>9} | runs (ready/completed)")
for case in cases:
    for load in loads:
        for name in servers:
            rows = [r for r in results if r[1:4] == (name, case, load)]
            if not rows:
                continue
            print(f"{case:<6} {load:<5} {name:<11} | {fmt(med(r[4] for r in rows)):>8} | "
                  f"{fmt(med(r[5] for r in rows)):>9} | "
                  f"{fmt(med(r[6] for r in rows)):>11} | "
                  f"{fmt(med(r[7] for r in rows)):>9} | "
                  + " ".join(f"{fmt(r[4])}/{fmt(r[5])}" for r in rows))
print()
print("ratios to qsd (median of per-round ratios; below 1: stratad is faster)")
for case in cases:
    for load in loads:
        for name in servers:
            if name == "qsd":
                continue
            per = {}
            for rd in range(rounds):
                a = [r for r in results if r[0] == rd and r[1:4] == (name, case, load)]
                b = [r for r in results if r[0] == rd and r[1:4] == ("qsd", case, load)]
                if a and b:
                    for k, i in (("ready", 4), ("completed", 5)):
                        if a[0][i] is not None and b[0][i]:
                            per.setdefault(k, []).append(a[0][i] / b[0][i])
            print(f"  {case:<6} {load:<5} {name}/qsd: " +
                  ", ".join(f"{k} {med(v):.2f}" for k, v in per.items()))
sys.exit(1 if failed else 0)
PYEOF
