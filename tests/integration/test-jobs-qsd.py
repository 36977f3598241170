#!/usr/bin/python3
"""The same snapshot / commit sequence against stratad and against
qemu-storage-daemon, on copies of one qcow2 image, with the same NBD
writes in between:

  W1, snapshot s1, W2, snapshot s2, W3, intermediate commit s1 -> base,
  W4, active commit s2 -> base (W5 while it is ready), complete, W6

Both must accept every command, end on the same chain shape (base.qcow2
alone), and leave byte-identical guest disks (over NBD, and offline with
qemu-img compare); qemu-img check is clean on every image of both.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-jobs-qsd.py
"""
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "qemu-storage-daemon")
import jobsutil  # noqa: E402
from jobsutil import MiB  # noqa: E402

SIZE = 32 * MiB
d = harness.tmpdir()
ds, dq = os.path.join(d, "strata"), os.path.join(d, "qsd")
os.mkdir(ds)
os.mkdir(dq)
jobsutil.make_base(os.path.join(d, "base.qcow2"), SIZE, seed=9)
for x in (ds, dq):
    shutil.copyfile(os.path.join(d, "base.qcow2"), os.path.join(x, "base.qcow2"))

s_ctl = os.path.join(d, "s-ctl.sock")
s_dmn = harness.Daemon([f"name=disk,file={ds}/base.qcow2,format=qcow2"],
                       extra=["--control", s_ctl])
q_ctl = os.path.join(d, "q-ctl.sock")
q_nbd = os.path.join(d, "q-nbd.sock")
q_proc = harness.start_qsd(q_ctl, q_nbd, [
    "--blockdev", f"driver=file,filename={dq}/base.qcow2,node-name=f0",
    "--blockdev", "driver=qcow2,file=f0,node-name=n0",
    "--export", "type=nbd,id=exp0,node-name=n0,name=disk,writable=on"])

S = QMP(s_ctl)
Q = QMP(q_ctl)
hs = jobsutil.nbd.NBD()
hs.connect_uri(s_dmn.uri("disk"))
hq = jobsutil.nbd.NBD()
hq.connect_uri(f"nbd+unix:///disk?socket={q_nbd}")
rng = random.Random(3)


def writes(count):
    """The same writes (and write-zeroes) through both."""
    for _ in range(count):
        off = rng.randrange(SIZE // 4096) * 4096
        n = min(rng.choice((4096, 65536, 262144)), SIZE - off)
        if rng.random() < 0.85:
            data = rng.randbytes(n)
            hs.pwrite(data, off)
            hq.pwrite(data, off)
        else:
            hs.zero(n, off)
            hq.zero(n, off)
    hs.flush()
    hq.flush()


def both(name, s_args, q_args):
    rs = S.cmd(name, **s_args)
    rq = Q.cmd(name, **q_args)
    return rs, rq


def wait_both(event, sid, qid, timeout=60):
    es = S.wait_event(event, timeout=timeout, match=lambda x: x.get("device") == sid)
    eq = Q.wait_event(event, timeout=timeout, match=lambda x: x.get("device") == qid)
    for e in (es, eq):
        check("error" not in e["data"], f"{event}: {e}")
    return es, eq


writes(200)
both("blockdev-snapshot-sync",
     dict(device="disk", snapshot_file=f"{ds}/s1.qcow2", format="qcow2"),
     dict(node_name="n0", snapshot_file=f"{dq}/s1.qcow2", snapshot_node_name="sn1",
          format="qcow2"))
writes(200)
both("blockdev-snapshot-sync",
     dict(device="disk", snapshot_file=f"{ds}/s2.qcow2", format="qcow2"),
     dict(node_name="sn1", snapshot_file=f"{dq}/s2.qcow2", snapshot_node_name="sn2",
          format="qcow2"))
writes(200)
ok("W1, snapshot s1, W2, snapshot s2, W3: both accepted")

both("block-commit",
     dict(device="disk", job_id="ic", top=f"{ds}/s1.qcow2", base=f"{ds}/base.qcow2"),
     dict(device="sn2", job_id="ic", top=f"{dq}/s1.qcow2", base=f"{dq}/base.qcow2"))
wait_both("BLOCK_JOB_COMPLETED", "ic", "ic")
for x in (ds, dq):
    got = [os.path.basename(f) for f in jobsutil.chain_files(f"{x}/s2.qcow2")]
    check(got == ["s2.qcow2", "base.qcow2"], f"{x}: chain after the intermediate commit: {got}")
writes(200)
ok("intermediate commit s1 -> base: both completed, both chains s2 <- base; W4")

both("block-commit", dict(device="disk", job_id="ac", base=f"{ds}/base.qcow2"),
     dict(device="sn2", job_id="ac", base=f"{dq}/base.qcow2"))
wait_both("BLOCK_JOB_READY", "ac", "ac")
writes(200)
both("block-job-complete", dict(device="ac"), dict(device="ac"))
wait_both("BLOCK_JOB_COMPLETED", "ac", "ac")
writes(200)
ok("active commit s2 -> base: both ready, W5 while ready, complete, both completed; W6")

a = jobsutil.nbd_read_all(s_dmn.uri("disk"), SIZE)
b = jobsutil.nbd_read_all(f"nbd+unix:///disk?socket={q_nbd}", SIZE)
diff = harness.first_diff(a, b)
check(diff is None, f"guest disks differ over NBD at byte {diff}")
ok("the guest disks are byte-identical over NBD")

hs.shutdown()
hq.shutdown()
S.cmd("quit")
Q.execute("quit")
q_proc.wait(15)
s_dmn.proc.wait(15)
check(s_dmn.proc.returncode == 0, "stratad exit status after quit")
for x in (ds, dq):
    jobsutil.check_images([f"{x}/{n}" for n in ("base.qcow2", "s1.qcow2", "s2.qcow2")])
    got = [os.path.basename(f) for f in jobsutil.chain_files(f"{x}/base.qcow2")]
    check(got == ["base.qcow2"], f"{x}: final chain {got}")
p = jobsutil.qimg("compare", f"{ds}/base.qcow2", f"{dq}/base.qcow2")
check(p.returncode == 0, f"qemu-img compare: {p.stdout}{p.stderr}")
ok("offline: both final chains are base.qcow2 alone, qemu-img check clean on all six "
   "images, qemu-img compare finds them identical")
print("PASS")
