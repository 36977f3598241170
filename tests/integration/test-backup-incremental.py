#!/usr/bin/python3
"""Point-in-time backups while the guest writes: a full backup and three
incrementals of a qcow2 export are taken (QEMU 7.2's pull-mode sequence:
transaction of block-dirty-bitmap-add/-disable and blockdev-backup
sync=none, a snapshot-access view exported with the bitmap of what
changed since the previous backup) while a writer keeps writing, also
during the reads.  Restoring the full backup and applying the
incrementals in order (the dirty extents of each) gives, after each
step, exactly the disk at that backup's instant: the state after a
prefix of the writer's requests, every one acknowledged before the
transaction in, none issued after it returned.  Then the chain and the
scratch targets pass qemu-img check.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-backup-incremental.py
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "nbdinfo")
import backuplib as bl  # noqa: E402
import jobsutil  # noqa: E402

SIZE = 16 * bl.MiB
d = harness.tmpdir()
disk = os.path.join(d, "disk.qcow2")
base = bytes(jobsutil.make_base(disk, SIZE, seed=3))
ctl = os.path.join(d, "ctl.sock")
dmn = harness.Daemon([f"name=disk,file={disk},format=qcow2"], extra=["--control", ctl])
S = QMP(ctl)

w = bl.Writer(dmn.uri("disk"), SIZE, random.Random(7))
w.start()
restored = None
last = copied = 0
for k in range(4):
    prev = f"b{k - 1}" if k else None
    scratch = os.path.join(d, f"scratch{k}.qcow2")
    name, t0, t1 = bl.backup_start(S, "disk", k, scratch, SIZE, prev)
    uri = dmn.uri(name)
    if k == 0:
        restored = bl.read_all(uri, SIZE)
        ext = [(0, SIZE)]
    else:
        ext = bl.apply_incremental(uri, prev, restored)
    writes_before = len(w.log)
    count = bl.match_instant(bytes(restored), base, list(w.log), t0, t1)
    check(count is not None, f"backup {k}: the restored image is no state of the disk "
          f"between the transaction's start and return")
    check(count >= last, f"backup {k}: holds {count} writes, backup {k - 1} held {last}")
    check(len(w.log) > writes_before or w.error is None, "writer stalled")
    # the query shows the job; the view's reads kept the instant although the
    # writer overwrote data meanwhile (the copy-before-write copied it)
    jobs = [j for j in S.cmd("query-block-jobs") if j["device"] == f"job{k}"]
    check(len(jobs) == 1 and jobs[0]["type"] == "backup", f"{jobs}")
    copied += jobs[0]["offset"]
    bl.backup_end(S, "disk", k, prev)
    ok(f"backup {k} ({'full' if k == 0 else 'incremental'}, {len(ext)} extents): "
       f"restored = the disk after {count} of the writer's requests "
       f"({len(w.log)} issued so far)")
    last = count
w.stop()
check(copied > 0, "no write was copied before it reached the disk: the test did not "
      "exercise copy-before-write")
check(w.error is None, f"writer: {w.error}")
check(len(w.log) > 50, f"the writer wrote only {len(w.log)} times")
# after the last backup the live disk still equals the full model
final = bytearray(base)
for x in w.log:
    bl.apply_write(final, x)
live = bl.read_all(dmn.uri("disk"), SIZE)
check(live == final, f"live disk differs from the writer's model at {harness.first_diff(live, final)}")
check(dmn.stop() == 0, "stratad did not stop cleanly")
jobsutil.check_images([disk] + [os.path.join(d, f"scratch{k}.qcow2") for k in range(4)])
ok("full + 3 incrementals under a running writer restore the disk at each instant; "
   "images pass qemu-img check")
