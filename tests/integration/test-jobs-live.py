#!/usr/bin/python3
"""Snapshot and block-commit while a real client writes.

Four libnbd connections keep 16 requests each in flight (random writes,
write-zeroes, reads checked against a model) on a 64 MiB qcow2 export
while the control socket:
  1. takes three snapshots (QMP, the CLI's `snapshot --relative`, QMP);
  2. commits an intermediate layer (s2 into s1) rate-limited, pausing,
     resuming and lifting the speed limit on the way;
  3. starts an intermediate commit into the bottom image and cancels it:
     chain and data unchanged;
  4. active commit of the live top into s1: pause/resume, READY, the guest
     keeps writing in READY, block-job-complete: s1 is the top;
  5. active commit soft-cancelled in READY: no pivot, chain unchanged;
  6. after the load: a snapshot of a quiet chain stalls at most 10 times
     as long as qemu-img takes to create the same overlay in the same run
     (best of three); the CLI's `commit --wait` commits everything into
     the bottom image;
  7. an unthrottled commit of a 32 MiB layer gives the copy rate.
After each step the chain (qemu-img info --backing-chain) is as expected;
at the end every byte read over NBD equals the model, `qemu-img check` is
clean on every image ever made, and QEMU reads the final chain offline
byte-identically to the model; the daemon restarts from its state file on
the same chain.

Run:  STRATAD=build/daemon/stratad STRATA_CLI=build/contrib/strata \
      /usr/bin/python3 tests/integration/test-jobs-live.py
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img")
import jobsutil  # noqa: E402
from jobsutil import MiB, chain_files  # noqa: E402

CLI = os.environ.get("STRATA_CLI") or os.path.join(
    os.path.dirname(harness.STRATAD), "..", "contrib", "strata")
SIZE = 64 * MiB
d = harness.tmpdir()
P = lambda name: os.path.join(d, name)  # noqa: E731
model = jobsutil.make_base(P("base.qcow2"), SIZE, seed=5)
ctl = P("ctl.sock")
state = P("state.json")
dmn = harness.Daemon([f"name=disk,file={P('base.qcow2')},format=qcow2"],
                     extra=["--control", ctl, "--state-file", state, "--verbose"])
q = QMP(ctl)
all_images = {P("base.qcow2")}


def cli(*args, rc=0):
    p = subprocess.run([CLI, "--socket", ctl, *args], capture_output=True, text=True,
                       timeout=120)
    check(p.returncode == rc, f"strata {' '.join(args)}: exit {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def top_file():
    return [e for e in q.cmd("query-block-exports") if e["id"] == "disk"][0]["file"]


def expect_chain(names, what):
    got = chain_files(top_file())
    want = [P(n) for n in names]
    check(got == want, f"{what}: chain {got}, want {want}")


def snapshot(name, **kw):
    r = q.cmd("blockdev-snapshot-sync", device="disk", snapshot_file=P(name),
              format="qcow2", **kw)
    all_images.add(P(name))
    return r["stall-ns"] / 1e6


def wait_job_end(job, timeout=60):
    ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=timeout,
                      match=lambda x: x["device"] == job)
    check("error" not in ev["data"], f"job {job} failed: {ev}")
    return ev


def job_info(job):
    js = [j for j in q.cmd("query-block-jobs") if j["device"] == job]
    return js[0] if js else None


wl = jobsutil.Workload(dmn.uri("disk"), model)
wl.start()
time.sleep(0.5)

# ---- 1. snapshots under load ----
stalls = [snapshot("s1.qcow2")]
time.sleep(0.3)
p = cli("snapshot", "disk", P("s2.qcow2"), "--relative")
all_images.add(P("s2.qcow2"))
check("is the new top of disk" in p.stdout and "stalled" in p.stdout, p.stdout)
time.sleep(0.3)
stalls.append(snapshot("s3.qcow2"))
time.sleep(0.3)
expect_chain(["s3.qcow2", "s2.qcow2", "s1.qcow2", "base.qcow2"], "three snapshots")
info = jobsutil.qimg("info", "-U", "--output=json", P("s2.qcow2")).stdout
check(json.loads(info)["backing-filename"] == "s1.qcow2", f"--relative: {info}")
info = jobsutil.qimg("info", "-U", "--output=json", P("s3.qcow2")).stdout
check(json.loads(info)["backing-filename"] == P("s2.qcow2") and
      json.loads(info)["backing-filename-format"] == "qcow2", info)
cls, desc = q.error("blockdev-snapshot-sync", device="disk", snapshot_file=P("s1.qcow2"))
check("already exists" in desc, desc)
expect_chain(["s3.qcow2", "s2.qcow2", "s1.qcow2", "base.qcow2"], "refused snapshot")
ok(f"3 snapshots under load (QMP, CLI --relative): stalls {', '.join(f'{s:.2f}' for s in stalls)} ms; "
   "backing names absolute / relative as asked; an existing file is refused")

# ---- 2. intermediate commit s2 -> s1: rate limit, pause, resume, set-speed ----
q.cmd("block-commit", device="disk", job_id="c1", top=P("s2.qcow2"), base=P("s1.qcow2"),
      speed=256 * 1024)
time.sleep(0.3)
q.cmd("block-job-pause", device="c1")
q.wait_event("JOB_STATUS_CHANGE", match=lambda x: x["id"] == "c1" and x["status"] == "paused")
j1 = job_info("c1")
time.sleep(0.3)
j2 = job_info("c1")
check(j1["paused"] and j1["offset"] == j2["offset"], f"paused job progressed: {j1} {j2}")
check(j1["offset"] < j1["len"], f"256 KiB/s should not have finished: {j1}")
q.cmd("block-job-resume", device="c1")
q.cmd("block-job-set-speed", device="c1", speed=0)
wait_job_end("c1")
expect_chain(["s3.qcow2", "s1.qcow2", "base.qcow2"], "intermediate commit")
ok(f"intermediate commit s2 -> s1: paused at {j1['offset']}/{j1['len']} bytes "
   "(no progress while paused), resumed, speed lifted, completed; chain s3 <- s1 <- base")

# ---- 3. cancel an intermediate commit ----
q.cmd("block-commit", device="disk", job_id="c2", top=P("s1.qcow2"), speed=64 * 1024)
time.sleep(0.4)
q.cmd("block-job-cancel", device="c2")
q.wait_event("BLOCK_JOB_CANCELLED", match=lambda x: x["device"] == "c2")
expect_chain(["s3.qcow2", "s1.qcow2", "base.qcow2"], "cancelled commit")
ok("intermediate commit into base cancelled: chain unchanged")

# ---- 4. active commit s4 -> s1 with complete ----
snapshot("s4.qcow2")
time.sleep(0.5)
q.cmd("block-commit", device="disk", job_id="c3", base=P("s1.qcow2"), speed=1 * MiB)
time.sleep(0.2)
q.cmd("block-job-pause", device="c3")
q.wait_event("JOB_STATUS_CHANGE", match=lambda x: x["id"] == "c3" and x["status"] == "paused")
q.cmd("block-job-resume", device="c3")
q.cmd("block-job-set-speed", device="c3", speed=0)
t0 = time.time()
# 150 s only bound a hang: the job converges once its copy outpaces the
# guest's writes, which a loaded machine slows alike
q.wait_event("BLOCK_JOB_READY", timeout=150, match=lambda x: x["device"] == "c3")
ready_s = time.time() - t0
check(job_info("c3")["ready"], "ready")
n0 = sum(wl.counts)
# the guest keeps writing while the job is ready: 100 more requests, however
# long they take (the 60 s only bound a hang)
t_io = time.monotonic() + 60
while sum(wl.counts) <= n0 + 100:
    check(time.monotonic() < t_io, f"guest I/O stopped while ready: "
          f"{sum(wl.counts) - n0} requests in 60 s")
    time.sleep(0.05)
check(job_info("c3")["status"] == "ready", f"still ready: {job_info('c3')}")
q.cmd("block-job-complete", device="c3")
wait_job_end("c3")
expect_chain(["s1.qcow2", "base.qcow2"], "active commit")
check(top_file() == P("s1.qcow2"), top_file())
ok(f"active commit s4 -> s1: paused, resumed, ready {ready_s:.2f} s after the speed "
   "limit was lifted, stayed ready under load, completed: s1 is the top")

# ---- 5. active commit soft-cancelled when ready ----
snapshot("s5.qcow2")
time.sleep(0.3)
q.cmd("block-commit", device="disk", job_id="c4")
q.wait_event("BLOCK_JOB_READY", timeout=150, match=lambda x: x["device"] == "c4")
time.sleep(0.3)
q.cmd("block-job-cancel", device="c4")
wait_job_end("c4")
expect_chain(["s5.qcow2", "s1.qcow2", "base.qcow2"], "soft-cancelled active commit")
ok("active commit cancelled when ready: no pivot, chain unchanged")

# 2000 requests in all, however long the machine takes for them (the 120 s
# only bound a hang)
t_io = time.monotonic() + 120
while sum(wl.counts) <= 2000:
    check(time.monotonic() < t_io, f"too few requests: {wl.counts}")
    time.sleep(0.05)
wl.stop()
ok(f"workload: {sum(wl.counts)} requests, {sum(wl.written) // MiB} MiB written, no error, "
   "every read matched the model")

# ---- 6. quiet snapshot stall; the CLI's commit --wait ----
# The reference, measured here: qemu-img creating the same overlay (the
# same file work as the snapshot's, plus a process start).
ref = []
for k in range(3):
    t0 = time.monotonic()
    r = jobsutil.qimg("create", "-q", "-f", "qcow2", "-u", "-b", top_file(), "-F", "qcow2",
                      P(f"ref{k}.qcow2"), str(SIZE))
    ref.append((time.monotonic() - t0) * 1e3)
    check(r.returncode == 0, f"qemu-img create: {r.stderr}")
    os.unlink(P(f"ref{k}.qcow2"))
ref_ms = min(ref)
quiet = [snapshot("s6.qcow2")]
check(max(quiet) <= 10 * ref_ms, f"a snapshot of a quiet chain stalled {max(quiet):.2f} ms, "
      f"more than 10 times qemu-img's {ref_ms:.2f} ms to create the same overlay")
expect_chain(["s6.qcow2", "s5.qcow2", "s1.qcow2", "base.qcow2"], "quiet snapshot")
p = cli("commit", "disk", "--wait")
check("completed" in p.stdout, p.stdout)
expect_chain(["base.qcow2"], "commit --wait into the bottom")
ok(f"snapshot of a quiet chain: stall {quiet[0]:.2f} ms (qemu-img create: {ref_ms:.2f} ms); "
   "`strata commit disk --wait` "
   "committed everything into base.qcow2")

data = jobsutil.nbd_read_all(dmn.uri("disk"), SIZE)
diff = harness.first_diff(data, bytes(model))
check(diff is None, f"NBD read differs from the model at byte {diff}")
ok("every byte read over NBD equals the model")

# ---- 7. copy rate ----
snapshot("s7.qcow2")
h = jobsutil.nbd.NBD()
h.connect_uri(dmn.uri("disk"))
for off in range(0, 32 * MiB, 4 * MiB):
    chunk = os.urandom(4 * MiB)
    h.pwrite(chunk, off)
    model[off:off + 4 * MiB] = chunk
h.flush()
q.cmd("block-commit", device="disk", job_id="rate", top=P("s7.qcow2"))
t0 = time.time()
q.wait_event("BLOCK_JOB_READY", timeout=60, match=lambda x: x["device"] == "rate")
rate = 32 / (time.time() - t0)
q.cmd("block-job-complete", device="rate")
wait_job_end("rate")
h.shutdown()
expect_chain(["base.qcow2"], "rate commit")
ok(f"active commit of 32 MiB of fresh data: {rate:.0f} MiB/s to READY")

check(dmn.stop() == 0, "daemon exit status")
jobsutil.check_images(sorted(all_images))
ok(f"qemu-img check clean on all {len(all_images)} images (committed layers included)")
disk = jobsutil.read_chain(P("base.qcow2"), SIZE, P("final.raw"))
diff = harness.first_diff(disk, bytes(model))
check(diff is None, f"QEMU reads the final chain differently from the model at byte {diff}")
ok("qemu-img convert of the final chain equals the model")

doc = json.load(open(state))
check(doc["nodes"][0]["filename"] == P("base.qcow2"), doc)
dmn2 = harness.Daemon([f"name=disk,file={P('base.qcow2')},format=qcow2"],
                      extra=["--control", ctl, "--state-file", state])
data = jobsutil.nbd_read_all(dmn2.uri("disk"), SIZE)
check(data == bytes(model), "after a restart from the state file")
check(dmn2.stop() == 0, "second daemon exit status")
ok("restart from the state file: same chain, same data")
print("PASS")
