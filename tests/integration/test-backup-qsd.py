#!/usr/bin/python3
"""Pull-mode backup side by side with qemu-storage-daemon 7.2: the same
QMP sequence (blockdev-add of a scratch qcow2; transaction of
block-dirty-bitmap-add/-disable and blockdev-backup sync=none with a
filter-node-name; blockdev-add snapshot-access; block-export-add with
bitmaps; then block-export-del, blockdev-del, block-job-cancel,
blockdev-del) and the same writes, before the backup, between its start
and the reads, and between the reads (so copy-before-write has old data
to keep), give on both daemons the same backup contents, equal to a
model of the disk at the backup's instant, and the same
`nbdinfo --map=qemu:dirty-bitmap:...` of the incremental backup.  The
job is listed alike (type backup) and the same wrong commands fail.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-backup-qsd.py
"""
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, QMPError, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "qemu-storage-daemon", "nbdinfo")
import backuplib as bl  # noqa: E402
import jobsutil  # noqa: E402

SIZE = 16 * bl.MiB
d = harness.tmpdir()
ds, dq = os.path.join(d, "strata"), os.path.join(d, "qsd")
for x in (ds, dq):
    os.mkdir(x)
model = bytearray(jobsutil.make_base(os.path.join(d, "base.qcow2"), SIZE, seed=9))
for x in (ds, dq):
    shutil.copyfile(os.path.join(d, "base.qcow2"), os.path.join(x, "disk.qcow2"))

s_ctl = os.path.join(d, "s-ctl.sock")
s_dmn = harness.Daemon([f"name=disk,file={ds}/disk.qcow2,format=qcow2"],
                       extra=["--control", s_ctl])
q_ctl = os.path.join(d, "q-ctl.sock")
q_nbd = os.path.join(d, "q-nbd.sock")
harness.start_qsd(q_ctl, q_nbd, [
    "--blockdev", f"driver=file,filename={dq}/disk.qcow2,node-name=disk-file",
    "--blockdev", "driver=qcow2,file=disk-file,node-name=disk",
    "--export", "type=nbd,id=disk,node-name=disk,name=disk,writable=on"])
S, Q = QMP(s_ctl), QMP(q_ctl)
uri = {S: s_dmn.uri, Q: lambda n: f"nbd+unix:///{n}?socket={q_nbd}"}

hs = bl.nbd.NBD()
hs.connect_uri(uri[S]("disk"))
hq = bl.nbd.NBD()
hq.connect_uri(uri[Q]("disk"))
rng = random.Random(13)


def io(count, zeroes=False):
    """The same writes (and write-zeroes) through both, into the model.
    No write-zeroes while a backup runs: after a write-zeroes not
    aligned to clusters (200704 bytes) through its NBD export,
    qemu-storage-daemon 7.2's snapshot-access view reads zeros in the
    whole clusters inside it (the old data is lost; test-backup-incremental
    checks strata's write-zeroes under a backup against a model)."""
    for _ in range(count):
        n = rng.choice((4096, 65536, 200704))
        off = rng.randrange((SIZE - n) // 4096 + 1) * 4096
        if not zeroes or rng.random() < 0.8:
            data = rng.randbytes(n)
            hs.pwrite(data, off)
            hq.pwrite(data, off)
            model[off:off + n] = data
        else:
            hs.zero(n, off)
            hq.zero(n, off)
            model[off:off + n] = bytes(n)
    hs.flush()
    hq.flush()


def both(fn):
    return fn(S), fn(Q)


# wrong requests fail on both
for args in ({"sync": "none", "target": "nosuch"},):
    for qmp in (S, Q):
        try:
            qmp.cmd("blockdev-backup", job_id="x", device="disk", **args)
            check(False, "blockdev-backup into a missing node succeeded")
        except QMPError:
            pass
for qmp in (S, Q):
    try:
        qmp.cmd("blockdev-add", driver="snapshot-access", node_name="y", file="nosuch")
        check(False, "snapshot-access over a missing node succeeded")
    except QMPError:
        pass

io(60, zeroes=True)
restored = {}
for k in range(3):
    if k:
        io(30, zeroes=True)
    prev = f"b{k - 1}" if k else None
    at_instant = bytes(model)
    names = {}
    for qmp, x in ((S, ds), (Q, dq)):
        names[qmp], _, _ = bl.backup_start(qmp, "disk", k, os.path.join(x, f"s{k}.qcow2"),
                                           SIZE, prev)
    io(40)  # after the instant, before any read: copied before written
    jobs = both(lambda q: [(j["type"], j["device"], j["status"])
                           for j in q.cmd("query-block-jobs")])
    check(jobs[0] == jobs[1], f"query-block-jobs: strata {jobs[0]}, qsd {jobs[1]}")
    if k == 0:
        got = {q: bl.read_all(uri[q](names[q]), SIZE, between=lambda i: io(3))
               for q in (S, Q)}
        for q in (S, Q):
            restored[q] = got[q]
    else:
        maps = both(lambda q: bl.nbdinfo_map(uri[q](names[q]), prev))
        check(maps[0] == maps[1], f"backup {k}: dirty maps differ:\nstrata:\n{maps[0]}\n"
              f"qsd:\n{maps[1]}")
        check("dirty" in maps[0], f"backup {k}: nothing dirty:\n{maps[0]}")
        for q in (S, Q):
            bl.apply_incremental(uri[q](names[q]), prev, restored[q],
                                 between=lambda i: io(2))
    for q, who in ((S, "strata"), (Q, "qemu-storage-daemon")):
        check(restored[q] == at_instant, f"backup {k} from {who} differs from the disk "
              f"at the instant at {harness.first_diff(restored[q], at_instant)}")
    for qmp in (S, Q):
        bl.backup_end(qmp, "disk", k, prev)
    left = both(lambda q: sorted(b["name"] for n in q.cmd("query-named-block-nodes")
                                 if n["node-name"] == "disk"
                                 for b in n.get("dirty-bitmaps", [])))
    check(left[0] == left[1] == [f"b{k}"], f"bitmaps left: strata {left[0]}, qsd {left[1]}")
    ok(f"backup {k} ({'full' if k == 0 else 'incremental'}): same contents on both, "
       f"= the disk at the instant" + ("" if k == 0 else ", same dirty map"))

live = both(lambda q: bl.read_all(uri[q]("disk"), SIZE))
check(live[0] == live[1] == model, "live disks differ after the backups")
hs.shutdown()
hq.shutdown()
check(s_dmn.stop() == 0, "stratad did not stop cleanly")
jobsutil.check_images([os.path.join(ds, "disk.qcow2")] +
                      [os.path.join(ds, f"s{k}.qcow2") for k in range(3)])
ok("the QEMU 7.2 pull-mode backup sequence gives the same backups and maps on stratad "
   "and qemu-storage-daemon")
