#!/usr/bin/python3
"""kill -9 in the middle of snapshots and commits, many rounds.

Each round restarts stratad from its state file, starts a writer (one
libnbd connection, FUA writes of random data: what is acknowledged is
durable, and at most one write is in doubt at the kill), then starts one
chain change and kills the daemon with SIGKILL after a random delay:

  snapshot              0-8 ms after the command was sent (0-300 ms for
                        a new RBD image);
  intermediate commit   during the copy (rate-limited) or near its end
                        (unlimited: the backing-link rewrite and relink);
  active commit         during the copy, or 0-15 ms after
                        block-job-complete (the pivot).

Then, offline, before the next start: the state file names a top whose
chain qemu-img opens; `qemu-img check` finds no corruption on any layer
(leaked clusters are allowed after a kill); QEMU reads the chain exactly
as the model of acknowledged writes (the one write in doubt may read old
or new data, 4 KiB block by block).

With --rbd (the rbd-crash test) the chain lives on a throw-away Ceph
cluster (cephlib): the base is a qcow2 image in RBD, and each snapshot
creates either a new RBD image or a local file (the export has a backing
root, so both may sit anywhere in the chain).  A kill -9 leaves the dead
daemon's exclusive locks behind; the next daemon's first write takes them
over once the dead client's watch has expired (5 s on this cluster).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-jobs-crash.py [--rbd]
"""
import json
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img")
import jobsutil  # noqa: E402
from jobsutil import MiB, nbd  # noqa: E402

RBD = "--rbd" in sys.argv[1:]
SIZE = 16 * MiB
ROUNDS = int(os.environ.get("ROUNDS", "60"))
BUDGET = float(os.environ.get("BUDGET", "170"))
MIN_ROUNDS = 8 if RBD else 10
SLOW = 10 if RBD else 1      # RBD round trips: kill windows 10 times as long
d = harness.tmpdir()
P = lambda name: os.path.join(d, name)  # noqa: E731
model = jobsutil.make_base(P("base.qcow2"), SIZE, seed=21)
BASE = P("base.qcow2")
EXPORT = f"name=disk,file={BASE},format=qcow2"
if RBD:
    import cephlib  # noqa: E402
    cephlib.start()
    cephlib.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", BASE, "rbd:rbd/base"],
                timeout=60)
    BASE = "rbd:rbd/base"
    EXPORT = f"name=disk,file={BASE},format=qcow2,backing-root={d},backing-remote=rbd:"
ctl = P("ctl.sock")
state = P("state.json")
rng = random.Random(int(os.environ.get("SEED", "7")))


class Writer:
    def __init__(self, uri):
        self.uri = uri
        self.pending = None      # (off, old, new) of the write in flight
        self.acked = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        wr = random.Random(rng.random())
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                off = wr.randrange(SIZE // 4096) * 4096
                n = min(wr.choice((4096, 65536, 262144)), SIZE - off)
                data = wr.randbytes(n)
                self.pending = (off, bytes(model[off:off + n]), data)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA)
                model[off:off + n] = data
                self.pending = None
                self.acked += 1
        except Exception:  # noqa: BLE001  (the daemon was killed)
            pass


def top_from_state():
    doc = json.load(open(state))
    return doc["nodes"][0]["filename"]


def verify(round_no, writer):
    top = top_from_state()
    files = jobsutil.chain_files(top)
    jobsutil.check_images(files, leaks_ok=True)
    data = jobsutil.read_chain(top, SIZE, P("check.raw"))
    if writer.pending:
        off, old, new = writer.pending
        got = data[off:off + len(new)]
        # a write cut by the kill may be torn, block by block (clusters
        # are written separately): each 4 KiB reads old or new
        for i in range(0, len(new), 4096):
            check(got[i:i + 4096] in (old[i:i + 4096], new[i:i + 4096]),
                  f"round {round_no}: the write in doubt at {off}+{i} reads neither "
                  "old nor new data")
        model[off:off + len(new)] = got
    diff = harness.first_diff(data, bytes(model))
    check(diff is None, f"round {round_no}: the chain {files} differs from the "
                        f"acknowledged writes at byte {diff}")
    return files


counter = [0]


def new_name():
    counter[0] += 1
    if RBD and rng.random() < 0.6:
        return f"rbd:rbd/s{counter[0]}"
    return P(f"s{counter[0]}.qcow2")


stats = {}
t_end = time.time() + BUDGET
files = [BASE]
rounds = 0
for rnd in range(ROUNDS):
    # MIN_ROUNDS always, however slow the machine; more while the budget lasts
    if time.time() > t_end and rounds >= MIN_ROUNDS:
        break
    dmn = harness.Daemon([EXPORT], extra=["--control", ctl, "--state-file", state])
    q = QMP(ctl)
    w = Writer(dmn.uri("disk"))
    if RBD:
        # the first write waits for the dead daemon's exclusive lock
        t_lock = time.time() + 30
        while w.acked < 3 and time.time() < t_lock:
            time.sleep(0.01)
        check(w.acked >= 3, f"round {rnd}: no write acknowledged in 30 s after the restart")
    time.sleep(0.05 + rng.random() * 0.1)
    depth = len(files)
    choices = ["snap"] if depth < 5 and rng.random() < 0.6 or depth < 2 else []
    if depth >= 2:
        choices += ["acommit", "acommit-pivot"]
    if depth >= 3:
        choices += ["icommit", "icommit-end"]
    act = rng.choice(choices)
    stats[act] = stats.get(act, 0) + 1
    if act == "snap":
        name = new_name()
        q.send_raw(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": {
            "device": "disk", "snapshot-file": name}}).encode() + b"\n")
        # creating an RBD image takes tens of ms: spread the kill over it
        time.sleep(rng.random() * (0.3 if name.startswith("rbd:") else 0.008))
    elif act.startswith("icommit"):
        top = files[rng.randrange(1, depth - 1)]
        args = {"device": "disk", "job-id": "j", "top": top, "base": files[-1]}
        if act == "icommit":
            args["speed"] = 8 * MiB
        q.cmd("block-commit", **args)
        time.sleep(rng.random() * (0.3 if act == "icommit" else 0.02) * SLOW)
    else:
        base = files[rng.randrange(1, depth)]
        q.cmd("block-commit", device="disk", job_id="j", base=base)
        if act == "acommit":
            time.sleep(rng.random() * 0.05 * SLOW)
        else:
            q.wait_event("BLOCK_JOB_READY", timeout=30)
            q.send_raw(b'{"execute": "block-job-complete", "arguments": {"device": "j"}}\n')
            time.sleep(rng.random() * 0.015 * SLOW)
    dmn.stop(signal.SIGKILL)
    w.stop.set()
    w.t.join(30)
    files = verify(rnd, w)
    rounds += 1
    print(f"     round {rnd}: {act:14s} {w.acked:4d} writes acknowledged; chain now "
          f"{' <- '.join(os.path.basename(f) for f in files)}"
          f" ({time.time() - harness.T0:.0f} s)", flush=True)
check(rounds >= MIN_ROUNDS, f"only {rounds} rounds (ROUNDS={ROUNDS} is below {MIN_ROUNDS})")
ok(f"{rounds} rounds of kill -9 ({', '.join(f'{k} {v}' for k, v in sorted(stats.items()))}): "
   "every time the state file named a valid chain, qemu-img check found no corruption, "
   "and the content was exactly what was acknowledged")

# the daemon starts on what is left and serves the same data
dmn = harness.Daemon([EXPORT], extra=["--control", ctl, "--state-file", state])
data = jobsutil.nbd_read_all(dmn.uri("disk"), SIZE)
check(data == bytes(model), "served data after the last restart")
check(dmn.stop() == 0, "exit status")
ok("a last restart serves the acknowledged data")
print("PASS")
