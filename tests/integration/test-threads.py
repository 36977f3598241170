#!/usr/bin/python3
"""--threads: connections served on more than one loop.

With --threads 2 a connection that enters transmission without TLS goes
to the loop with the fewest connections (a tie: the main loop), so of
four connections two are served by the connection loop; their requests
still run on the main loop, which owns the chain (docs/threads.md).

1. Bad values of --threads are refused (exit 2, a message).
2. A qcow2 chain under a 4-connection workload (libnbd, random writes,
   write-zeroes and reads checked against a model) while snapshots are
   taken and an active commit runs to completion through QMP: the log
   shows two connections on connection loop 1; every read matched; a
   fresh client (qemu-img compare) and the chain read offline after the
   stop (qemu-img convert) equal the model; qemu-img check is clean.
3. block-export-del mode=hard disconnects a client served by the
   connection loop; the daemon keeps serving the other export.
4. SIGTERM with clients on both loops, one of them after 16 writes of
   64 KiB in flight at once: the daemon drains them and exits 0; the
   writes it answered are in the image.
"""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, need, ok  # noqa: E402

harness.report_unexpected_exceptions()
need("qemu-img")
harness.nbd_handle()
import nbd  # noqa: E402
import jobsutil  # noqa: E402
from jobsutil import MiB, chain_files  # noqa: E402

SIZE = 64 * MiB
d = harness.tmpdir()
P = lambda name: os.path.join(d, name)  # noqa: E731


def loops_of(log):
    """{connection id: connection loop} of the connections handed over."""
    return {int(m.group(1)): int(m.group(2)) for m in
            re.finditer(r"conn (\d+): served on connection loop (\d+)", log)}


# ---- 1. refused values ----
harness.make_file(P("small.raw"), MiB)
for bad in ("0", "257", "two", "-1"):
    p = subprocess.run([harness.STRATAD, "--export", f"file={P('small.raw')}",
                        "--threads", bad], capture_output=True, text=True, timeout=20)
    check(p.returncode == 2 and "--threads" in p.stderr and "from 1 to 256" in p.stderr,
          f"--threads {bad}: exit {p.returncode}: {p.stderr}")
ok("--threads 0, 257, two and -1 refused with exit 2 and the allowed range")

# ---- 2. a workload on two loops, snapshots and an active commit ----
model = jobsutil.make_base(P("base.qcow2"), SIZE, seed=7)
ctl = P("ctl.sock")
dmn = harness.Daemon([f"name=disk,file={P('base.qcow2')},format=qcow2"],
                     extra=["--threads", "2", "--control", ctl, "--verbose"])
check("2 loops: the main loop and 1 connection loop" in dmn.logtext(), dmn.logtext())
q = QMP(ctl)
images = {P("base.qcow2")}

wl = jobsutil.Workload(dmn.uri("disk"), model, conns=4, depth=16, seed=3)
wl.start()
deadline = time.monotonic() + 60
while len(loops_of(dmn.logtext())) < 2 or sum(wl.counts) < 200:
    check(time.monotonic() < deadline,
          f"two connections on the connection loop and 200 requests: "
          f"{loops_of(dmn.logtext())}, {wl.counts}")
    time.sleep(0.05)
handed = loops_of(dmn.logtext())
check(set(handed.values()) == {1}, f"connection loops: {handed}")


def snapshot(name):
    q.cmd("blockdev-snapshot-sync", device="disk", snapshot_file=P(name), format="qcow2")
    images.add(P(name))


snapshot("s1.qcow2")
time.sleep(0.3)
snapshot("s2.qcow2")
n0 = sum(wl.counts)
q.cmd("block-commit", device="disk", job_id="c1", base=P("s1.qcow2"))
q.wait_event("BLOCK_JOB_READY", timeout=150, match=lambda x: x["device"] == "c1")
# the guest keeps writing while the job is ready (the 60 s bound a hang)
t_io = time.monotonic() + 60
while sum(wl.counts) <= n0 + 200:
    check(time.monotonic() < t_io, f"guest I/O stopped: {wl.counts}")
    time.sleep(0.05)
q.cmd("block-job-complete", device="c1")
ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60, match=lambda x: x["device"] == "c1")
check("error" not in ev["data"], f"commit failed: {ev}")
top = [e for e in q.cmd("query-block-exports") if e["id"] == "disk"][0]["file"]
check(chain_files(top) == [P("s1.qcow2"), P("base.qcow2")], chain_files(top))
wl.stop()
ok(f"4 connections ({len(handed)} on connection loop 1): {sum(wl.counts)} requests, "
   f"{sum(wl.written) // MiB} MiB written, every read matched the model, through two "
   "snapshots and an active commit")

model_raw = P("model.raw")
with open(model_raw, "wb") as f:
    f.write(model)
p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", dmn.uri("disk"),
                    model_raw], capture_output=True, text=True, timeout=120)
check(p.returncode == 0, f"qemu-img compare over NBD: {p.returncode} {p.stdout}{p.stderr}")
q.close()
rc = dmn.stop()
check(rc == 0, f"exit status {rc}\n{dmn.logtext()[-3000:]}")
jobsutil.check_images(sorted(images))
check(jobsutil.read_chain(P("s1.qcow2"), SIZE, P("out.raw")) == bytes(model),
      "the chain read offline differs from the model")
ok("qemu-img compare over NBD and the chain read offline equal the model; "
   "qemu-img check clean on every layer")

# ---- 3. block-export-del mode=hard with a client on the connection loop ----
harness.make_file(P("a.raw"), 4 * MiB, pattern=b"A")
harness.make_file(P("b.raw"), 4 * MiB, pattern=b"B")
ctl2 = P("ctl2.sock")
dmn = harness.Daemon([f"name=a,file={P('a.raw')}", f"name=b,file={P('b.raw')}"],
                     extra=["--threads", "2", "--control", ctl2, "--verbose"])
q = QMP(ctl2)
h0 = nbd.NBD()
h0.connect_uri(dmn.uri("b"))          # the main loop (a tie)
h1 = nbd.NBD()
h1.connect_uri(dmn.uri("a"))          # the connection loop
check(h1.pread(4096, 0) == b"A" * 4096, "export a before the delete")
deadline = time.monotonic() + 20
while not loops_of(dmn.logtext()):
    check(time.monotonic() < deadline, "no connection on the connection loop")
    time.sleep(0.05)
q.cmd("block-export-del", id="a", mode="hard")
gone = False
for _ in range(100):
    try:
        h1.pread(4096, 0)
    except nbd.Error:
        gone = True
        break
    time.sleep(0.05)
check(gone, "the client of the deleted export is still served")
deadline = time.monotonic() + 20
while any(e["id"] == "a" for e in q.cmd("query-block-exports")):
    check(time.monotonic() < deadline, "export a not gone")
    time.sleep(0.05)
check(h0.pread(4096, 0) == b"B" * 4096, "export b after the delete")
ok("block-export-del mode=hard disconnected the client on connection loop 1; "
   "export b still served on the main loop")

# ---- 4. SIGTERM with clients on both loops ----
h2 = nbd.NBD()
h2.connect_uri(dmn.uri("b"))          # the connection loop again (1 : 1)
deadline = time.monotonic() + 20
while len(loops_of(dmn.logtext())) < 2:
    check(time.monotonic() < deadline, f"second hand-over: {loops_of(dmn.logtext())}")
    time.sleep(0.05)
data = bytes(range(256)) * 256          # 64 KiB
bufs = [nbd.Buffer.from_bytearray(bytearray(data)) for _ in range(16)]
pending = {h2.aio_pwrite(bufs[k], k * len(data)) for k in range(16)}
deadline = time.monotonic() + 60
while pending:
    check(time.monotonic() < deadline, f"{len(pending)} writes not answered")
    h2.poll(1000)
    pending = {c for c in pending if not h2.aio_command_completed(c)}
q.close()
rc = dmn.stop()
check(rc == 0, f"exit status {rc}\n{dmn.logtext()[-3000:]}")
with open(P("b.raw"), "rb") as f:
    got = f.read(16 * len(data))
check(got == data * 16, "the writes answered before SIGTERM are not all in the file")
for h in (h0, h1, h2):
    try:
        h.shutdown()
    except nbd.Error:
        pass
ok("SIGTERM with clients on both loops: drained, exit 0, the answered writes in the file")
print("PASS")
