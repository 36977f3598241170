#!/usr/bin/python3
"""Load: 512 clients at once over 8 exports while snapshots and a commit run.

Each client owns a region of one export and keeps a model of it: for
STRATA_LOAD_SECONDS (default 60) it writes random data and reads back,
one request at a time, every read checked against its model.  Meanwhile
the control socket takes a snapshot of one export, runs an active commit
back into the old top and completes it, and snapshots a second export.
Checked:
  - every read of every client matches its model, no request fails;
  - no client starves: each one completes requests throughout the run
    (at least one in every quarter of it); the slowest request is
    reported;
  - the daemon's memory stays within the payload budget (--max-memory)
    plus its documented per-client grant;
  - after the run every image passes qemu-img check, and every export
    read offline (qemu-img convert of its chain) equals the models.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-load.py
"""
import os
import random
import selectors
import socket
import struct
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
EXPORTS = 8
CLIENTS = 512
PER = CLIENTS // EXPORTS
SIZE = 16 * MiB
REGION = SIZE // PER                   # 256 KiB per client
SECONDS = float(os.environ.get("STRATA_LOAD_SECONDS", "60"))
BUDGET = 64 * MiB
GRANT = 256 * KiB                      # NBD_BUDGET_MIN_GRANT
# 512 receive buffers, slots, stacks, and each connection's ring of
# provided buffers (STREAM_MS_BUFS x STREAM_MS_BUFSIZE, common/stream.h)
SLACK = 96 * MiB + CLIENTS * 32 * KiB

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok

d = harness.tmpdir()
content = []
exports = []
for e in range(EXPORTS):
    base = os.path.join(d, f"base{e}.raw")
    data = random.Random(e).randbytes(SIZE)
    with open(base, "wb") as f:
        f.write(data)
    top = os.path.join(d, f"top{e}.qcow2")
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base,
                        "-F", "raw", top], capture_output=True, text=True)
    check(p.returncode == 0, p.stderr)
    content.append(bytearray(data))
    exports.append(f"name=d{e},file={top},format=qcow2")

ctl = os.path.join(d, "ctl.sock")
# Under ASan, freed memory waits in a quarantine (256 MiB by default)
# before it is reused, which the RSS would count as the daemon's: keep it
# small, so that the bound below measures what the daemon holds.
if os.environ.get("ASAN_OPTIONS") is not None:
    os.environ["ASAN_OPTIONS"] += ":quarantine_size_mb=16"
daemon = Daemon(exports, extra=["--control", ctl, "--max-memory", "64M",
                                "--max-connections", str(CLIENTS + 16),
                                "--max-connections-per-peer", str(CLIENTS + 16)],
                timeout=60)
pid = daemon.proc.pid
q = QMP(ctl)
time.sleep(0.3)
base_rss = harness.rss_kib(pid) * KiB


class Client:
    def __init__(self, k):
        self.k = k
        self.exp = k % EXPORTS
        self.off = (k // EXPORTS) * REGION
        self.rng = random.Random(1000 + k)
        c = Conn(daemon.sock, timeout=60)
        c.handshake(f"d{self.exp}")
        self.sock = c.sock
        self.sock.setblocking(False)
        self.out = b""
        self.inbuf = bytearray()
        self.want = None          # (kind, offset, length, data, t0)
        self.cookie = 0
        self.done = 0
        self.when = []            # completion times
        self.slowest = 0.0

    def model(self):
        return content[self.exp]

    def next_request(self):
        self.cookie += 1
        length = self.rng.choice((4, 8, 16, 32)) * KiB
        off = self.off + self.rng.randrange(0, REGION - length + 1, 4 * KiB)
        if self.rng.random() < 0.5:
            data = self.rng.randbytes(length)
            self.out = struct.pack(">IHHQQI", w.NBD_REQUEST_MAGIC, 0,
                                   w.CMD_WRITE, self.cookie, off, length) + data
            self.want = ("w", off, length, data, time.time())
        else:
            self.out = struct.pack(">IHHQQI", w.NBD_REQUEST_MAGIC, 0,
                                   w.CMD_READ, self.cookie, off, length)
            self.want = ("r", off, length, None, time.time())

    def on_write(self):
        n = self.sock.send(self.out)
        self.out = self.out[n:]

    def on_read(self):
        chunk = self.sock.recv(1 << 20)
        check(chunk, f"client {self.k}: the daemon closed the connection")
        self.inbuf += chunk
        kind, off, length, data, t0 = self.want
        need = 16 + (length if kind == "r" else 0)
        if len(self.inbuf) < 16:
            return False
        magic, err, cookie = struct.unpack(">IIQ", self.inbuf[:16])
        check(magic == w.NBD_SIMPLE_REPLY_MAGIC and cookie == self.cookie,
              f"client {self.k}: bad reply {bytes(self.inbuf[:16])!r}")
        check(err == 0, f"client {self.k}: {kind} at {off} failed with {err}")
        if len(self.inbuf) < need:
            return False
        m = self.model()
        if kind == "w":
            m[off:off + length] = data
        else:
            got = bytes(self.inbuf[16:need])
            check(got == bytes(m[off:off + length]),
                  f"client {self.k}: read at {off} of export d{self.exp} "
                  "differs from its model")
        del self.inbuf[:need]
        now = time.time()
        self.slowest = max(self.slowest, now - t0)
        self.when.append(now)
        self.done += 1
        return True


clients = [Client(k) for k in range(CLIENTS)]
ok(f"{CLIENTS} clients connected over {EXPORTS} exports")

sel = selectors.DefaultSelector()
for c in clients:
    c.next_request()
    sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

t_start = time.time()
t_end = t_start + SECONDS
events = [(0.15, "snapshot d0"), (0.35, "commit d0"), (0.6, "snapshot d1")]
peak = base_rss
job_state = None
while time.time() < t_end or any(c.want for c in clients):
    stopping = time.time() >= t_end
    for key, mask in sel.select(timeout=0.2):
        c = key.data
        if mask & selectors.EVENT_WRITE and c.out:
            c.on_write()
        if mask & selectors.EVENT_READ and c.want:
            if c.on_read():
                c.want = None
                if not stopping:
                    c.next_request()
        sel.modify(c.sock, selectors.EVENT_READ |
                   (selectors.EVENT_WRITE if c.out else 0), c)
    frac = (time.time() - t_start) / SECONDS
    while events and frac >= events[0][0]:
        _, what = events.pop(0)
        if what == "snapshot d0":
            q.cmd("blockdev-snapshot-sync", device="d0",
                  snapshot_file=os.path.join(d, "s0.qcow2"), format="qcow2")
        elif what == "commit d0":
            q.cmd("block-commit", device="d0", job_id="c0",
                  base=os.path.join(d, "top0.qcow2"))
            job_state = "running"
        else:
            q.cmd("blockdev-snapshot-sync", device="d1",
                  snapshot_file=os.path.join(d, "s1.qcow2"), format="qcow2")
    if job_state == "running":
        q.sock.setblocking(False)
        try:
            msg = q.recv()
            if msg.get("event") == "BLOCK_JOB_READY":
                q.sock.setblocking(True)
                q.cmd("block-job-complete", device="c0")
                job_state = "completing"
            elif "event" in msg:
                q.events.append(msg)
        except (BlockingIOError, socket.timeout):
            pass
        finally:
            q.sock.setblocking(True)
            q.sock.settimeout(30)
    peak = max(peak, harness.rss_kib(pid) * KiB)
    check(time.time() < t_end + 120, "requests did not finish 120 s after the end")

if job_state == "running":
    # Writes as fast as 512 clients can send them may outrun the commit's
    # copy on a slow (sanitized, shared) machine; once they stop, it must
    # converge.
    ev = q.wait_event("BLOCK_JOB_READY", timeout=120,
                      match=lambda x: x["device"] == "c0")
    q.cmd("block-job-complete", device="c0")
    job_state = "completing"
check(job_state == "completing", f"the active commit never became ready "
      f"({job_state})")
ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=120,
                  match=lambda x: x["device"] == "c0")
check("error" not in ev["data"], f"the active commit failed: {ev}")

total = sum(c.done for c in clients)
slowest = max(clients, key=lambda c: c.slowest)
for c in clients:
    for i in range(4):
        a = t_start + i * SECONDS / 4
        b = a + SECONDS / 4
        check(any(a <= t < b for t in c.when),
              f"client {c.k} completed nothing between {i * 25}% and "
              f"{(i + 1) * 25}% of the run: it starved")
ok(f"{total} requests by {CLIENTS} clients in {SECONDS:.0f} s, every read "
   f"matched; none starved (fewest {min(c.done for c in clients)} requests, "
   f"slowest request {slowest.slowest * 1000:.0f} ms, client {slowest.k})")

grown = peak - base_rss
bound = BUDGET + CLIENTS * GRANT + SLACK
check(grown <= bound, f"RSS grew by {grown / MiB:.0f} MiB, more than the "
      f"budget allows ({bound / MiB:.0f} MiB)")
ok(f"peak RSS +{grown / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB)")

tops = {e["id"]: e["file"] for e in q.cmd("query-block-exports")}
check(tops["d0"].endswith("/top0.qcow2") and tops["d1"].endswith("/s1.qcow2"),
      f"unexpected chain tops after the jobs: {tops}")
for c in clients:
    c.sock.setblocking(True)
    c.sock.close()
q.close()
check(daemon.stop() == 0, "stratad did not exit cleanly")
for f in sorted(os.listdir(d)):
    if f.endswith(".qcow2"):
        p = subprocess.run(["qemu-img", "check", os.path.join(d, f)],
                           capture_output=True, text=True)
        check(p.returncode == 0, f"qemu-img check {f}: {p.stdout}{p.stderr}")
for e in range(EXPORTS):
    out = os.path.join(d, f"out{e}.raw")
    p = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", tops[f"d{e}"],
                        out], capture_output=True, text=True)
    check(p.returncode == 0, p.stderr)
    with open(out, "rb") as f:
        check(f.read() == bytes(content[e]),
              f"export d{e} read offline differs from the clients' models")
    os.unlink(out)
ok("all images clean; every export read offline equals the models")
print("PASS")
