#!/usr/bin/python3
"""The QMP transaction: snapshots of two exports and bitmap changes at one
instant, all or nothing.

1. Under a FUA writer on both disks (half its writes to a few hot blocks,
   so that blocks are written again, in place and into new overlays):
   [disable b0 on d1 and d2, snapshot d1 and d2, add b1 on each new top]
   succeeds; each old top keeps b0 (disabled), each new top has b1
   (recording); the writer saw no error and every byte it wrote reads
   back.
2. A transaction whose last action fails (after a snapshot, a clear, a
   disable, a merge, an add and a remove) changes nothing: same chains,
   no overlay file left, same bitmaps with the same bits; the error is the
   failing action's own.
3. The same failing transaction on qemu-storage-daemon: same message,
   nothing changed there either.
4. kill -9 at random instants of a transaction with snapshots and a
   persistent bitmap (6 rounds): on restart from the state file the chain
   opens, qemu-img check finds no corruption, every acknowledged write is
   there, and the bitmap is either absent, consistent, or inconsistent.
   The write in flight at the kill was not acknowledged: its block may
   hold its data or the last acknowledged data, nothing else (with the hot
   blocks, that write often covers one acknowledged earlier).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-bitmaps-transaction.py
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, QMPError, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "qemu-storage-daemon")
import jobsutil  # noqa: E402
from jobsutil import MiB, qimg  # noqa: E402

SIZE = 16 * MiB
HOT = 32  # blocks [0, HOT) of each disk take half the writes
d = harness.tmpdir()
ctl = os.path.join(d, "ctl.sock")
state = os.path.join(d, "state.json")
for x in ("d1", "d2"):
    check(qimg("create", "-f", "qcow2", os.path.join(d, f"{x}.qcow2"), str(SIZE)).returncode == 0,
          "create")


def start():
    return harness.Daemon([f"name={x},file={d}/{x}.qcow2,format=qcow2" for x in ("d1", "d2")],
                          extra=["--control", ctl, "--state-file", state])


def bitmaps(S):
    return {n["node-name"]: sorted((b["name"], b["recording"], b["count"])
                                   for b in n.get("dirty-bitmaps", []))
            for n in S.cmd("query-named-block-nodes", flat=True)}


def chain(S):
    return {n["node-name"]: n["file"] for n in S.cmd("query-named-block-nodes", flat=True)}


class Writer:
    """FUA writes to both disks from a thread, one at a time; the model of
    what was acknowledged, and the write sent but not acknowledged (the
    one in flight when the daemon dies)."""

    def __init__(self, dm):
        self.h = {}
        for x in ("d1", "d2"):
            h = jobsutil.nbd.NBD()
            h.connect_uri(dm.uri(x))
            self.h[x] = h
        self.model = {x: {} for x in ("d1", "d2")}
        self.pending = None
        self.errors = []
        self.stop_ = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.rng = random.Random(4)

    def run(self):
        while not self.stop_:
            x = self.rng.choice(("d1", "d2"))
            # Half the writes go to a few hot blocks: overwrites of
            # acknowledged blocks, in place or into a new overlay, and a
            # write in flight at a kill that often covers one.
            hot = self.rng.random() < 0.5
            blk = self.rng.randrange(HOT if hot else SIZE // 4096)
            data = bytes([self.rng.randrange(1, 256)]) * 4096
            self.pending = (x, blk, data)
            try:
                self.h[x].pwrite(data, blk * 4096, jobsutil.nbd.CMD_FLAG_FUA)
            except Exception as e:  # noqa: BLE001
                self.errors.append(str(e))
                return
            self.model[x][blk] = data
            self.pending = None

    def start(self):
        self.t.start()

    def stop(self):
        self.stop_ = True
        self.t.join(30)

    def verify(self):
        for x, m in self.model.items():
            for blk, data in m.items():
                check(self.h[x].pread(4096, blk * 4096) == data, f"{x} block {blk} lost")


dm = start()
S = QMP(ctl)
for x in ("d1", "d2"):
    S.cmd("block-dirty-bitmap-add", node=x, name="b0")
w = Writer(dm)
w.start()
time.sleep(0.3)
S.cmd("transaction", actions=[
    {"type": "block-dirty-bitmap-disable", "data": {"node": "d1", "name": "b0"}},
    {"type": "block-dirty-bitmap-disable", "data": {"node": "d2", "name": "b0"}},
    {"type": "blockdev-snapshot-sync", "data": {"device": "d1",
                                                 "snapshot-file": f"{d}/d1-s1.qcow2"}},
    {"type": "blockdev-snapshot-sync", "data": {"device": "d2",
                                                 "snapshot-file": f"{d}/d2-s1.qcow2"}},
    {"type": "block-dirty-bitmap-add", "data": {"node": "d1", "name": "b1"}},
    {"type": "block-dirty-bitmap-add", "data": {"node": "d2", "name": "b1"}},
])
time.sleep(0.3)
w.stop()
check(not w.errors, f"the writer failed: {w.errors}")
bm = bitmaps(S)
for x in ("d1", "d2"):
    check([b[:2] for b in bm[f"{x}.backing"]] == [("b0", False)], f"{x}.backing: {bm}")
    check([b[:2] for b in bm[x]] == [("b1", True)] and bm[x][0][2] > 0, f"{x}: {bm}")
    check(chain(S)[x].endswith(f"{x}-s1.qcow2"), f"{x}'s new top")
w.verify()
ok("a transaction snapshots two exports and moves their bitmaps at one "
   "instant, under FUA writes to both")

# ---- 2. all or nothing ----
S.cmd("block-dirty-bitmap-add", node="d1", name="m")
before_bm, before_chain = bitmaps(S), chain(S)
before_state = open(state).read()
cls, desc = S.error("transaction", actions=[
    {"type": "blockdev-snapshot-sync", "data": {"device": "d1",
                                                 "snapshot-file": f"{d}/d1-s2.qcow2"}},
    {"type": "block-dirty-bitmap-clear", "data": {"node": "d2", "name": "b1"}},
    {"type": "block-dirty-bitmap-disable", "data": {"node": "d2", "name": "b1"}},
    {"type": "block-dirty-bitmap-merge", "data": {"node": "d1.backing", "target": "m",
                                                   "bitmaps": ["b1"]}},
    {"type": "block-dirty-bitmap-add", "data": {"node": "d1", "name": "x"}},
    {"type": "block-dirty-bitmap-remove", "data": {"node": "d1.backing.backing", "name": "b0"}},
    {"type": "block-dirty-bitmap-add", "data": {"node": "d2", "name": "b1"}},
])
check(desc == "Bitmap already exists: b1", f"the failing action's message: {desc}")
check(bitmaps(S) == before_bm, f"bitmaps changed:\n{before_bm}\n{bitmaps(S)}")
check(chain(S) == before_chain, "chain changed")
check(not os.path.exists(f"{d}/d1-s2.qcow2"), "the overlay file is gone")
check(json.loads(open(state).read()) == json.loads(before_state), "state file changed")
for bad in ([{"type": "nope", "data": {}}],
            [{"type": "block-dirty-bitmap-add", "data": {"node": "d1"}}],
            [{"type": "blockdev-snapshot-sync", "data": {"device": "zz",
                                                         "snapshot-file": f"{d}/z"}}]):
    S.error("transaction", actions=bad)
check(bitmaps(S) == before_bm and chain(S) == before_chain, "bad actions changed nothing")
ok("a failing transaction changes nothing: chains, files, bitmaps and bits, "
   "state file; the error is the failing action's")

# ---- 3. the same refusal on qemu-storage-daemon ----
q_ctl, q_nbd = os.path.join(d, "q.sock"), os.path.join(d, "qn.sock")
check(qimg("create", "-f", "qcow2", f"{d}/q.qcow2", str(SIZE)).returncode == 0, "create q")
harness.start_qsd(q_ctl, q_nbd, ["--blockdev", f"driver=file,filename={d}/q.qcow2,node-name=qf",
                                 "--blockdev", "driver=qcow2,file=qf,node-name=d1"])
Q = QMP(q_ctl)
for qmp in (S, Q):
    qmp.cmd("block-dirty-bitmap-add", node="d1", name="t0")
acts = [{"type": "block-dirty-bitmap-add", "data": {"node": "d1", "name": "t1"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "d1", "name": "t0"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "d1", "name": "t0"}}]
errs = [qmp.error("transaction", actions=acts)[1] for qmp in (S, Q)]
check(errs[0] == errs[1], f"messages: {errs}")
qn = [n for n in Q.cmd("query-named-block-nodes") if n["node-name"] == "d1"][0]
check([(b["name"], b["recording"]) for b in qn["dirty-bitmaps"]] == [("t0", True)], f"qsd: {qn}")
check([b[:2] for b in bitmaps(S)["d1"] if b[0].startswith("t")] == [("t0", True)],
      "strata: t0 recording, no t1")
ok("qemu-storage-daemon refuses the same transaction with the same message, "
   "and changes nothing either")
S.close()
dm.stop()

# ---- 4. kill -9 during a transaction ----
rng = random.Random(12)
seen = {"absent": 0, "consistent": 0, "inconsistent": 0}
landed = 0  # rounds whose write in flight, over an acknowledged block, landed
for rnd in range(6):
    dm = start()
    S = QMP(ctl)
    w = Writer(dm)
    w.rng = random.Random(rnd)
    w.start()
    time.sleep(0.1)
    tops = chain(S)
    acts = [{"type": "blockdev-snapshot-sync",
             "data": {"device": x, "snapshot-file": f"{d}/{x}-k{rnd}.qcow2"}} for x in ("d1", "d2")]
    acts.append({"type": "block-dirty-bitmap-add",
                 "data": {"node": "d1", "name": f"p{rnd}", "persistent": True}})
    S.send_raw(json.dumps({"execute": "transaction", "arguments": {"actions": acts}}).encode() + b"\n")
    time.sleep(rng.uniform(0, 0.15))
    dm.proc.send_signal(signal.SIGKILL)
    dm.proc.wait()
    w.stop()
    dm = start()
    S = QMP(ctl)
    w2h = {}
    for x in ("d1", "d2"):
        h = jobsutil.nbd.NBD()
        h.connect_uri(dm.uri(x))
        w2h[x] = h
    for x, m in w.model.items():
        for blk, data in m.items():
            got = w2h[x].pread(4096, blk * 4096)
            if got != data and w.pending and w.pending[:2] == (x, blk) and got == w.pending[2]:
                landed += 1  # the unacknowledged write over it reached the file
                continue
            check(got == data, f"round {rnd}: {x} block {blk} lost")
    top = chain(S)["d1"]
    p = [b for n in S.cmd("query-named-block-nodes") for b in n.get("dirty-bitmaps", [])
         if b["name"] == f"p{rnd}"]
    if not p:
        seen["absent"] += 1
    elif p[0].get("inconsistent"):
        seen["inconsistent"] += 1
    else:
        seen["consistent"] += 1
    S.close()
    dm.stop()
    for f in jobsutil.chain_files(top):
        p2 = qimg("check", f)
        check(p2.returncode in (0, 3), f"round {rnd}: qemu-img check {f}: {p2.stdout}")
ok(f"kill -9 during transactions (6 rounds): chains open from the state file, "
   f"clean, every acknowledged write there; the persistent bitmap {seen}; "
   f"an unacknowledged write over an acknowledged block landed {landed} time(s)")
