#!/usr/bin/python3
"""A consistent backup of a multi-disk VM: one transaction starts the
backups of two exports (blockdev-backup sync=none on each, with a
bitmap added on each) while one writer writes sequence numbers to disk
A, then disk B, then A again...: the two views hold the same prefix of
the writer's requests (B's last number is A's or one less), and they
keep it while the writer overwrites both.  A transaction whose last
action fails (a backup into a missing target) starts no job, adds no
bitmap and leaves no filter behind.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-backup-multi.py
"""
import os
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img")
import backuplib as bl  # noqa: E402

SIZE = 4 * bl.MiB
SLOTS = 64
d = harness.tmpdir()
for x in ("a", "b"):
    bl.make_scratch(os.path.join(d, f"{x}.qcow2"), SIZE)
ctl = os.path.join(d, "ctl.sock")
dmn = harness.Daemon([f"name=a,file={d}/a.qcow2,format=qcow2",
                      f"name=b,file={d}/b.qcow2,format=qcow2"], extra=["--control", ctl])
S = QMP(ctl)
ha, hb = bl.nbd.NBD(), bl.nbd.NBD()
ha.connect_uri(dmn.uri("a"))
hb.connect_uri(dmn.uri("b"))
stop = threading.Event()
count = [0]


def writer():
    n = 0
    while not stop.is_set():
        n += 1
        block = struct.pack("<Q", n) * 512
        off = (n % SLOTS) * 4096
        ha.pwrite(block, off)
        hb.pwrite(block, off)
        count[0] = n


def last_seq(data):
    return max(struct.unpack_from("<Q", data, s * 4096)[0] for s in range(SLOTS))


# a failing transaction changes nothing
for x in ("a", "b"):
    bl.make_scratch(os.path.join(d, f"t{x}.qcow2"), SIZE)
    S.cmd("blockdev-add", driver="qcow2", node_name=f"t{x}",
          file={"driver": "file", "filename": os.path.join(d, f"t{x}.qcow2")})
cls, desc = S.error("transaction", actions=[
    {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "x"}},
    {"type": "blockdev-backup", "data": {"job-id": "ja", "device": "a", "target": "ta",
                                         "sync": "none", "filter-node-name": "fa"}},
    {"type": "blockdev-backup", "data": {"job-id": "jb", "device": "b", "target": "nosuch",
                                         "sync": "none", "filter-node-name": "fb"}}])
check("nosuch" in desc, desc)
check(S.cmd("query-block-jobs") == [], "a job started in a failed transaction")
bms = [b for n in S.cmd("query-named-block-nodes") for b in n.get("dirty-bitmaps", [])]
check(bms == [], f"a bitmap survived a failed transaction: {bms}")
cls, desc = S.error("blockdev-add", driver="snapshot-access", node_name="v", file="fa")
check("fa" in desc, desc)
ok("a failing transaction with backups starts no job, adds no bitmap, leaves no filter")

wt = threading.Thread(target=writer, daemon=True)
wt.start()
time.sleep(0.3)
S.cmd("transaction", actions=[
    {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "b0"}},
    {"type": "block-dirty-bitmap-add", "data": {"node": "b", "name": "b0"}},
    {"type": "blockdev-backup", "data": {"job-id": "ja", "device": "a", "target": "ta",
                                         "sync": "none", "filter-node-name": "fa"}},
    {"type": "blockdev-backup", "data": {"job-id": "jb", "device": "b", "target": "tb",
                                         "sync": "none", "filter-node-name": "fb"}}])
for x in ("a", "b"):
    S.cmd("blockdev-add", driver="snapshot-access", node_name=f"v{x}", file=f"f{x}")
    S.cmd("block-export-add", type="nbd", id=f"v{x}", node_name=f"v{x}", name=f"v{x}")
seen = count[0]
views = {x: bl.read_all(dmn.uri(f"v{x}"), SIZE) for x in ("a", "b")}
sa, sb = last_seq(views["a"]), last_seq(views["b"])
check(sa == sb or sa == sb + 1, f"inconsistent instant: disk a at {sa}, disk b at {sb}")
deadline = time.time() + 20
while count[0] <= seen + SLOTS and time.time() < deadline:
    time.sleep(0.05)
check(count[0] > seen + SLOTS, f"the writer did not overwrite every slot ({seen} -> {count[0]})")
again = {x: bl.read_all(dmn.uri(f"v{x}"), SIZE) for x in ("a", "b")}
check(again == views, "a view changed while the writer overwrote the disks")
stop.set()
wt.join(30)
for x in ("a", "b"):
    S.cmd("block-export-del", id=f"v{x}")
    S.cmd("blockdev-del", node_name=f"v{x}")
    S.cmd("block-job-cancel", device=f"j{x}")
deadline = time.time() + 10
while S.cmd("query-block-jobs"):
    check(time.time() < deadline, "backup jobs did not end")
    time.sleep(0.02)
for x in ("a", "b"):
    S.cmd("blockdev-del", node_name=f"t{x}")
ha.shutdown()
hb.shutdown()
check(dmn.stop() == 0, "stratad did not stop cleanly")
ok(f"one transaction froze both disks at one instant (a at {sa}, b at {sb}; the writer "
   f"went on to {count[0]})")
