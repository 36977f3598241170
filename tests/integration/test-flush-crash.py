#!/usr/bin/env python3
"""flush-crash: stratad killed at every step of a qcow2 flush.

An allocating write into a new L2 range does no durable write: the new
L2 table stays in the cache and its L1 entry in memory until the next
flush, which writes the refcount blocks, the L2 tables, syncs the file,
and only then writes the L1 entries.  This test kills the daemon
(SIGKILL, through the fault-injection build's x-debug-fault-inject with
error "kill") before each backend write or flush of such a flush, one
step per round, until a round's flush completes:

  - qemu-img check finds no corruption (leaked clusters are allowed
    after a crash);
  - QEMU reads every write acknowledged before the previous, completed
    FLUSH; each 4 KiB block written after it reads as before or as
    written, nothing else;
  - stratad opens the image again and a clean stop leaves it clean.

Then an acknowledged FUA write into a new L2 range survives a kill -9
right after its reply.  Last, over a writable backing node (an active
commit's base, as a snapshot's old top is until it is read-only), an
allocating FUA write and a TRIM with FUA sync their own image only (they
must not wait for the backing node's sync), a FLUSH both, and a FLUSH
with nothing written since the last one syncs nothing.

4 KiB clusters (an L2 table covers 2 MiB, a refcount block 8 MiB of the
file), so the flushes write several new tables and refcount blocks.  The
overlay ends in 4 MiB of random bytes (free clusters): an L1 entry that
reached the file before its table would point at garbage, which
qemu-img check reports (an empty file hole would pass as a table).
Needs a build with -Dfault_injection=true (skips otherwise).
"""
import os
import random
import signal
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
SIZE = 24 * MiB
BLOCK = 4 * KiB
MAX_STEPS = 64

harness.require_built()
harness.report_unexpected_exceptions()
SEED = int(os.environ.get("STRATA_SEED", "20261203"))
print(f"seed: {SEED} (STRATA_SEED={SEED} to replay)")
rng = random.Random(SEED)
WORK = harness.tmpdir()


def qimg(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True,
                          text=True, timeout=120)


def offline(top):
    out = os.path.join(WORK, "check.raw")
    p = qimg("convert", "-U", "-O", "raw", top, out)
    check(p.returncode == 0, f"qemu-img convert {top}: {p.stderr}")
    with open(out, "rb") as f:
        return f.read()


def check_clean(top, what, leaks_ok=True):
    p = qimg("check", top)
    good = p.returncode == 0 or (leaks_ok and p.returncode == 3)
    check(good, f"{what}: qemu-img check: rc {p.returncode}\n"
          f"{p.stdout}{p.stderr}")
    return p.returncode


BASE = os.path.join(WORK, "base.raw")
with open(BASE, "wb") as f:
    f.write(rng.randbytes(SIZE))
with open(BASE, "rb") as f:
    BASE_DATA = f.read()
GARBAGE = rng.randbytes(4 * MiB)


def fresh_top(tag):
    """A new overlay followed by 4 MiB of garbage: free clusters (refcount
    0) that new tables and data are allocated in, so a table linked
    before it was written would read as garbage, not as an empty table
    (a file hole), and qemu-img check would see it."""
    top = os.path.join(WORK, f"top-{tag}.qcow2")
    p = qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
             "-b", BASE, "-F", "raw", top)
    check(p.returncode == 0, f"qemu-img create: {p.stderr}")
    with open(top, "ab") as f:
        f.write(GARBAGE)
    return top


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

    def cmd(self, cmd, off=0, length=0, payload=b"", flags=0):
        self.cookie += 1
        return self.c.simple_cmd(cmd, self.cookie, off, length, flags, payload)

    def write(self, off, data, flags=0):
        e = self.cmd(w.CMD_WRITE, off, len(data), data, flags)
        check(e == 0, f"write at {off}: error {e}")

    def flush(self):
        """The FLUSH's error, or None when the daemon died before its
        reply."""
        try:
            return self.cmd(w.CMD_FLUSH)
        except (OSError, EOFError, w.Closed) as ex:
            return ex

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


def blocks(lo, hi, n):
    """n distinct 4 KiB-aligned offsets in [lo, hi)."""
    return sorted(rng.sample(range(lo // BLOCK, hi // BLOCK), n))


def require_fault_injection():
    g = Guest(fresh_top("probe"))
    r = g.q.execute("x-debug-fault-query")
    g.close()
    g.d.stop()
    if "error" in r:
        harness.skip("stratad was built without fault injection "
                     "(meson setup -Dfault_injection=true)")


require_fault_injection()


def crash_round(step):
    """Kills the daemon before backend operation `step` of a FLUSH.
    Returns True when the FLUSH completed (no step left)."""
    what = f"kill before operation {step} of the flush"
    top = fresh_top(f"step{step}")
    g = Guest(top)
    model = bytearray(BASE_DATA)
    # flushed: new L2 tables in the first 8 MiB, refcounts for them
    for b in blocks(0, 8 * MiB, 48):
        data = rng.randbytes(BLOCK)
        g.write(b * BLOCK, data)
        model[b * BLOCK:(b + 1) * BLOCK] = data
    check(g.flush() == 0, f"{what}: the first FLUSH failed")
    # not flushed: new tables above 8 MiB (and a new refcount block for
    # the clusters past the first 8 MiB of the file), overwrites below
    pending = {}
    for b in blocks(0, SIZE, 160):
        data = rng.randbytes(BLOCK)
        g.write(b * BLOCK, data)
        pending[b] = data
    g.q.cmd("x-debug-fault-inject", ops=["write", "flush"], nth=step,
            error="kill")
    r = g.flush()
    if r == 0:
        st = g.q.cmd("x-debug-fault-query")
        check(not st["fired"], f"{what}: the FLUSH succeeded after the kill")
        g.q.cmd("x-debug-fault-inject", nth=0)
        g.close()
        check(g.d.stop() == 0, f"{what}: stratad did not stop cleanly")
        check_clean(top, f"{what} (completed)", leaks_ok=False)
        for b, data in pending.items():
            model[b * BLOCK:(b + 1) * BLOCK] = data
        got = offline(top)
        check(got == bytes(model), f"{what}: the completed FLUSH lost data")
        return True
    g.wait_dead(what)
    g.close()
    code = check_clean(top, what)
    got = offline(top)
    check(len(got) == SIZE, f"{what}: size {len(got)}")
    for b in range(SIZE // BLOCK):
        have = got[b * BLOCK:(b + 1) * BLOCK]
        old = bytes(model[b * BLOCK:(b + 1) * BLOCK])
        if b in pending:
            check(have in (old, pending[b]),
                  f"{what}: block {b} is neither before nor as written")
        else:
            check(have == old, f"{what}: block {b} (flushed or untouched) "
                  "does not read back")
    # opens again, and a clean stop leaves it clean
    g2 = Guest(top)
    g2.write(0, rng.randbytes(BLOCK))
    check(g2.flush() == 0, f"{what}: FLUSH after the restart failed")
    g2.close()
    check(g2.d.stop() == 0, f"{what}: stratad did not stop cleanly")
    check_clean(top, f"{what}, after a restart")
    ok(f"{what}: qemu-img check exit {code}, every flushed write present")
    return False


t0 = time.monotonic()
for step in range(1, MAX_STEPS + 1):
    if crash_round(step):
        check(step > 3, f"the flush ended after {step - 1} operations: "
              "too few to cover the steps")
        ok(f"the flush completes with {step - 1} backend operations, each "
           "one a crash point")
        break
else:
    check(False, f"the flush did not complete within {MAX_STEPS} steps")

# An acknowledged FUA write into a new L2 range survives kill -9.
top = fresh_top("fua")
g = Guest(top)
off = 20 * MiB + 3 * BLOCK
data = rng.randbytes(2 * BLOCK)
g.write(off, data, flags=w.CMD_FLAG_FUA)
g.d.proc.send_signal(signal.SIGKILL)
g.wait_dead("FUA write")
g.close()
check_clean(top, "FUA write")
got = offline(top)
check(got[off:off + len(data)] == data, "an acknowledged FUA write into a "
      "new L2 range was lost by kill -9")
ok("an acknowledged FUA write into a new L2 range survives kill -9")
# A FUA write syncs only the image it writes to, a FLUSH also a writable
# backing node below (a snapshot's old top until it is read-only, here an
# active commit's base): counted as backend flushes, with the injector
# armed for an operation that never comes.
top = fresh_top("backing")
g = Guest(top)
g.q.cmd("block-commit", device="disk", job_id="c")
g.q.wait_event("BLOCK_JOB_READY", timeout=60, match=lambda x: x["device"] == "c")
g.q.cmd("x-debug-fault-inject", ops=["flush"], nth=1 << 40, error="EIO")
g.write(12 * MiB + 5 * BLOCK, rng.randbytes(BLOCK), flags=w.CMD_FLAG_FUA)
fua_flushes = g.q.cmd("x-debug-fault-query")["seen"]
check(g.flush() == 0, "FLUSH failed")
flush_flushes = g.q.cmd("x-debug-fault-query")["seen"] - fua_flushes
check(g.flush() == 0, "the second FLUSH failed")
again = (g.q.cmd("x-debug-fault-query")["seen"] - fua_flushes -
         flush_flushes)
check(again == 0, f"a FLUSH with nothing written since the last one made "
      f"{again} backend flushes, not 0")
e = g.cmd(w.CMD_TRIM, 12 * MiB + 5 * BLOCK, BLOCK, flags=w.CMD_FLAG_FUA)
check(e == 0, f"TRIM with FUA: error {e}")
trim_flushes = (g.q.cmd("x-debug-fault-query")["seen"] - fua_flushes -
                flush_flushes)
g.q.cmd("x-debug-fault-inject", nth=0)
check(fua_flushes == 1, f"an allocating FUA write over a writable backing node "
      f"made {fua_flushes} backend flushes, not 1 (its own image's)")
check(flush_flushes == 2, f"a FLUSH over a writable backing node made "
      f"{flush_flushes} backend flushes, not 2 (the backing node's, its own)")
check(trim_flushes == 1, f"a TRIM with FUA over a writable backing node made "
      f"{trim_flushes} backend flushes, not 1 (its own image's)")
g.q.cmd("block-job-cancel", device="c")
g.q.wait_event("BLOCK_JOB_COMPLETED", timeout=60, match=lambda x: x["device"] == "c")
check(g.d.stop() == 0, "stratad exit status")
g.close()
check_clean(top, "after the FUA and FLUSH over a writable backing node", leaks_ok=False)
ok("a FUA write or TRIM syncs its own image only, a FLUSH the writable "
   "backing node too, a FLUSH after nothing new none")
ok(f"done in {time.monotonic() - t0:.1f} s")
