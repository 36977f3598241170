#!/usr/bin/env python3
"""audit-open: no guest request waits for the qcow2 refcount audit.

Before an image takes its first write, stratad checks its refcounts
against all its metadata (every L2 table read once).  That walk runs when
the image is opened writable, before the export is served, and, for a
base that a commit makes writable, before the export is quiesced for the
reopen, without the image lock, so that neither the first writes after an
open nor the requests held by the commit's quiesce wait for a whole-image
metadata scan.  Asserted by counting, not by timing:

  - open: with 4 KiB clusters, 64 L2 tables in use; once the export is
    served, the first writes (one in place, one allocating) make a
    handful of backend reads (their own L2 table and refcount block),
    never one per L2 table (counted with the fault injector armed for an
    operation that never comes);
  - commit: block-commit of the active layer into a read-only qcow2 base
    with 64 L2 tables: the daemon's log shows the base's refcounts
    checked before the export is quiesced for the base's reopen, and the
    commit's first writes into the base make no such scan either;
  - what the audit proves still holds: an image whose refcounts lie
    (a cluster in use with refcount 0) is served for reads and refuses
    writes (EIO), with the repair command in the log.

Needs a build with -Dfault_injection=true (skips otherwise).
"""
import os
import random
import re
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
BLOCK = 4 * KiB
TABLES = 64                      # L2 tables in use (2 MiB each)
SIZE = TABLES * 2 * MiB

harness.require_built()
harness.report_unexpected_exceptions()
SEED = int(os.environ.get("STRATA_SEED", "20261203"))
print(f"seed: {SEED} (STRATA_SEED={SEED} to replay)")
rng = random.Random(SEED)
WORK = harness.tmpdir()
t0 = time.monotonic()


def qimg(*args):
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                       timeout=120)
    check(p.returncode == 0, f"qemu-img {' '.join(args)}: {p.stderr}")
    return p


def many_tables(path, backing=None):
    """A qcow2 image with 4 KiB clusters and one written cluster in each
    of its TABLES L2 ranges."""
    opts = ["-o", "cluster_size=4096"]
    if backing:
        qimg("create", "-q", "-f", "qcow2", *opts, "-b", backing, "-F",
             "qcow2", path)
    else:
        qimg("create", "-q", "-f", "qcow2", *opts, path, str(SIZE))
    cmds = []
    for t in range(TABLES):
        cmds += ["-c", f"write -P {t % 250 + 1} {t * 2 * MiB + BLOCK} 4k"]
    p = subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path],
                       capture_output=True, text=True, timeout=120)
    check(p.returncode == 0, f"qemu-io: {p.stderr}")


class Guest:
    def __init__(self, top, tag):
        self.ctl = os.path.join(WORK, f"ctl-{tag}.sock")
        self.d = Daemon([f"name=disk,file={top},format=qcow2"],
                        extra=["--control", self.ctl, "-v"])
        self.q = QMP(self.ctl)
        self.c = Conn(self.d.sock, timeout=60)
        self.c.handshake("disk")
        self.cookie = 1

    def cmd(self, cmd, off=0, length=0, payload=b"", flags=0):
        self.cookie += 1
        return self.c.simple_cmd(cmd, self.cookie, off, length, flags, payload)

    def write(self, off, data):
        return self.cmd(w.CMD_WRITE, off, len(data), data)

    def reads_from_now(self):
        self.q.cmd("x-debug-fault-inject", ops=["read"], nth=1 << 40,
                   error="EIO")

    def reads_seen(self):
        n = self.q.cmd("x-debug-fault-query")["seen"]
        self.q.cmd("x-debug-fault-inject", nth=0)
        return n

    def close(self):
        for x in (self.c, self.q):
            try:
                x.close()
            except OSError:
                pass
        check(self.d.stop() == 0, "stratad exit status")


def require_fault_injection():
    img = os.path.join(WORK, "probe.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    g = Guest(img, "probe")
    r = g.q.execute("x-debug-fault-query")
    g.close()
    if "error" in r:
        harness.skip("stratad was built without fault injection "
                     "(meson setup -Dfault_injection=true)")


require_fault_injection()

# ---- open: the first writes after the export is served ----
img = os.path.join(WORK, "open.qcow2")
many_tables(img)
g = Guest(img, "open")
g.reads_from_now()
check(g.write(0 * 2 * MiB + BLOCK, rng.randbytes(BLOCK)) == 0,
      "the write in place failed")
check(g.write(37 * 2 * MiB + 9 * BLOCK, rng.randbytes(BLOCK)) == 0,
      "the allocating write failed")
seen = g.reads_seen()
check(seen < TABLES // 4, f"the first two writes after the open made {seen} "
      f"backend reads: they waited for a walk of the {TABLES} L2 tables")
log = g.d.logtext()
check(re.search(r"open\.qcow2: refcounts checked", log) is not None,
      f"no audit of the image in the log:\n{log[-3000:]}")
g.close()
qimg("check", img)
ok(f"open: the first writes made {seen} backend reads "
   f"({TABLES} L2 tables audited before the export was served)")

# ---- commit: the base's audit runs before the quiesce ----
base = os.path.join(WORK, "base.qcow2")
top = os.path.join(WORK, "top.qcow2")
many_tables(base)
many_tables(top, backing=base)
g = Guest(top, "commit")
g.q.cmd("block-commit", device="disk", job_id="c")
g.q.wait_event("BLOCK_JOB_READY", timeout=60,
               match=lambda x: x["device"] == "c")
log = g.d.logtext()
m_audit = re.search(r"base\.qcow2: refcounts checked", log)
check(m_audit is not None, f"no audit of the base in the log:\n{log[-3000:]}")
m_q = re.search(r"export 'disk': quiescing", log[m_audit.start():])
check(m_q is not None, "the commit never quiesced the export after the "
      f"base's audit (it ran under the quiesce):\n{log[-3000:]}")
check(re.search(r"export 'disk': quiescing", log[:m_audit.start()]) is None,
      f"the export was quiesced before the base's audit ended:\n"
      f"{log[-3000:]}")
g.reads_from_now()
check(g.write(5 * 2 * MiB + 3 * BLOCK, rng.randbytes(BLOCK)) == 0,
      "a write during the commit failed")
seen = g.reads_seen()
check(seen < TABLES // 4, f"a write mirrored into the base made {seen} "
      "backend reads (a walk of the base's L2 tables)")
g.q.cmd("block-job-complete", device="c")
g.q.wait_event("BLOCK_JOB_COMPLETED", timeout=60,
               match=lambda x: x["device"] == "c")
g.close()
qimg("check", base)
ok("commit: the base's refcounts are checked before the quiesce, and "
   f"a write mirrored into it made {seen} backend reads")

# ---- a finding still makes the image refuse writes ----
bad = os.path.join(WORK, "bad.qcow2")
many_tables(bad)
# The refcount of the data cluster of L2 range 3 set to 0 (refcount
# order 4: two bytes per cluster in the one refcount block).
m = qimg("map", "--output=json", "-f", "qcow2", bad).stdout
import json  # noqa: E402
host = next(e["offset"] for e in json.loads(m)
            if e["data"] and e["start"] == 3 * 2 * MiB + BLOCK)
info = open(bad, "rb").read(4096)
rt_off = int.from_bytes(info[48:56], "big")
with open(bad, "r+b") as f:
    f.seek(rt_off)
    rb_off = int.from_bytes(f.read(8), "big")
    f.seek(rb_off + (host // 4096) * 2)
    f.write(b"\0\0")
g = Guest(bad, "bad")
data, e = g.c.read(g.cookie + 1, 3 * 2 * MiB + BLOCK, BLOCK)
check(e == 0 and data == bytes([4]) * BLOCK, f"a read of the corrupt image "
      f"failed or is wrong: error {e}")
check(g.write(10 * 2 * MiB, rng.randbytes(BLOCK)) == w.EIO,
      "a write into an image whose refcounts lie did not fail with EIO")
log = g.d.logtext()
check("qemu-img check -r all" in log and f"{host:#x}" in log,
      f"the log does not name the cluster and the repair:\n{log[-3000:]}")
g.close()
ok("an image whose refcounts lie is read and refuses writes, the log "
   "names the cluster and 'qemu-img check -r all'")
ok(f"done in {time.monotonic() - t0:.1f} s")
