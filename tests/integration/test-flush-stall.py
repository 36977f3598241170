#!/usr/bin/python3
"""No request waits behind a sync of the file it does not need.

A fresh qcow2 overlay over a 1 GiB raw base takes 4 connections x 16
writes in flight (fio's nbd engine, 4 jobs, iodepth 16, 4 KiB random
writes over the first 64 MiB, most of them allocating a cluster at
first; fio logs every request's latency).  Before each event a fifth
connection writes 512 MiB in 4 MiB requests to
the upper half, and then nothing flushes for 2 s: hundreds of MiB of
guest data sit in the page cache, and a sync of the image file takes
long (about 1 s here).  The events:

  1. blockdev-snapshot-sync (creates the overlay and names it in the
     state file while the guest writes into the old top, switches, and
     only then flushes the old top, while the guest writes into the
     overlay, and makes it read-only);
  2. a guest FLUSH on a fifth connection, the fill having
     allocated clusters in the new top (so that refcount blocks and L2
     tables are dirty: a flush that synced the file under the image lock
     to write them in order would hold every allocating write);
  3. an active commit of the new top into the old one, pivoted with
     block-job-complete (flushes the base, quiesces, switches).

For each, the longest time any write in flight during the event took
must stay under a bound taken from the same run: the largest of 10 x the
p99 and 2 x the longest of the writes completed in the 1.5 s before the
event (the file system stalls writes on its own while the kernel writes
dirty pages back), and 3/4 of the event's duration (a request that
waited for the event's sync of the file it writes took about as long as
the event).  A flush that held the image's metadata lock across its sync
of the file, or a snapshot that synced the old top while the guest still
wrote into it, made writes wait for that sync (0.4-0.7 s with this much
dirty data).  The daemon's own figure (query-block-exports
last-request-stall-ns, the snapshot's request-stall-ns; FLUSH and FUA
requests, which wait for their own sync, do not count in it) must be
there and within the same bound.

Afterwards the image passes qemu-img check and the filled half reads back
as written.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-flush-stall.py
"""
import atexit
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, fail, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "fio")
import jobsutil  # noqa: E402
from jobsutil import MiB  # noqa: E402

import nbd  # noqa: E402

SIZE = 1024 * MiB
WSIZE = 4096
WSPAN = 64 * MiB     # the writers' region (small: an active commit converges)
FILL = 512 * MiB
FILL_REQ = 4 * MiB
CONNS, DEPTH = 4, 16
QUIET = 2.0          # seconds without a flush before each event

d = harness.tmpdir()
P = lambda name: os.path.join(d, name)  # noqa: E731
with open(P("base.raw"), "wb") as f:
    f.truncate(SIZE)
p = jobsutil.qimg("create", "-q", "-f", "qcow2", "-b", P("base.raw"), "-F", "raw",
                  P("top.qcow2"))
check(p.returncode == 0, p.stderr)
ctl = P("ctl.sock")
dmn = harness.Daemon([f"name=disk,file={P('top.qcow2')},format=qcow2"],
                     extra=["--control", ctl, "--verbose"])
q = QMP(ctl, timeout=120)


class Writers:
    """fio's nbd engine: CONNS jobs (one connection each), DEPTH 4 KiB
    random writes in flight each, over the first WSPAN bytes, with a
    per-request latency log (completion time in unix ms, latency in ns)."""

    def __init__(self):
        self.prefix = P("lat")
        self.cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri={dmn.uri('disk')}",
                    "--rw=randwrite", f"--bs={WSIZE}", f"--iodepth={DEPTH}",
                    f"--numjobs={CONNS}", f"--size={WSPAN // CONNS}",
                    f"--offset_increment={WSPAN // CONNS}", "--time_based",
                    "--runtime=600", f"--write_lat_log={self.prefix}", "--log_avg_msec=0",
                    "--log_unix_epoch=1", "--group_reporting"]
        self.proc = None

    def start(self):
        self.out = open(P("fio.out"), "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT)
        atexit.register(lambda: self.proc.poll() is None and self.proc.kill())
        time.sleep(1.0)
        check(self.proc.poll() is None, "fio exited: " + open(P("fio.out")).read())

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            fail("fio did not stop")
        text = open(P("fio.out")).read()
        check(" err= 0" in text and "error" not in text.lower().replace("err= 0", ""),
              "fio reported errors:\n" + text[-3000:])

    def latencies(self):
        """[(submitted, completed)] in seconds (time.time() scale); the log
        is flushed only at exit, so fio's status-interval is not needed:
        this is read after stop()."""
        out = []
        for name in os.listdir(d):
            if name.startswith("lat_lat.") and name.endswith(".log"):
                with open(os.path.join(d, name)) as f:
                    for line in f:
                        t, lat = line.split(",")[:2]
                        t1 = int(t) / 1e3
                        out.append((t1 - int(lat) / 1e9, t1))
        return out

    @staticmethod
    def window(lat, t0, t1):
        """(p99 and longest of the writes completed in the 1.5 s before t0,
        longest write in flight at any time in [t0, t1], count before)."""
        before = sorted(b - a for a, b in lat if t0 - 1.5 <= b < t0)
        during = [b - a for a, b in lat if a <= t1 and b >= t0]
        check(len(before) >= 20, f"only {len(before)} writes before the event")
        p99 = before[int(len(before) * 0.99)]
        return p99, before[-1], max(during) if during else 0.0, len(before)


def export_info():
    return [e for e in q.cmd("query-block-exports") if e["id"] == "disk"][0]


events = []   # (what, t0, t1, the daemon's figure in ns or None)


def judge_all(lat):
    for what, t0, t1, daemon_ns in events:
        p99, worst_before, worst, n = Writers.window(lat, t0, t1)
        bound = max(10 * p99, 2 * worst_before, 0.75 * (t1 - t0))
        check(worst <= bound,
              f"{what}: a write took {worst * 1e3:.1f} ms, over the bound {bound * 1e3:.0f} ms "
              f"(p99 before {p99 * 1e3:.2f} ms, longest {worst_before * 1e3:.1f} ms over {n} "
              f"writes, event {(t1 - t0) * 1e3:.0f} ms)")
        if daemon_ns is not None:
            check(daemon_ns / 1e9 <= bound,
                  f"{what}: the daemon reports a request stall of {daemon_ns / 1e6:.1f} ms, "
                  f"over {bound * 1e3:.0f} ms")
        ok(f"{what}: longest write {worst * 1e3:.1f} ms (event {(t1 - t0) * 1e3:.0f} ms), "
           f"before: p99 {p99 * 1e3:.2f} ms, longest {worst_before * 1e3:.1f} ms over {n} "
           f"writes; bound {bound * 1e3:.0f} ms"
           + (f", the daemon says {daemon_ns / 1e6:.1f} ms" if daemon_ns is not None else ""))


fill_pos = [0]


def fill(total=FILL):
    """total bytes of guest data, sequential 4 MiB writes, 4 in flight, no
    flush: dirty page cache for the next event's sync to write."""
    h = nbd.NBD()
    h.connect_uri(dmn.uri("disk"))
    buf = nbd.Buffer.from_bytearray(bytearray(b"\xa5" * FILL_REQ))
    cookies = []
    for _ in range(total // FILL_REQ):
        off = SIZE // 2 + fill_pos[0] % (SIZE // 2)  # the writers' half is not touched
        fill_pos[0] += FILL_REQ
        while len(cookies) >= 4:
            h.poll(-1)
            cookies = [c for c in cookies if not h.aio_command_completed(c)]
        cookies.append(h.aio_pwrite(buf, off))
    while cookies:
        h.poll(-1)
        cookies = [c for c in cookies if not h.aio_command_completed(c)]
    h.shutdown()


def dirty_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) // 1024
    return -1


w = Writers()
w.start()

# ---- 1. snapshot ----
fill()
time.sleep(QUIET)
dirty = dirty_mib()
t0 = time.time()
r = q.cmd("blockdev-snapshot-sync", device="disk", snapshot_file=P("s1.qcow2"), format="qcow2")
t1 = time.time()
time.sleep(0.5)  # the writes in flight at t1 leave (the daemon's figure)
events.append((f"snapshot ({dirty} MiB dirty in the page cache)", t0, t1,
               export_info().get("last-request-stall-ns")))
snapshot_result = r

# ---- 2. a guest FLUSH, after allocating writes into the fresh top ----
fill()
time.sleep(QUIET)
dirty = dirty_mib()
h = nbd.NBD()
h.connect_uri(dmn.uri("disk"))
t0 = time.time()
h.flush()
t1 = time.time()
h.shutdown()
time.sleep(0.5)
events.append((f"guest FLUSH ({dirty} MiB dirty, the flush took {(t1 - t0) * 1e3:.0f} ms)",
               t0, t1, None))

# ---- 3. active commit s1 -> top, pivot ----
# The commit copies what the fill wrote into base, where it is dirty in
# the page cache when the pivot flushes base.
q.cmd("block-commit", device="disk", job_id="c", base=P("top.qcow2"))
q.wait_event("BLOCK_JOB_READY", timeout=240, match=lambda x: x["device"] == "c")
time.sleep(QUIET)
dirty = dirty_mib()
t0 = time.time()
q.cmd("block-job-complete", device="c")
ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=90, match=lambda x: x["device"] == "c")
t1 = time.time()
check("error" not in ev["data"], f"commit failed: {ev}")
time.sleep(0.5)
events.append((f"active commit pivot ({dirty} MiB dirty)", t0, t1,
               export_info().get("last-request-stall-ns")))

w.stop()
for line in dmn.logtext().splitlines():
    if "stalled" in line or "snapshot:" in line:
        print("   daemon:", line, flush=True)
lat = w.latencies()
judge_all(lat)
check("request-stall-ns" in snapshot_result and events[0][3] is not None
      and events[2][3] is not None,
      f"the daemon reports no request stall: {snapshot_result}, {export_info()}")
check(dmn.stop() == 0, "stratad exit status")
jobsutil.check_images([P("top.qcow2")])
p = jobsutil.qimg("convert", "-U", "-O", "raw", P("top.qcow2"), P("out.raw"))
check(p.returncode == 0, p.stderr)
with open(P("out.raw"), "rb") as f:
    f.seek(SIZE // 2)
    upper = f.read(SIZE // 2)
check(upper == b"\xa5" * (SIZE // 2), "the filled upper half reads back differently")
ok(f"{len(lat)} writes in all; qemu-img check clean after the daemon stopped; "
   "the filled half reads back as written")
