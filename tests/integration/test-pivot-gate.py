#!/usr/bin/env python3
"""pivot-gate: an active commit's pivot syncs base outside its quiesce,
and FLUSH and FUA replies wait until the state file names base.

The pivot flushes base while the guest goes on, then, quiesced, copies
the last dirty chunks and switches the export to base, and only after
the quiesce flushes base again and saves the state file naming it.  With
the fault-injection build's `hold` (x-debug-fault-inject error "hold": a
backend operation waits until the plan is replaced), each round holds
the pivot's first flush of base (plain writes go on meanwhile, mirrored
into base, so that base has something to sync after the switch), then
its second one:

  1. while the second flush of base is held: plain writes (on base now)
     and reads complete and read back; a FLUSH and a FUA write get no
     reply (their replies wait until base is durable and named); the
     state file still names the old top.  A pivot that synced base
     under its quiesce fails here (the writes wait for the held sync).
     Released, the FLUSH and the FUA write succeed, the job completes,
     the state file names base, and after kill -9 QEMU reads exactly
     what was written;
  2. the same, but kill -9 while the flush is held: the state file names
     the old top, whose chain qemu-img check finds clean (leaks allowed),
     and every write acknowledged as durable (FUA, or before a completed
     FLUSH) reads back; each block written without a FLUSH since reads
     as one of the values it had;
  3. kill -9 before each backend write or sync from the release of the
     first flush to the end of the job (the final copy, the switch, the
     flush of base, the flush of the old top), one step per round, until
     a round's job completes: every time the state file names a chain
     that qemu-img check finds clean holding every durable write.

Needs a build with -Dfault_injection=true (skips otherwise).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, QMP, check, ok  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img")

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 4 * KiB
MAX_STEPS = 80
SEED = int(os.environ.get("STRATA_SEED", "20261203"))
print(f"seed: {SEED} (STRATA_SEED={SEED} to replay)")
rng = random.Random(SEED)
WORK = harness.tmpdir()
P = lambda name: os.path.join(WORK, name)  # noqa: E731


def qimg(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                          timeout=120)


BASE0 = P("base0.qcow2")
BASE_DATA = bytearray(SIZE)
for mb in range(SIZE // MiB):
    if rng.random() < 0.5:
        BASE_DATA[mb * MiB:(mb + 1) * MiB] = rng.randbytes(MiB)
with open(P("base0.raw"), "wb") as f:
    f.write(BASE_DATA)
p = qimg("convert", "-f", "raw", "-O", "qcow2", P("base0.raw"), BASE0)
check(p.returncode == 0, p.stderr)


class Model:
    """What the disk must read: `durable` (acknowledged with FUA or before
    a completed FLUSH) and, for blocks written since the last FLUSH,
    every value they had since (a crash may leave any of them)."""

    def __init__(self):
        self.durable = bytearray(BASE_DATA)
        self.now = bytearray(BASE_DATA)
        self.maybe = {}     # block -> [values written since the last FLUSH]

    def wrote(self, off, data, fua=False):
        self.now[off:off + len(data)] = data
        for i in range(0, len(data), BLOCK):
            b = (off + i) // BLOCK
            blk = data[i:i + BLOCK]
            if fua:
                # durable now; an earlier unflushed value may not survive
                # either way, so the block reads exactly this
                self.durable[b * BLOCK:(b + 1) * BLOCK] = blk
                self.maybe.pop(b, None)
            else:
                self.maybe.setdefault(b, []).append(blk)

    def flushed(self):
        self.durable[:] = self.now
        self.maybe.clear()

    def verify(self, got, what):
        check(len(got) == SIZE, f"{what}: {len(got)} bytes, want {SIZE}")
        for b in range(SIZE // BLOCK):
            have = got[b * BLOCK:(b + 1) * BLOCK]
            old = bytes(self.durable[b * BLOCK:(b + 1) * BLOCK])
            if have == old:
                continue
            check(have in self.maybe.get(b, ()),
                  f"{what}: block {b} reads neither its durable content nor "
                  "a value written since the last FLUSH")


class Round:
    """A fresh base (a copy of BASE0) under a fresh overlay, a daemon with
    a state file, a control socket and two NBD connections."""

    def __init__(self, tag):
        self.tag = tag
        self.base = P(f"base-{tag}.qcow2")
        self.top = P(f"top-{tag}.qcow2")
        self.state = P(f"state-{tag}.json")
        shutil.copyfile(BASE0, self.base)
        r = qimg("create", "-q", "-f", "qcow2", "-b", self.base, "-F", "qcow2",
                 self.top)
        check(r.returncode == 0, r.stderr)
        self.ctl = P("ctl.sock")
        if os.path.exists(self.ctl):
            os.unlink(self.ctl)
        self.d = Daemon([f"name=disk,file={self.top},format=qcow2"],
                        extra=["--control", self.ctl, "--state-file", self.state,
                               "-v"])
        self.q = QMP(self.ctl, timeout=60)
        self.c = Conn(self.d.sock, timeout=30)
        self.c.handshake("disk")
        self.c2 = Conn(self.d.sock, timeout=30)
        self.c2.handshake("disk")
        self.cookie = 1
        self.m = Model()

    def next_cookie(self):
        self.cookie += 1
        return self.cookie

    def write(self, off, data, fua=False):
        e = self.c.simple_cmd(w.CMD_WRITE, self.next_cookie(), off, len(data),
                              w.CMD_FLAG_FUA if fua else 0, data)
        check(e == 0, f"{self.tag}: write at {off}: error {e}")
        self.m.wrote(off, data, fua)

    def writes(self, n, fua=False):
        for _ in range(n):
            off = rng.randrange(SIZE // BLOCK) * BLOCK
            ln = min(rng.choice((1, 1, 4, 16)) * BLOCK, SIZE - off)
            self.write(off, rng.randbytes(ln), fua)

    def read_check(self, n):
        for _ in range(n):
            off = rng.randrange(SIZE // BLOCK - 16) * BLOCK
            data, err = self.c.read(self.next_cookie(), off, 16 * BLOCK)
            check(err == 0, f"{self.tag}: read at {off}: error {err}")
            check(data == bytes(self.m.now[off:off + 16 * BLOCK]),
                  f"{self.tag}: read at {off} differs from what was written")

    def flush(self):
        e = self.c.simple_cmd(w.CMD_FLUSH, self.next_cookie())
        check(e == 0, f"{self.tag}: FLUSH: error {e}")
        self.m.flushed()

    def ready(self):
        """Data in top, an active commit into base, ready (mirroring)."""
        self.writes(24)
        self.flush()
        self.writes(8)
        self.q.cmd("block-commit", device="disk", job_id="c")
        self.q.wait_event("BLOCK_JOB_READY", timeout=60,
                          match=lambda x: x["device"] == "c")
        # mirrored into base by the guest's own requests
        self.writes(16, fua=True)
        self.writes(16)

    def wait_fired(self, what):
        t_end = time.time() + 60
        while time.time() < t_end:
            st = self.q.cmd("x-debug-fault-query")
            if st["fired"]:
                return
            check(self.d.alive(), f"{self.tag}: stratad died waiting for {what}")
            time.sleep(0.01)
        check(False, f"{self.tag}: {what} did not happen within 60 s")

    def hold_first_flush(self):
        """block-job-complete with the pivot's first flush of base held;
        plain writes meanwhile (mirrored into base: its second flush has
        something to sync)."""
        self.q.cmd("x-debug-fault-inject", ops=["flush"], nth=1, error="hold")
        self.q.cmd("block-job-complete", device="c")
        self.wait_fired("the pivot's first flush of base")
        self.writes(16)

    def state_top(self):
        with open(self.state) as f:
            return json.load(f)["nodes"][0]["filename"]

    def kill_verify(self, what, want_top=None):
        if self.d.alive():
            self.d.proc.send_signal(signal.SIGKILL)
        try:
            self.d.proc.wait(30)
        except subprocess.TimeoutExpired:
            check(False, f"{what}: stratad still runs after the kill")
        check(self.d.proc.returncode == -signal.SIGKILL,
              f"{what}: stratad exited with {self.d.proc.returncode}, not by "
              f"SIGKILL:\n{self.d.logtext()[-3000:]}")
        for x in (self.c, self.c2, self.q):
            try:
                x.close()
            except OSError:
                pass
        top = self.state_top()
        check(top in (self.top, self.base), f"{what}: the state file names {top}")
        if want_top:
            check(top == want_top, f"{what}: the state file names {top}, not "
                  f"{want_top}")
        for f in ([self.top, self.base] if top == self.top else [self.base]):
            r = qimg("check", f)
            check(r.returncode in (0, 3), f"{what}: qemu-img check {f}: rc "
                  f"{r.returncode}\n{r.stdout}{r.stderr}")
        out = P("check.raw")
        r = qimg("convert", "-U", "-O", "raw", top, out)
        check(r.returncode == 0, f"{what}: qemu-img convert {top}: {r.stderr}")
        with open(out, "rb") as f:
            self.m.verify(f.read(), what)
        return os.path.basename(top)


def require_fault_injection():
    r = Round("probe")
    res = r.q.execute("x-debug-fault-query")
    r.d.stop()
    if "error" in res:
        harness.skip("stratad was built without fault injection "
                     "(meson setup -Dfault_injection=true)")


require_fault_injection()


def held_round(kill):
    tag = "held-kill" if kill else "held"
    r = Round(tag)
    r.ready()
    r.hold_first_flush()
    # release the first flush, hold the next: base's sync after the switch
    r.q.cmd("x-debug-fault-inject", ops=["flush"], nth=1, error="hold")
    r.wait_fired("the pivot's second flush of base")
    # plain writes and reads go on (on base now) ...
    try:
        r.writes(24)
        r.read_check(8)
    except (TimeoutError, OSError) as ex:
        check(False, f"{tag}: a plain write or read waited for base's held "
              f"sync ({ex!r}): the pivot syncs base while requests wait")
    jobs = r.q.cmd("query-block-jobs")
    check(len(jobs) == 1, f"{tag}: the job ended while base's sync is held: {jobs}")
    # ... a FLUSH and a FUA write are not answered ...
    fl = r.next_cookie()
    r.c2.request(w.CMD_FLUSH, fl)
    fua_off = rng.randrange(SIZE // BLOCK) * BLOCK
    fua_data = rng.randbytes(BLOCK)
    fw = r.next_cookie()
    r.c.write(fw, fua_off, fua_data, w.CMD_FLAG_FUA)
    check(r.c2.pending(0.5) == b"", f"{tag}: a FLUSH was answered before base "
          "was durable and named in the state file")
    check(r.c.pending(0.1) == b"", f"{tag}: a FUA write was answered before "
          "base was durable and named in the state file")
    # ... and the state file names the old top
    check(r.state_top() == r.top, f"{tag}: the state file names "
          f"{r.state_top()} while base's sync is held")
    ok(f"{tag}: with base's sync after the switch held, plain writes and "
       "reads complete, a FLUSH and a FUA write wait, the state file names "
       "the old top")
    r.m.wrote(fua_off, fua_data)  # in doubt until its reply
    if kill:
        top = r.kill_verify(f"{tag}: kill -9 while base's sync is held", r.top)
        ok(f"{tag}: kill -9 while held: the state file names {top}, qemu-img "
           "check is clean, every durable write reads back")
        return
    r.q.cmd("x-debug-fault-inject", nth=0)
    rep = r.c2.reply_for(fl)
    check(not any(x.is_error for x in rep), f"{tag}: the FLUSH failed: {rep}")
    rep = r.c.reply_for(fw)
    check(not any(x.is_error for x in rep), f"{tag}: the FUA write failed: {rep}")
    r.m.flushed()
    ev = r.q.wait_event("BLOCK_JOB_COMPLETED", timeout=60,
                        match=lambda x: x["device"] == "c")
    check("error" not in ev["data"], f"{tag}: the job failed: {ev}")
    check(r.state_top() == r.base, f"{tag}: after the pivot the state file "
          f"names {r.state_top()}")
    r.read_check(8)
    r.kill_verify(f"{tag}: kill -9 after the pivot", r.base)
    ok(f"{tag}: released: the FLUSH and the FUA write succeed, the job "
       "completes, the state file names base, kill -9 loses nothing")


def step_round(step):
    """Kills stratad before backend write or flush `step` after the
    release of the pivot's first flush of base.  Returns True when the
    job completed first."""
    what = f"kill before operation {step} of the pivot"
    r = Round(f"step{step}")
    r.ready()
    r.hold_first_flush()
    r.q.cmd("x-debug-fault-inject", ops=["write", "flush"], nth=step, error="kill")
    t_end = time.time() + 60
    done = False
    while r.d.alive() and time.time() < t_end:
        try:
            r.q.cmd("query-block-jobs")  # collects the events meanwhile
        except (OSError, EOFError, ValueError, harness.QMPError):
            break
        ev = [e for e in r.q.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        if ev:
            check("error" not in ev[0]["data"], f"{what}: the job failed: {ev}")
            done = True
            break
        time.sleep(0.01)
    if done:
        st = r.q.cmd("x-debug-fault-query")
        check(not st["fired"], f"{what}: the job completed after the kill")
        r.q.cmd("x-debug-fault-inject", nth=0)
        check(r.state_top() == r.base, f"{what} (completed): the state file "
              f"names {r.state_top()}")
        r.flush()
        r.kill_verify(f"{what} (completed, flushed)", r.base)
        return True
    top = r.kill_verify(what)
    ok(f"{what}: the state file names {top}, qemu-img check is clean, every "
       "durable write reads back")
    return False


t0 = time.monotonic()
held_round(kill=False)
held_round(kill=True)
for step in range(1, MAX_STEPS + 1):
    if step_round(step):
        check(step > 4, f"the pivot ended after {step - 1} operations: too few "
              "to cover its steps")
        ok(f"the pivot completes with {step - 1} backend writes and syncs, "
           "each one a crash point")
        break
else:
    check(False, f"the pivot did not complete within {MAX_STEPS} steps")
ok(f"done in {time.monotonic() - t0:.1f} s")
print("PASS")
