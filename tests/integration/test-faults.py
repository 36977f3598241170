#!/usr/bin/python3
"""Fault injection: every backend operation of a scenario fails in turn.

stratad built with -Dfault_injection=true takes x-debug-fault-inject on
its control socket: the Nth backend operation from now fails (EIO, ENOSPC)
or is a short transfer.  Each scenario runs once without a fault to count
its operations K, then once per N in 1..K with operation N failing, each
time on fresh images.  After every run:
  - the daemon still serves (reads through it work);
  - only the request or job that met the fault reports an error;
  - every write acknowledged before a successful flush (or with FUA) is
    there, through the daemon and offline after it stopped;
  - qemu-img check finds no corruption in any image (leaks are allowed:
    a crash-safe allocator leaks rather than corrupts);
  - a job ends with its error event, and the chain it leaves is valid.
Scenarios: qcow2 allocating writes over a raw backing file (COW, overwrite,
write-zeroes, flushes); refcount table growth (512-byte clusters), alone
and with an overwrite in flight beside it (the growth writes without the
image lock);
external snapshot; intermediate commit; active commit with its pivot.
Short transfers: the same allocating writes with every read and write cut
short once must give the same bytes as without.

Run: STRATAD=build-fault/daemon/stratad /usr/bin/python3 tests/integration/test-faults.py
"""
import json
import os
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, QMP, check  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok
FAULT = {"EIO": 5, "ENOSPC": 28}


def qimg(*args):
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                       timeout=120)
    return p


def check_clean(path, what):
    p = qimg("check", path)
    check(p.returncode in (0, 3),
          f"{what}: qemu-img check {os.path.basename(path)}: rc "
          f"{p.returncode}\n{p.stdout}{p.stderr}")


def offline(top, out):
    p = qimg("convert", "-U", "-O", "raw", top, out)
    check(p.returncode == 0, f"qemu-img convert {top}: {p.stderr}")
    with open(out, "rb") as f:
        return f.read()


class Model:
    """The guest view: bytes, plus ranges whose content is unknown (a
    failed write may have reached the disk in part)."""

    def __init__(self, data):
        self.data = bytearray(data)
        self.unknown = bytearray(len(data))

    def write(self, off, data):
        self.data[off:off + len(data)] = data
        self.unknown[off:off + len(data)] = bytes(len(data))

    def failed(self, off, length):
        self.unknown[off:off + length] = b"\x01" * length

    def mismatch(self, got):
        """First offset where got disagrees with a known byte, or None."""
        if len(got) != len(self.data):
            return -1
        for start in range(0, len(got), 64 * KiB):
            a = got[start:start + 64 * KiB]
            b = self.data[start:start + 64 * KiB]
            if a == b:
                continue
            u = self.unknown[start:start + 64 * KiB]
            for i in range(len(a)):
                if a[i] != b[i] and not u[i]:
                    return start + i
        return None


class Run:
    """One daemon on a fresh copy of the scenario's images."""

    def __init__(self, scen, work):
        self.work = work
        os.makedirs(work)
        for name in os.listdir(scen.golden):
            shutil.copy2(os.path.join(scen.golden, name), work)
        self.ctl = os.path.join(work, "ctl.sock")
        self.d = Daemon([f"name=disk,file={work}/{scen.top},format=qcow2"],
                        extra=["--control", self.ctl, "-v"])
        self.q = QMP(self.ctl)
        self.c = Conn(self.d.sock, timeout=60)
        self.c.handshake("disk")
        self.cookie = 1
        self.errors = []        # (what, errno) of every failed request

    def req(self, what, cmd, off=0, length=0, payload=b"", flags=0):
        self.cookie += 1
        e = self.c.simple_cmd(cmd, self.cookie, off, length, flags, payload)
        if e:
            self.errors.append((what, e))
        return e

    def current_top(self):
        return [e for e in self.q.cmd("query-block-exports")
                if e["id"] == "disk"][0]["file"]

    def read_all(self):
        out = bytearray()
        for off in range(0, SIZE, MiB):
            self.cookie += 1
            data, err = self.c.read(self.cookie, off, MiB)
            check(err == 0, f"reading the disk through the daemon at {off}: "
                  f"error {err}")
            out += data
        return bytes(out)

    def stop(self):
        try:
            self.c.disc()
        except OSError:
            pass
        self.c.close()
        self.q.close()
        return self.d.stop()


class Scenario:
    """golden: a directory with the images; top: the export's file;
    action(run, model): the work, updating the model; returns nothing."""

    def __init__(self, name, top, make, action, ops=None, errors=("EIO",)):
        self.name, self.top, self.make, self.action = name, top, make, action
        self.ops, self.errors = ops, errors
        self.golden = os.path.join(BASE, name)
        os.makedirs(self.golden)
        self.content = make(self.golden)

    def once(self, n, error, tag):
        r = Run(self, os.path.join(BASE, f"{self.name}-{tag}"))
        args = {"nth": n if n else 1 << 40}
        if self.ops:
            args["ops"] = self.ops
        if error:
            args["error"] = error
        r.q.cmd("x-debug-fault-inject", **args)
        m = Model(self.content)
        self.action(r, m)
        st = r.q.cmd("x-debug-fault-query")
        got = r.read_all()
        where = m.mismatch(got)
        check(where is None, f"{self.name}, fault {error} at operation {n}: "
              f"the disk read through the daemon differs at {where}")
        top = r.current_top()
        rc = r.stop()
        check(rc == 0, f"{self.name}, fault at {n}: stratad exited with {rc}")
        for f in os.listdir(r.work):
            p = os.path.join(r.work, f)
            if f.endswith(".qcow2"):
                check_clean(p, f"{self.name}, fault {error} at operation {n}")
        data = offline(top, os.path.join(r.work, "out.raw"))
        where = m.mismatch(data)
        check(where is None, f"{self.name}, fault {error} at operation {n}: "
              f"the image read offline differs at {where}")
        shutil.rmtree(r.work)
        return st, r.errors

    def sweep(self):
        st, errs = self.once(0, None, "dry")
        check(not errs, f"{self.name}: requests failed without a fault: {errs}")
        k = st["seen"]
        check(k > 0, f"{self.name}: no backend operation was counted")
        ok(f"{self.name}: {k} backend operations without a fault")
        for error in self.errors:
            for n in range(1, k + 1):
                # A scenario's count may vary by an operation or two: the
                # snapshot flushes the old top again while a flush still
                # takes long (a loaded machine).  An index not reached is
                # tried again, and must be reached within three tries.
                for attempt in range(3):
                    st, errs = self.once(n, error, f"{error}-{n}-{attempt}")
                    if st["fired"]:
                        break
                check(st["fired"], f"{self.name}: operation {n} of {k} was "
                      f"not reached in three runs (not deterministic?)")
                check(len(errs) <= 1,
                      f"{self.name}, {error} at operation {n}: more than the "
                      f"request that met it failed: {errs}")
                if errs and errs[0][1] is not None:
                    check(errs[0][1] == FAULT[error],
                          f"{self.name}: {errs[0][0]} failed with {errs[0][1]}, "
                          f"the injected error was {error}")
        ok(f"{self.name}: each of {k} backend operations failed in turn "
           f"({', '.join(self.errors)}): daemon serving, one request failed, "
           "flushed data kept, images clean")
        return k


BASE = harness.tmpdir()


def require_fault_injection():
    img = os.path.join(BASE, "probe.img")
    with open(img, "wb") as f:
        f.truncate(MiB)
    ctl = os.path.join(BASE, "probe.sock")
    d = Daemon([f"name=p,file={img},format=raw"], extra=["--control", ctl])
    q = QMP(ctl)
    r = q.execute("x-debug-fault-query")
    q.close()
    d.stop()
    if "error" in r:
        harness.skip("stratad was built without fault injection "
                     "(meson setup -Dfault_injection=true)")


require_fault_injection()


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


# ---- A: allocating writes over a raw backing file ----

def make_alloc(d):
    base = pattern(SIZE, 1)
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.write(base)
    p = qimg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             os.path.join(d, "top.qcow2"))
    check(p.returncode == 0, p.stderr)
    return base


def act_alloc(r, m):
    steps = [
        ("cow write", w.CMD_WRITE, 100 * KiB, pattern(4 * KiB, 11)),
        ("cluster write", w.CMD_WRITE, 1 * MiB, pattern(64 * KiB, 12)),
        ("flush", w.CMD_FLUSH, 0, None),
        ("overwrite", w.CMD_WRITE, 1 * MiB + 8 * KiB, pattern(4 * KiB, 13)),
        ("write-zeroes", w.CMD_WRITE_ZEROES, 2 * MiB, 64 * KiB),
        ("flush", w.CMD_FLUSH, 0, None),
        ("spanning write", w.CMD_WRITE, 5 * MiB - 4 * KiB, pattern(8 * KiB, 14)),
        ("fua write", w.CMD_WRITE, 6 * MiB + 512, pattern(1536, 15)),
        ("flush", w.CMD_FLUSH, 0, None),
    ]
    for what, cmd, off, arg in steps:
        if cmd == w.CMD_WRITE:
            flags = w.CMD_FLAG_FUA if what == "fua write" else 0
            e = r.req(what, cmd, off, len(arg), arg, flags)
            if e:
                m.failed(off, len(arg))
            else:
                m.write(off, arg)
        elif cmd == w.CMD_WRITE_ZEROES:
            e = r.req(what, cmd, off, arg)
            if e:
                m.failed(off, arg)
            else:
                m.write(off, bytes(arg))
        else:
            r.req(what, cmd)


# ---- B: refcount table growth (512-byte clusters) ----

GROWTH_AT = 7 * MiB + 832 * KiB


def make_growth(d):
    top = os.path.join(d, "top.qcow2")
    p = qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", top,
             str(SIZE))
    check(p.returncode == 0, p.stderr)
    # One refcount table cluster covers 64 blocks x 256 clusters x 512 B =
    # 8 MiB of host file: fill to 32 KiB below that (the data, its L2
    # tables and refcount blocks), so the next 64 KiB grow the table.
    data = bytearray(SIZE)
    cmds = []
    for i in range(0, GROWTH_AT, 64 * KiB):
        cmds.append(f"write -P {1 + (i >> 16) % 200} {i} 64k")
        data[i:i + 64 * KiB] = bytes([1 + (i >> 16) % 200]) * (64 * KiB)
    for k in range(0, len(cmds), 40):
        args = ["qemu-io", "-f", "qcow2"]
        for c in cmds[k:k + 40]:
            args += ["-c", c]
        p = subprocess.run(args + [top], capture_output=True, text=True)
        check(p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout)
    p = qimg("info", "--output=json", top)
    end = os.path.getsize(top)
    check(8 * MiB - 64 * KiB < end < 8 * MiB,
          f"growth: the prefilled image ends at {end}, not just below 8 MiB")
    return bytes(data)


def act_growth(r, m):
    data = pattern(64 * KiB, 21)
    off = GROWTH_AT
    e = r.req("growing write", w.CMD_WRITE, off, len(data), data)
    if e:
        m.failed(off, len(data))
    else:
        m.write(off, data)
    r.req("flush", w.CMD_FLUSH)


def act_growth_concurrent(r, m):
    """The growing write with an overwrite of allocated clusters in flight
    beside it: the growth writes its blocks, table and header without the
    image lock, and the overwrite goes on meanwhile; a fault at any of
    those operations fails the growing write alone."""
    sent = []
    for what, off, data in (("growing write", GROWTH_AT, pattern(64 * KiB, 22)),
                            ("overwrite", 1 * MiB + 4 * KiB,
                             pattern(4 * KiB, 23))):
        r.cookie += 1
        r.c.write(r.cookie, off, data)
        sent.append((r.cookie, what, off, data))
    for cookie, what, off, data in sent:
        e = r.c.reply_for(cookie)[-1].error
        if e:
            r.errors.append((what, e))
            m.failed(off, len(data))
        else:
            m.write(off, data)
    r.req("flush", w.CMD_FLUSH)



# ---- C, D, E: snapshot and commits on a 3-layer chain ----

def make_chain(d):
    data = bytearray(SIZE)  # a new qcow2 base reads as zeros
    base = os.path.join(d, "base.qcow2")
    p = qimg("create", "-q", "-f", "qcow2", base, str(SIZE))
    check(p.returncode == 0, p.stderr)
    for name, backing, seed, offs in (("base.qcow2", None, 3, range(0, SIZE, MiB)),
                                      ("mid.qcow2", "base.qcow2", 4,
                                       range(512 * KiB, SIZE, 2 * MiB)),
                                      ("top.qcow2", "mid.qcow2", 5,
                                       range(1 * MiB, SIZE, 3 * MiB))):
        path = os.path.join(d, name)
        if backing:
            p = qimg("create", "-q", "-f", "qcow2", "-b", backing, "-F",
                     "qcow2", path)
            check(p.returncode == 0, p.stderr)
        args = ["qemu-io", "-f", "qcow2"]
        for o in offs:
            args += ["-c", f"write -P {seed * 16 + (o >> 20)} {o} 256k"]
            data[o:o + 256 * KiB] = bytes([seed * 16 + (o >> 20)]) * (256 * KiB)
        p = subprocess.run(args + [path], capture_output=True, text=True)
        check(p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout)
    return bytes(data)


def guest_write(r, m, what, off, data):
    e = r.req(what, w.CMD_WRITE, off, len(data), data)
    if e:
        m.failed(off, len(data))
    else:
        m.write(off, data)


def wait_job(r, job, timeout=120):
    """The next READY or COMPLETED event of job."""
    deadline = time.time() + timeout
    while True:
        for i, e in enumerate(r.q.events):
            if e["event"] in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED") and \
                    e["data"].get("device") == job:
                return r.q.events.pop(i)
        check(time.time() < deadline,
              f"job {job}: no READY or COMPLETED event within {timeout} s")
        msg = r.q.recv()
        if "event" in msg:
            r.q.events.append(msg)


def act_snapshot(r, m):
    guest_write(r, m, "write before", 64 * KiB, pattern(8 * KiB, 31))
    r.req("flush", w.CMD_FLUSH)
    snap = os.path.join(r.work, "snap.qcow2")
    res = r.q.execute("blockdev-snapshot-sync",
                      {"device": "disk", "snapshot-file": snap, "format": "qcow2"})
    if "error" in res:
        r.errors.append(("snapshot", None))
        check(not os.path.exists(snap), "a failed snapshot left its file behind")
        check(r.current_top().endswith("/top.qcow2"),
              "a failed snapshot changed the export's top")
    else:
        check(r.current_top() == snap, "the snapshot is not the new top")
    guest_write(r, m, "write after", 3 * MiB + 4 * KiB, pattern(8 * KiB, 32))
    r.req("flush", w.CMD_FLUSH)


def act_commit_mid(r, m):
    guest_write(r, m, "write before", 2 * MiB + 4 * KiB, pattern(4 * KiB, 41))
    res = r.q.execute("block-commit", {"device": "disk", "job-id": "c",
                                       "top": os.path.join(r.work, "mid.qcow2"),
                                       "base": os.path.join(r.work, "base.qcow2")})
    if "error" in res:
        r.errors.append(("block-commit", None))
    else:
        ev = wait_job(r, "c")
        check(ev["event"] == "BLOCK_JOB_COMPLETED",
              f"intermediate commit: unexpected {ev}")
        if "error" in ev["data"]:
            r.errors.append(("commit job", None))
    guest_write(r, m, "write after", 5 * MiB, pattern(4 * KiB, 42))
    r.req("flush", w.CMD_FLUSH)


def act_commit_active(r, m):
    guest_write(r, m, "write before", 2 * MiB + 4 * KiB, pattern(4 * KiB, 51))
    res = r.q.execute("block-commit", {"device": "disk", "job-id": "a",
                                       "base": os.path.join(r.work, "base.qcow2")})
    if "error" in res:
        r.errors.append(("block-commit", None))
    else:
        ev = wait_job(r, "a")
        if ev["event"] == "BLOCK_JOB_READY":
            guest_write(r, m, "write in ready", 6 * MiB + 8 * KiB,
                        pattern(4 * KiB, 52))
            res = r.q.execute("block-job-complete", {"device": "a"})
            if "error" in res:
                r.errors.append(("block-job-complete", None))
            ev = wait_job(r, "a")
        check(ev["event"] == "BLOCK_JOB_COMPLETED", f"active commit: {ev}")
        if "error" in ev["data"]:
            r.errors.append(("commit job", None))
        top = r.current_top()
        want = "/base.qcow2" if "error" not in ev["data"] else "/top.qcow2"
        check(top.endswith(want), f"active commit ({ev['data'].get('error')}): "
              f"the export's top is {top}")
    guest_write(r, m, "write after", 7 * MiB, pattern(4 * KiB, 53))
    r.req("flush", w.CMD_FLUSH)

scenarios = [
    Scenario("alloc", "top.qcow2", make_alloc, act_alloc,
             errors=("EIO", "ENOSPC")),
    Scenario("growth", "top.qcow2", make_growth, act_growth),
    Scenario("growth-concurrent", "top.qcow2", make_growth,
             act_growth_concurrent),
    Scenario("snapshot", "top.qcow2", make_chain, act_snapshot),
    Scenario("commit-intermediate", "top.qcow2", make_chain, act_commit_mid),
    Scenario("commit-active", "top.qcow2", make_chain, act_commit_active),
]

only = sys.argv[1:]
for s in scenarios:
    if not only or s.name in only:
        s.sweep()

# Short transfers: every read and every write of the allocating writes,
# each cut short once in its own run: the same bytes as without.
sc = scenarios[0]
sc.ops = ["read", "write"]
st, _ = sc.once(0, None, "short-dry")
for n in range(1, st["seen"] + 1):
    st2, errs = sc.once(n, "short", f"short-{n}")
    check(not errs, f"short transfer at operation {n}: requests failed: {errs}")
ok(f"short transfers at each of the reads and writes: no request failed, "
   "same bytes")
print("PASS")
