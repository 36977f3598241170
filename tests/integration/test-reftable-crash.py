#!/usr/bin/env python3
"""reftable-crash: stratad killed at every step of a refcount table growth.

The growth of a qcow2 refcount table writes its new refcount blocks, then
the new table, then the header that names it, without the image lock, so
that other requests go on meanwhile.  This test kills the daemon
(SIGKILL, through the fault-injection build's x-debug-fault-inject with
error "kill") before each backend write or flush of a growth and what
follows it, one step per round, until a round completes:

  - an image with 512-byte clusters and 64-bit refcounts (a refcount
    block counts 64 clusters, the first table cluster 2 MiB of file),
    filled by qemu-io to just below 2 MiB, then random bytes past its end
    (free clusters: a table or block named before it was written would be
    garbage, which qemu-img check reports);
  - flushed first: overwrites of allocated data; then, in flight
    together: a write that grows the table, an overwrite of allocated
    clusters, an allocating write into a new L2 range; then a FLUSH;
  - after the kill: qemu-img check finds no corruption (leaked clusters
    are allowed after a crash, and counted); QEMU reads every flushed
    write; each 512-byte cluster of the writes in flight reads as before
    or as written, and all of them as written once their FLUSH was
    acknowledged; stratad opens the image again and a clean stop leaves
    it with no new damage;
  - the rounds must have killed the growth both before and after the
    header switch (else the steps did not cover it), and the round that
    completes leaves a clean image with no leak.

Needs a build with -Dfault_injection=true (skips otherwise).
"""
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, QMP, check, ok  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
CS = 512
SIZE = 16 * MiB
AREA = 2 * MiB                     # what the first table cluster covers
MAX_STEPS = 64

harness.require_built()
harness.report_unexpected_exceptions()
SEED = int(os.environ.get("STRATA_SEED", "20261203"))
print(f"seed: {SEED} (STRATA_SEED={SEED} to replay)")
rng = random.Random(SEED)
WORK = harness.tmpdir()
t0 = time.monotonic()


def qimg(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True,
                          text=True, timeout=120)


def qemu_io(img, cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [img], capture_output=True, text=True,
                       timeout=120)
    check(p.returncode == 0 and "error" not in p.stdout.lower(),
          f"qemu-io: {p.stdout}{p.stderr}")


def check_image(top, what, leaks_ok=True):
    """qemu-img check's exit status (0, or 3 for leaks when allowed) and
    the number of leaked clusters."""
    p = qimg("check", top)
    good = p.returncode == 0 or (leaks_ok and p.returncode == 3)
    check(good, f"{what}: qemu-img check: rc {p.returncode}\n"
          f"{p.stdout}{p.stderr}")
    leaks = 0
    for line in p.stdout.splitlines():
        if "leaked clusters were found" in line:
            leaks = int(line.split()[0])
    return p.returncode, leaks


def reftable_offset(top):
    with open(top, "rb") as f:
        h = f.read(64)
    return struct.unpack(">Q", h[48:56])[0]


def offline(top):
    out = os.path.join(WORK, "check.raw")
    p = qimg("convert", "-U", "-O", "raw", top, out)
    check(p.returncode == 0, f"qemu-img convert {top}: {p.stderr}")
    with open(out, "rb") as f:
        return f.read()


# ---- the golden image: filled to just below AREA ----
GOLD = os.path.join(WORK, "gold.qcow2")
p = qimg("create", "-q", "-f", "qcow2", "-o",
         "cluster_size=512,refcount_bits=64", GOLD, str(SIZE))
check(p.returncode == 0, f"qemu-img create: {p.stderr}")
check(reftable_offset(GOLD) < AREA, "unexpected layout")
MODEL = bytearray(SIZE)
goff = 0
while True:
    end = os.path.getsize(GOLD)
    check(end < AREA, f"the fill went past {AREA} (file ends at {end})")
    if AREA - end <= 12 * KiB:
        break
    # 64 KiB per qemu-io command far from the end, 4 KiB near it
    step = 64 * KiB if AREA - end > 160 * KiB else 4 * KiB
    n = max(1, min(16, (AREA - end - 96 * KiB) // (80 * KiB))) \
        if step == 64 * KiB else 1
    cmds = []
    for _ in range(n):
        pat = 1 + (goff // step) % 250
        cmds.append(f"write -P {pat} {goff} {step}")
        MODEL[goff:goff + step] = bytes([pat]) * step
        goff += step
    qemu_io(GOLD, cmds)
FILLED = goff
with open(GOLD, "ab") as f:               # free clusters full of garbage
    f.write(rng.randbytes(AREA + 256 * KiB - os.path.getsize(GOLD)))
code, _ = check_image(GOLD, "the prepared image", leaks_ok=False)
RT0 = reftable_offset(GOLD)
ok(f"prepared: {FILLED // KiB} KiB of data, the file ended "
   f"{(AREA - end) // KiB} KiB below {AREA // MiB} MiB")


class Guest:
    """One daemon on top, a connection and a control socket."""

    def __init__(self, top):
        self.ctl = os.path.join(WORK, "ctl.sock")
        if os.path.exists(self.ctl):
            os.unlink(self.ctl)
        self.d = Daemon([f"name=disk,file={top},format=qcow2"],
                        extra=["--control", self.ctl, "-v"])
        self.q = QMP(self.ctl)
        self.c = Conn(self.d.sock, timeout=60)
        self.c.handshake("disk")
        self.cookie = 1

    def next(self):
        self.cookie += 1
        return self.cookie

    def cmd(self, cmd, off=0, length=0, payload=b"", flags=0):
        return self.c.simple_cmd(cmd, self.next(), off, length, flags, payload)

    def wait_dead(self, what):
        try:
            self.d.proc.wait(30)
        except subprocess.TimeoutExpired:
            check(False, f"{what}: stratad still runs after the kill")
        check(self.d.proc.returncode == -signal.SIGKILL,
              f"{what}: stratad exited with {self.d.proc.returncode}, "
              f"not SIGKILL:\n{self.d.logtext()[-3000:]}")

    def close(self):
        for x in (self.c, self.q):
            try:
                x.close()
            except OSError:
                pass


def require_fault_injection():
    top = os.path.join(WORK, "probe.qcow2")
    shutil.copy(GOLD, top)
    g = Guest(top)
    r = g.q.execute("x-debug-fault-query")
    g.close()
    g.d.stop()
    if "error" in r:
        harness.skip("stratad was built without fault injection "
                     "(meson setup -Dfault_injection=true)")


require_fault_injection()

# What each round writes (the same in every round).
FLUSHED = [(o, rng.randbytes(4 * KiB)) for o in
           sorted(rng.sample(range(0, FILLED // (4 * KiB)), 6))]
FLUSHED = [(o * 4 * KiB, d) for o, d in FLUSHED]
GROW = (10 * MiB, rng.randbytes(64 * KiB))        # new L2 ranges
OVER = (FILLED // 2 // CS * CS, rng.randbytes(4 * KiB))
ALLOC = (12 * MiB + 3 * CS, rng.randbytes(2 * KiB))
INFLIGHT = [GROW, OVER, ALLOC]


def crash_round(step, seen_rt):
    """Kills the daemon before backend operation `step` of the growth and
    what follows.  Returns True when the round completed (no step left)."""
    what = f"kill before operation {step}"
    top = os.path.join(WORK, f"top-{step}.qcow2")
    shutil.copy(GOLD, top)
    model = bytearray(MODEL)
    g = Guest(top)
    for off, data in FLUSHED:
        check(g.cmd(w.CMD_WRITE, off, len(data), data) == 0,
              f"{what}: a write before the growth failed")
        model[off:off + len(data)] = data
    check(g.cmd(w.CMD_FLUSH) == 0, f"{what}: the first FLUSH failed")
    g.q.cmd("x-debug-fault-inject", ops=["write", "flush"], nth=step,
            error="kill")
    cookies = []
    acked = set()
    flushed = False
    try:
        for off, data in INFLIGHT:
            c = g.next()
            g.c.write(c, off, data)
            cookies.append(c)
        fc = g.next()
        g.c.request(w.CMD_FLUSH, fc)
        for i, c in enumerate(cookies):
            r = g.c.reply_for(c)
            check(not r[-1].error, f"{what}: write {i} failed: "
                  f"{r[-1].error}")
            acked.add(i)
        r = g.c.reply_for(fc)
        check(not r[-1].error, f"{what}: the FLUSH failed: {r[-1].error}")
        flushed = True
    except (OSError, EOFError, w.Closed):
        pass
    if flushed:
        st = g.q.cmd("x-debug-fault-query")
        check(not st["fired"], f"{what}: the FLUSH succeeded after the kill")
        g.q.cmd("x-debug-fault-inject", nth=0)
        g.close()
        check(g.d.stop() == 0, f"{what}: stratad did not stop cleanly")
        check_image(top, f"{what} (completed)", leaks_ok=False)
        check(reftable_offset(top) != RT0, "the refcount table did not move")
        for off, data in INFLIGHT:
            model[off:off + len(data)] = data
        check(offline(top) == bytes(model),
              f"{what}: the completed round lost data")
        return True
    g.wait_dead(what)
    g.close()
    code, leaks = check_image(top, what)
    rt = reftable_offset(top)
    seen_rt.add(rt)
    got = offline(top)
    check(len(got) == SIZE, f"{what}: size {len(got)}")
    for off, data in FLUSHED:
        check(got[off:off + len(data)] == data,
              f"{what}: a flushed write at {off} does not read back")
    for off, data in INFLIGHT:
        for o in range(0, len(data), CS):
            have = got[off + o:off + o + CS]
            check(have in (bytes(model[off + o:off + o + CS]),
                           data[o:o + CS]),
                  f"{what}: cluster {off + o:#x} of a write in flight is "
                  "neither before nor as written")
    rest = bytearray(got)
    for off, data in INFLIGHT:
        rest[off:off + len(data)] = model[off:off + len(data)]
    check(bytes(rest) == bytes(model), f"{what}: data outside the writes "
          "in flight changed")
    # opens again, writes, and a clean stop adds no damage
    g2 = Guest(top)
    check(g2.cmd(w.CMD_WRITE, 14 * MiB, 4 * KiB, rng.randbytes(4 * KiB)) == 0,
          f"{what}: a write after the restart failed")
    check(g2.cmd(w.CMD_FLUSH) == 0, f"{what}: FLUSH after the restart failed")
    g2.close()
    check(g2.d.stop() == 0, f"{what}: stratad did not stop cleanly")
    code2, leaks2 = check_image(top, f"{what}, after a restart")
    check(leaks2 <= leaks, f"{what}: the restart leaked {leaks2 - leaks} "
          "more clusters")
    ok(f"{what}: qemu-img check exit {code} ({leaks} leaked), refcount "
       f"table at {rt:#x}, flushed writes present")
    os.unlink(top)
    return False


seen_rt = set()
for step in range(1, MAX_STEPS + 1):
    if crash_round(step, seen_rt):
        check(RT0 in seen_rt and len(seen_rt) > 1,
              f"the kills did not cover the growth: refcount tables seen "
              f"after them: {sorted(hex(x) for x in seen_rt)}")
        ok(f"the growth and what follows complete with {step - 1} backend "
           "operations, each one a crash point; kills left the old table "
           f"in force and the new one ({len(seen_rt)} table offsets)")
        break
else:
    check(False, f"the round did not complete within {MAX_STEPS} steps")
ok(f"done in {time.monotonic() - t0:.1f} s")
