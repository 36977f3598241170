#!/usr/bin/python3
"""Dirty bitmaps over QMP, side by side with qemu-storage-daemon: the same
block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge commands
(valid ones and wrong ones) and the same NBD writes, write-zeroes and
trims on copies of one qcow2 image must give the same answers, the same
error messages and the same BlockDirtyInfo lists (name, granularity,
count, recording, busy, persistent) in query-named-block-nodes; then an
external snapshot, after which both keep the bitmaps on the node they
were created on (which stops recording: the writes go to the overlay).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-bitmaps-qmp.py
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
harness.need("qemu-img", "qemu-storage-daemon")
import jobsutil  # noqa: E402
from jobsutil import MiB  # noqa: E402

SIZE = 32 * MiB
d = harness.tmpdir()
ds, dq = os.path.join(d, "strata"), os.path.join(d, "qsd")
for x in (ds, dq):
    os.mkdir(x)
jobsutil.make_base(os.path.join(d, "base.qcow2"), SIZE, seed=5)
for x in (ds, dq):
    shutil.copyfile(os.path.join(d, "base.qcow2"), os.path.join(x, "disk.qcow2"))
    harness.make_file(os.path.join(x, "r.raw"), SIZE)
    harness.make_file(os.path.join(x, "small.raw"), SIZE // 2)

s_ctl = os.path.join(d, "s-ctl.sock")
s_dmn = harness.Daemon([f"name=disk,file={ds}/disk.qcow2,format=qcow2"],
                       extra=["--control", s_ctl])
q_ctl = os.path.join(d, "q-ctl.sock")
q_nbd = os.path.join(d, "q-nbd.sock")
harness.start_qsd(q_ctl, q_nbd, [
    "--blockdev", f"driver=file,filename={dq}/disk.qcow2,node-name=disk-file,discard=unmap",
    "--blockdev", "driver=qcow2,file=disk-file,node-name=disk,discard=unmap",
    "--export", "type=nbd,id=disk,node-name=disk,name=disk,writable=on"])
S = QMP(s_ctl)
Q = QMP(q_ctl)
for qmp, x in ((S, ds), (Q, dq)):
    for node, f in (("raw", "r.raw"), ("small", "small.raw")):
        qmp.cmd("blockdev-add", driver="raw", node_name=node,
                file={"driver": "file", "filename": f"{x}/{f}"})

hs = jobsutil.nbd.NBD()
hs.connect_uri(s_dmn.uri("disk"))
hq = jobsutil.nbd.NBD()
hq.connect_uri(f"nbd+unix:///disk?socket={q_nbd}")
rng = random.Random(11)


def io(count):
    """The same writes, write-zeroes and trims through both."""
    for _ in range(count):
        off = rng.randrange(SIZE // 4096) * 4096
        n = min(rng.choice((4096, 65536, 200704)), SIZE - off)
        p = rng.random()
        if p < 0.7:
            data = rng.randbytes(n)
            hs.pwrite(data, off)
            hq.pwrite(data, off)
        elif p < 0.85:
            hs.zero(n, off)
            hq.zero(n, off)
        else:
            hs.trim(n, off)
            hq.trim(n, off)
    hs.flush()
    hq.flush()


def same(cmd, /, **args):
    """Runs a command on both; both must succeed, or both fail with the
    same class and message.  Returns the outcome."""
    out = []
    for qmp in (S, Q):
        try:
            out.append(("ok", qmp.cmd(cmd, **args)))
        except QMPError as e:
            out.append(("error", e.cls, e.desc))
    check(out[0][0] == out[1][0] and (out[0][0] == "ok" or out[0][1:] == out[1][1:]),
          f"{cmd} {args}: strata {out[0]}, qemu-storage-daemon {out[1]}")
    return out[0]


def bitmaps(qmp, node):
    for n in qmp.cmd("query-named-block-nodes", flat=True):
        if n["node-name"] == node:
            return sorted(n.get("dirty-bitmaps", []), key=lambda b: b["name"])
    harness.fail(f"no node {node}")


def same_bitmaps(node_s, node_q=None, what=""):
    bs, bq = bitmaps(S, node_s), bitmaps(Q, node_q or node_s)
    check(bs == bq, f"{what}: bitmaps of {node_s}:\n strata {bs}\n qsd    {bq}")
    return bs


# ---- add, and its errors ----
check(same("block-dirty-bitmap-add", node="disk", name="b0")[0] == "ok", "add b0")
for args in (dict(node="disk", name="b0"),                 # exists
             dict(node="nope", name="x"),                  # no node
             dict(node="disk", name=""),                   # empty name
             dict(node="disk", name="g", granularity=100),  # not a power of 2
             dict(node="disk", name="g", granularity=256),  # too small
             dict(node="disk", name="g", granularity=1 << 32),  # not a uint32
             dict(node="raw", name="p", persistent=True),   # raw cannot store
             dict(node="disk", name="n" * 1024)):           # name too long
    check(same("block-dirty-bitmap-add", **args)[0] == "error", f"add {args} fails")
same("block-dirty-bitmap-add", node="disk", name="big", granularity=1 << 31)
same("block-dirty-bitmap-add", node="disk", name="fine", granularity=512)
same("block-dirty-bitmap-add", node="disk", name="off", disabled=True)
same("block-dirty-bitmap-add", node="disk", name="pers", persistent=True)
check(same("block-dirty-bitmap-add", node="disk", name="pers2", persistent=True,
           granularity=100)[0] == "error", "persistent with a bad granularity")
same("block-dirty-bitmap-add", node="raw", name="rb", granularity=4096)
same("block-dirty-bitmap-add", node="small", name="sb")
same_bitmaps("disk", what="after add")
ok("block-dirty-bitmap-add: same successes, same errors, same lists")

io(150)
got = same_bitmaps("disk", what="after writes")
check(all(b["count"] > 0 for b in got if b["recording"]), f"writes marked: {got}")
check([b["count"] for b in got if b["name"] == "off"] == [0], f"disabled stays clean: {got}")
ok("writes, zeroes and trims mark every recording bitmap alike (counts equal)")

# ---- the other commands, and their errors ----
for cmd in ("remove", "clear", "enable", "disable"):
    for args in (dict(node="disk", name="zz"), dict(node="nope", name="b0")):
        check(same(f"block-dirty-bitmap-{cmd}", **args)[0] == "error", f"{cmd} {args}")
same("block-dirty-bitmap-disable", node="disk", name="b0")
same("block-dirty-bitmap-enable", node="disk", name="off")
io(60)
same_bitmaps("disk", what="after disable b0 / enable off")
same("block-dirty-bitmap-clear", node="disk", name="fine")
same_bitmaps("disk", what="after clear")
for bl in (["zz"], [{"node": "raw", "name": "zz"}], [{"node": "qq", "name": "x"}],
           [{"node": "small", "name": "sb"}], ["b0", "zz"]):
    check(same("block-dirty-bitmap-merge", node="disk", target="fine", bitmaps=bl)[0]
          == "error", f"merge {bl} fails")
same("block-dirty-bitmap-merge", node="disk", target="zz", bitmaps=["b0"])
same_bitmaps("disk", what="after failed merges (nothing changed)")
same("block-dirty-bitmap-merge", node="disk", target="fine",
     bitmaps=["b0", "off", {"node": "disk", "name": "big"}])
same("block-dirty-bitmap-merge", node="raw", target="rb", bitmaps=[{"node": "disk", "name": "b0"}])
same_bitmaps("disk", what="after merges")
same_bitmaps("raw", what="after the cross-node merge")
same("block-dirty-bitmap-remove", node="disk", name="big")
same_bitmaps("disk", what="after remove")
ok("remove, clear, enable, disable, merge (granularities mixed, across nodes, "
   "all or nothing): same answers and lists")

# ---- across an external snapshot: the bitmaps stay on their node ----
S.cmd("blockdev-snapshot-sync", device="disk", snapshot_file=f"{ds}/s1.qcow2", format="qcow2")
Q.cmd("blockdev-snapshot-sync", node_name="disk", snapshot_file=f"{dq}/s1.qcow2",
      snapshot_node_name="top", format="qcow2")
before = same_bitmaps("disk.backing", "disk", what="after the snapshot")
io(60)
after = same_bitmaps("disk.backing", "disk", what="writes after the snapshot")
check(before == after, "the old top's bitmaps no longer change")
check(bitmaps(S, "disk") == [] and bitmaps(Q, "top") == [], "the overlay has no bitmap")
same("block-dirty-bitmap-add", node="disk", name="new")  # strata's top is "disk"
Q.cmd("block-dirty-bitmap-remove", node="disk", name="new")
Q.cmd("block-dirty-bitmap-add", node="top", name="new")
io(40)
check(bitmaps(S, "disk") == bitmaps(Q, "top"), "a bitmap on the overlay records alike")
ok("snapshot: bitmaps stay on the node they were created on, the overlay's record")

# query-block lists them too (strata: per export)
qb = S.cmd("query-block")
check(qb and qb[0]["inserted"].get("dirty-bitmaps") == bitmaps(S, "disk"),
      f"query-block: {qb}")
ok("query-block lists the exported node's bitmaps")
