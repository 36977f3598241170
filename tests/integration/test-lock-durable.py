#!/usr/bin/env python3
"""lock-durable: no request waits for a durable metadata write of another.

Two metadata writes of a qcow2 write are durable (FUA) and ordered before
what refers to them: a new refcount block (and its refcount table entry),
and the write-back of dirty L2 tables (after the refcount blocks) when a
full cache needs room.  stratad does both without the image lock, so a
request that needs the lock for something else (here a read, which looks
up its L2 table under it) does not wait for them.

The image (512-byte clusters: a refcount block every 128 KiB of file, an
L2 table every 32 KiB of guest) is stored on nbdkit's file plugin behind
its delay filter (every write takes a second, reads none), and the fault
injector, armed for an operation that never comes, counts the backend
writes issued.  Asserted by order, not by time:

  - a write that creates a refcount block has issued its first backend
    write (the block) when a read of another range is sent: the read's
    reply arrives while that is the only write issued (with the lock held
    across the creation, the read would come after both of its writes);
  - with a 4-table L2 cache whose tables are all dirty, a write into a new
    range writes its data and tables back (the refcount blocks first): a
    read of a cached range sent once the second of those writes is
    issued replies before a third is (with the lock held across the
    write-back, it would come after the refcount blocks' write);
  - then every write reads back, and qemu-img check finds the image
    clean after a flush and a clean stop.

Needs nbdkit (delay filter) and a build with -Dfault_injection=true
(skips otherwise).
"""
import os
import random
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
BLOCK_SPAN = 128 * KiB           # file bytes one refcount block counts
DELAY = 1                        # seconds per backend write (nbdkit)

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("nbdkit", "qemu-img", "qemu-io")
SEED = int(os.environ.get("STRATA_SEED", "20261203"))
print(f"seed: {SEED} (STRATA_SEED={SEED} to replay)")
rng = random.Random(SEED)
WORK = harness.tmpdir()
t0 = time.monotonic()

img = os.path.join(WORK, "img.qcow2")
p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={CS}", img, "64M"], capture_output=True,
                   text=True, timeout=60)
check(p.returncode == 0, f"qemu-img create: {p.stderr}")
PRE = bytes([17]) * (4 * KiB)
model = {}


def prefill(off):
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -P 17 {off} 4k", img],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"qemu-io: {p.stderr}")
    model[off] = PRE


# 4 KiB at 0, then at 16 MiB and up until the end of the file (where the
# allocator goes next: qemu-img writes no holes) is at most 16 KiB below
# a multiple of BLOCK_SPAN, where the next refcount block starts: the
# first step of a 16 KiB write into a new L2 range (a table and 32
# clusters) then creates it before its data write.
prefill(0)
off = 16 * MiB
while True:
    fsize = os.path.getsize(img)
    boundary = (fsize + BLOCK_SPAN - 1) // BLOCK_SPAN * BLOCK_SPAN
    if 0 < boundary - fsize <= 16 * KiB:
        break
    prefill(off)
    off += 4 * KiB
# An NBD export does not grow: room for what follows (free clusters).
os.truncate(img, 64 * MiB)

probe = subprocess.run(["nbdkit", "--filter=delay", "null", "--dump-plugin"],
                       capture_output=True, timeout=30)
if probe.returncode != 0:
    harness.skip("nbdkit has no delay filter")
ksock = os.path.join(WORK, "kit.sock")
klog = open(os.path.join(WORK, "nbdkit.log"), "w+")
kit = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", ksock,
                        "--filter=delay", "file", img, f"wdelay={DELAY}"],
                       stdout=klog, stderr=klog,
                       preexec_fn=harness._die_with_parent)
harness.atexit.register(kit.kill)
deadline = time.monotonic() + 20
while not os.path.exists(ksock):
    if kit.poll() is not None:
        klog.seek(0)
        check(False, f"nbdkit exited: {klog.read()}")
    check(time.monotonic() < deadline, "nbdkit did not start")
    time.sleep(0.05)

ctl = os.path.join(WORK, "ctl.sock")
d = Daemon([f"name=disk,file=nbd+unix:///?socket={ksock},format=qcow2,"
            f"l2-cache-size={4 * CS}"], extra=["--control", ctl, "-v"],
           timeout=60)
q = QMP(ctl)
if "error" in q.execute("x-debug-fault-query"):
    harness.skip("stratad was built without fault injection "
                 "(meson setup -Dfault_injection=true)")
a = Conn(d.sock, timeout=120)
a.handshake("disk")
b = Conn(d.sock, timeout=120)
b.handshake("disk")
cookie = [100]


def nextc():
    cookie[0] += 1
    return cookie[0]


def write(c, off, data):
    e = c.simple_cmd(w.CMD_WRITE, nextc(), off, len(data), 0, data)
    check(e == 0, f"write at {off}: error {e}")
    model[off] = data


def writes_from_now():
    q.cmd("x-debug-fault-inject", ops=["write"], nth=1 << 40, error="EIO")


def writes_seen():
    return q.cmd("x-debug-fault-query")["seen"]


def wait_writes(n, what):
    deadline = time.monotonic() + 60
    while writes_seen() < n:
        check(time.monotonic() < deadline, f"{what}: no backend write came")
        time.sleep(0.01)


def read_while(off, length, busy, what):
    """A read on connection b while connection a's request `busy` is in
    flight; returns the writes issued when its reply came."""
    data, e = b.read(nextc(), off, length)
    seen = writes_seen()
    check(e == 0, f"{what}: the read failed: error {e}")
    want = b"".join(model[o] for o in sorted(model) if off <= o < off + length)
    check(data[:len(want)] == want, f"{what}: the read returned wrong data")
    return seen


# ---- a new refcount block ----
length = 16 * KiB
W1 = 1 * MiB
data1 = rng.randbytes(length)
writes_from_now()
c1 = nextc()
a.write(c1, W1, data1)
wait_writes(1, "the write that creates a refcount block")
seen = read_while(0, 4 * KiB, c1, "during a refcount block's creation")
r = a.reply_for(c1)
check(not r[-1].error, f"the write that created a refcount block failed: "
      f"{r[-1].error}")
model[W1] = data1
check(seen == 1, f"a read waited for a refcount block's creation: it "
      f"replied after {seen} backend writes, not during the first")
ok(f"a read replied during a refcount block's creation (the file's end "
   f"{(boundary - fsize) // KiB} KiB below a block boundary)")

# ---- the write-back of a full L2 cache ----
# New tables at 2, 5, 6, 7 and 3 MiB leave every table the cache (4
# tables) holds dirty: a miss that takes the least recently used one
# writes it back (after the refcount blocks) first, which must not hold
# the lock.
write(a, 8 * KiB, rng.randbytes(CS))
for m in (2, 5, 6, 7, 3):
    write(a, m * MiB, rng.randbytes(CS))
base = writes_seen()
c4 = nextc()
data4 = rng.randbytes(CS)
a.write(c4, 4 * MiB, data4)
# Its data write, then (before it links the new table) write-backs:
# the read goes once the second backend write is issued.
wait_writes(base + 2, "the write that needs room in the L2 cache")
seen = read_while(3 * MiB, CS, c4, "during an L2 cache write-back")
r = a.reply_for(c4)
check(not r[-1].error, f"the write that needed room failed: {r[-1].error}")
model[4 * MiB] = data4
check(seen == base + 2, f"a read of a cached table waited for a write-back: "
      f"it replied after {seen - base} backend writes, not during the "
      f"second")
ok("a read of a cached table replied during the write-back of others")

# ---- everything reads back; the image is clean ----
for off, data in sorted(model.items()):
    got, e = b.read(nextc(), off, len(data))
    check(e == 0 and got == data, f"the data at {off} did not read back")
q.cmd("x-debug-fault-inject", nth=0)
check(a.simple_cmd(w.CMD_FLUSH, nextc()) == 0, "FLUSH failed")
for x in (a, b, q):
    x.close()
check(d.stop() == 0, "stratad exit status")
kit.terminate()
kit.wait(30)
p = subprocess.run(["qemu-img", "check", img], capture_output=True,
                   text=True, timeout=60)
check(p.returncode == 0, f"qemu-img check: rc {p.returncode}\n{p.stdout}"
      f"{p.stderr}")
import json  # noqa: E402
p = subprocess.run(["qemu-img", "check", "--output=json", img],
                   capture_output=True, text=True, timeout=60)
end = json.loads(p.stdout)["image-end-offset"]
check(end > boundary + CS, f"the image ends at {end}: the "
      f"writes did not go past the refcount block at {boundary}")
ok("every write reads back; qemu-img check finds the image clean")
ok(f"done in {time.monotonic() - t0:.1f} s")
