#!/usr/bin/python3
"""Export quiesce under load, and the state file across kill -9.

 1. Four libnbd connections keep 32 requests each in flight (writes of
    seeded data, write zeroes, reads checked against a model; jobsutil's
    Workload) on one export while the
    control socket quiesces it at least 40 times (x-debug-quiesce, 20 ms
    each), until the workload has completed 1000 requests.  Every request
    succeeds (queued, never failed), every read matches the model, the
    file equals the model at the end; each stall is at least the 20 ms
    asked, and each quiesce ends while the clients keep their requests in
    flight (it does not wait for them to go idle; the QMP timeout bounds a
    hang); a quiesce of an idle export stalls at most 10 times as long as
    a query-version round trip measured in the same run (medians of 20,
    taken turn about).
 2. State file: exports added over QMP, data written, kill -9; a restart
    with the same --state-file (and an --export the state already has,
    which is skipped) serves the same exports and data; the file is valid
    JSON with every export; a corrupted state file stops the start-up with
    a clear message.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-quiesce-state.py
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402
import jobsutil  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.nbd_handle()
import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
d = harness.tmpdir()
img = harness.make_file(os.path.join(d, "disk.img"), SIZE)
ctl = os.path.join(d, "ctl.sock")
dmn = harness.Daemon([f"name=disk,file={img}"], extra=["--control", ctl, "--verbose"])
q = QMP(ctl)

# ---- 1. quiesce under load ----
# jobsutil.Workload: each connection owns a quarter of the disk (so the
# model is exact) and keeps 32 requests in flight
model = bytearray(SIZE)
wl = jobsutil.Workload(dmn.uri("disk"), model, conns=4, depth=32, seed=3, maxblk=16)
wl.start()
time.sleep(0.3)
stalls = []
# At least 40 quiesces, and as many more as it takes the workload to
# complete 1000 requests among them, however slow the machine (the bound
# of 2000 only stops a workload that makes no progress at all).
while len(stalls) < 40 or sum(wl.counts) < 1000:
    check(len(stalls) < 2000, f"the workload completed only {sum(wl.counts)} requests "
          f"during {len(stalls)} quiesces")
    r = q.cmd("x-debug-quiesce", id="disk", duration_ms=20)
    stalls.append(r["stall-ns"] / 1e6)
    check(r["stall-ns"] >= 20e6, f"stall {r} shorter than the 20 ms asked")
    time.sleep(0.02)
running = [t.is_alive() for t in wl.threads]   # the clients kept going
wl.stop()  # fails on any I/O error or read that differs from the model
counts = wl.counts
check(all(running), "a workload connection ended during the quiesces")
with open(img, "rb") as f:
    disk = f.read()
diff = harness.first_diff(disk, bytes(model))
check(diff is None, f"file differs from the model at byte {diff}")
e = q.cmd("query-block-exports")[0]
check(e["quiesce-count"] == len(stalls) and e["max-quiesce-stall-ns"] >= 20e6, e)
check("quiesced for" in dmn.logtext(), "stalls are logged at -v")
ok(f"{len(stalls)} quiesces under load ({sum(counts)} requests, 4x32 in flight): none "
   f"failed, data == model; stall min {min(stalls):.1f} / max {max(stalls):.1f} ms")

# An idle quiesce has nothing to wait for: its stall (measured by the
# daemon) against the client's round trip of a command that does nothing,
# taken turn about so that a busy machine slows both alike.
idle, rtt = [], []
for _ in range(20):
    idle.append(q.cmd("x-debug-quiesce", id="disk")["stall-ns"] / 1e6)
    t0 = time.monotonic()
    q.cmd("query-version")
    rtt.append((time.monotonic() - t0) * 1e3)
idle_ms, rtt_ms = sorted(idle)[10], sorted(rtt)[10]
check(idle_ms <= 10 * rtt_ms, f"a quiesce of a quiet export stalled {idle_ms:.2f} ms "
      f"(median), more than 10 times a query-version round trip ({rtt_ms:.2f} ms)")
cls, desc = q.error("x-debug-quiesce", id="nope")
check("not found" in desc, desc)
cls, desc = q.error("x-debug-quiesce", id="disk", duration_ms=-1)
check("duration-ms" in desc, desc)
ok(f"a quiesce of a quiet export stalls {idle_ms:.3f} ms (median; max {max(idle):.3f}), "
   f"a query-version round trip takes {rtt_ms:.3f} ms")
q.close()
check(dmn.stop() == 0, "stop")

# ---- 2. the state file across kill -9 ----
sd = harness.tmpdir()
state = os.path.join(sd, "state.json")
a = harness.make_file(os.path.join(sd, "a.img"), 4 * MiB)
b = harness.make_file(os.path.join(sd, "b.img"), 4 * MiB)
c = harness.make_file(os.path.join(sd, "c.img"), 4 * MiB, b"\x0c")
ctl = os.path.join(sd, "ctl.sock")
args = ["--control", ctl, "--state-file", state]
dmn = harness.Daemon([f"name=a,file={a}"], extra=args)
q = QMP(ctl)
q.cmd("blockdev-add", driver="raw", node_name="nb", file={"driver": "file", "filename": b})
q.cmd("block-export-add", type="nbd", id="b", node_name="nb", name="bee",
      description="second", writable=True)
q.cmd("blockdev-add", driver="raw", node_name="nc", read_only=True,
      file={"driver": "file", "filename": c})
q.cmd("block-export-add", type="nbd", id="c", node_name="nc")
for name, byte in (("a", 0xAA), ("bee", 0xBB)):
    h = nbd.NBD()
    h.connect_uri(dmn.uri(name))
    h.pwrite(bytes([byte]) * 8192, 4096)
    h.flush()
    h.shutdown()
doc = json.load(open(state))
check(doc["version"] == 1 and {x["id"] for x in doc["exports"]} == {"a", "b", "c"} and
      {x["node-name"] for x in doc["nodes"]} == {"a", "nb", "nc"}, doc)
dmn.stop(signal.SIGKILL)
ok("three exports (one from --export, two over QMP) recorded; kill -9")

dmn = harness.Daemon([f"name=a,file={a}"], extra=args)
q = QMP(ctl)
exps = {x["id"]: x for x in q.cmd("query-block-exports")}
check(set(exps) == {"a", "b", "c"}, exps)
check(exps["b"]["name"] == "bee" and exps["b"]["description"] == "second" and
      exps["b"]["writable"] and not exps["c"]["writable"] and exps["c"]["name"] == "nc", exps)
check("restored from the state file" in dmn.logtext(), "the --export was skipped")
for name, byte in (("a", 0xAA), ("bee", 0xBB), ("nc", 0x0C)):
    h = nbd.NBD()
    h.connect_uri(dmn.uri(name))
    got = h.pread(8192, 4096)
    check(got == bytes([byte]) * 8192, f"data of {name} after restart")
    if name == "nc":
        check(h.is_read_only(), "c stays read-only")
    h.shutdown()
ok("restart with the same state file: same exports, names, flags and data")

# deleting an export is recorded too
q.cmd("block-export-del", id="b")
q.cmd("blockdev-del", node_name="nb")
dmn.stop(signal.SIGKILL)
dmn = harness.Daemon([], extra=args)
q = QMP(ctl)
check({x["id"] for x in q.cmd("query-block-exports")} == {"a", "c"}, "b stays deleted")
q.close()
check(dmn.stop() == 0, "stop")
ok("a deleted export stays deleted after kill -9 and restart")

with open(state, "w") as f:
    f.write('{"version": 1, "nodes": [{"node-name": "x"}]')
import subprocess  # noqa: E402
p = subprocess.run([harness.STRATAD, "--listen", "unix:" + os.path.join(sd, "n.sock")] + args,
                   capture_output=True, text=True, timeout=30)
check(p.returncode != 0 and "state file" in p.stderr and "not valid JSON" in p.stderr,
      f"corrupt state file: rc {p.returncode}, {p.stderr!r}")
check("ERROR: AddressSanitizer" not in p.stderr and "LeakSanitizer" not in p.stderr, p.stderr)
ok("a corrupt state file stops the start with a clear message")
print("PASS")
