#!/usr/bin/python3
"""Chains that mix local files and RBD images, against a real throw-away
Ceph cluster (contrib/ceph-cluster.sh), with QEMU as the reference.

 1. The golden image: a raw image on RBD, local qcow2 overlays on it (as
    qemu-img creates them: backing rbd:rbd/golden, format raw; the exports
    allow RBD backing images under local ones with backing-remote=rbd:).  The
    differential workload (workload.py) runs on qemu-nbd over overlay A,
    on stratad over overlay B, and on stratad cache=none over overlay C
    (4 KiB clusters, ops widened to 4 KiB).  Afterwards qemu-img compare:
    A == B == the model, C == its model; qemu-img check clean on B and C;
    the golden image is unchanged (rbd export digest).
 2. A whole qcow2 chain stored in RBD: base (qcow2, converted into RBD by
    qemu-img) <- mid (written by qemu-io) <- top, three copies.  qemu-nbd
    serves chain A, stratad chain B (backing names rbd:rbd/...), stratad
    cache=none chain C whose images name their backing images relative
    (IMAGE, in the overlay's pool: QEMU 7.2 cannot open such a chain, so C
    is rebased to absolute names afterwards to be checked by qemu-img).
    Phase 1 on one connection, then 4 connections at once on disjoint
    quarters.  Same checks: compare, check, backing images unchanged.
 3. Live jobs with RBD layers (control socket, a libnbd workload with a
    model running throughout): blockdev-snapshot-sync onto a new RBD image,
    then onto a local file above it; a snapshot onto an existing RBD image
    is refused and the image is kept; an RBD overlay above a local top
    without backing-root is refused and no image is left behind; an
    intermediate block-commit into an RBD qcow2 base; an active commit
    into the RBD base of the whole chain; an active commit of a local
    overlay into a raw RBD base (the golden image).  Every byte read
    matches the model; with the daemon stopped, qemu-img check over the
    rbd: paths is clean, qemu-img compare gives the model; a restart from
    the state file serves the same bytes.
 4. Backing names an image header may not carry: a Ceph option
    (log_file: no file appears), a local file under an RBD overlay without
    backing-root, a loop of two RBD images.  (Cluster settings in backing
    names are tested without a cluster in test-backing-hostile.py.)
 5. blockdev-add with QEMU's {"driver": "rbd", ...} file nodes (conf;
    user and server list), and its clear refusals; images with the same
    connection settings share one cluster connection (threads counted),
    which outlives the deletion of some of them; while a blockdev-add
    waits for monitors that do not answer (connect_timeout=3), the same
    daemon's local export keeps answering reads at once.

Seed: STRATA_SEED (default 20261122), ops: STRATA_OPS (default 2000).
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, need  # noqa: E402

need("qemu-nbd", "qemu-img", "qemu-io")
harness.require_built()
import cephlib  # noqa: E402
from cephlib import rbd, run  # noqa: E402
import jobsutil  # noqa: E402
import workload  # noqa: E402
import nbd  # noqa: E402  (workload made sure it is there)
from workload import (QemuNbd, compare_files, make_initial, ok,  # noqa: E402
                      phase_many_connections, phase_one_connection)

MiB = 1 << 20
SIZE = 32 * MiB
SEED = int(os.environ.get("STRATA_SEED", "20261122"))
OPS = int(os.environ.get("STRATA_OPS", "2000"))
CONNS = 4
workload.configure(SIZE, 16, 390)   # bounds a hang only; meson's timeout is 420

cluster = cephlib.start()
d = harness.tmpdir()
P = lambda name: os.path.join(d, name)  # noqa: E731
print(f"seed: {SEED} (STRATA_SEED={SEED} to replay), ops: {OPS}", flush=True)


def qimg(*args, timeout=120, ok_codes=(0,)):
    return run(["qemu-img", *args], timeout=timeout, ok_codes=ok_codes).stdout.decode()


def image_digest(spec):
    """sha256 of an RBD image's bytes (rbd export)."""
    out = P("export.bin")
    rbd("export", "--no-progress", spec, out, timeout=60)
    with open(out, "rb") as f:
        dg = hashlib.sha256(f.read()).hexdigest()
    os.unlink(out)
    return dg


def guest_file(top, name):
    """The guest view of a chain, as QEMU reads it offline (qemu-img
    convert to a raw file)."""
    out = P(name)
    qimg("convert", "-U", "-O", "raw", top, out)
    return out


def qcheck(image, what):
    chk = json.loads(qimg("check", "--output=json", image, ok_codes=(0, 2, 3)))
    check(chk.get("corruptions", 0) == 0 and chk.get("leaks", 0) == 0 and
          chk.get("check-errors", 0) == 0, f"{what}: qemu-img check {image}: {chk}")


def backing_of(image):
    info = json.loads(qimg("info", "-U", "--output=json", image))
    return info.get("backing-filename"), info.get("backing-filename-format")


def stop_servers(q, s, what):
    rs = s.stop()
    check(rs == 0, f"{what}: stratad exit status {rs}:\n" + s.logtext()[-3000:])
    rq = q.stop()
    if rq != 0:
        print(f"note: qemu-nbd exited with {rq}")


# ---------------------------------------------------------------------------
# 1. The golden image: local overlays on a raw RBD image.

t1 = time.time()
golden_raw = P("golden.raw")
initial = make_initial(golden_raw, SEED)
rbd("import", "--no-progress", golden_raw, "rbd/golden", timeout=60)
golden_digest = image_digest("rbd/golden")
for name, cluster_size in (("ga", 65536), ("gb", 65536), ("gc", 4096)):
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
         "-b", "rbd:rbd/golden", "-F", "raw", P(name + ".qcow2"))
check(backing_of(P("gb.qcow2")) == ("rbd:rbd/golden", "raw"), "golden overlay backing")

q = QemuNbd(P("ga.qcow2"), "diff", shared=2, fmt="qcow2")
s = harness.Daemon([f"name=diff,file={P('gb.qcow2')},format=qcow2,cache=writeback,"
                    "backing-remote=rbd:",
                    f"name=direct,file={P('gc.qcow2')},format=qcow2,cache=none,"
                    "backing-remote=rbd:"])
ra, rb, rc = phase_one_connection(SEED, OPS, (q.uri(), s.uri("diff"), s.uri("direct")),
                                  initial)
stop_servers(q, s, "golden")
compare_files([(guest_file(P("gb.qcow2"), "gb.raw"), "stratad")], rb.model,
              "golden, stratad's overlay")
compare_files([(guest_file(P("ga.qcow2"), "ga.raw"), "qemu-nbd")], ra.model,
              "golden, qemu-nbd's overlay (reference)")
qimg("compare", P("ga.qcow2"), P("gb.qcow2"))
compare_files([(guest_file(P("gc.qcow2"), "gc.raw"), "stratad cache=none")], rc.model,
              "golden, cache=none overlay")
for f in ("ga.raw", "gb.raw", "gc.raw"):
    os.unlink(P(f))
qcheck(P("gb.qcow2"), "golden")
qcheck(P("gc.qcow2"), "golden cache=none")
check(image_digest("rbd/golden") == golden_digest, "the golden RBD image was modified")
golden_model = rb.model
ok(f"golden image on RBD, local overlays: qemu-img compare qemu-nbd's == stratad's "
   f"overlay == model; qemu-img check clean; rbd/golden unchanged ({time.time() - t1:.1f} s)")

# ---------------------------------------------------------------------------
# 2. A whole qcow2 chain in RBD.

t2 = time.time()
for x in "abc":
    qimg("convert", "-f", "raw", "-O", "qcow2", golden_raw, f"rbd:rbd/{x}base")
    qimg("create", "-q", "-f", "qcow2", "-b", f"rbd:rbd/{x}base", "-F", "qcow2",
         f"rbd:rbd/{x}mid", str(SIZE))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xa5 7000 9000",
         "-c", "write -z 8M 2M", "-c", "discard 12M 1M", "-c", "write -P 0x77 30M 64k",
         f"rbd:rbd/{x}mid"], timeout=60)
    qimg("create", "-q", "-f", "qcow2", "-b", f"rbd:rbd/{x}mid", "-F", "qcow2",
         f"rbd:rbd/{x}top", str(SIZE))
# chain C names its backing images relative: IMAGE in the same pool
qimg("rebase", "-u", "-b", "cbase", "-F", "qcow2", "rbd:rbd/cmid")
qimg("rebase", "-u", "-b", "cmid", "-F", "qcow2", "rbd:rbd/ctop")
check(backing_of("rbd:rbd/cmid")[0] == "cbase", "chain C: relative backing name")
chain_initial = bytearray(open(guest_file("rbd:rbd/atop", "chain0.raw"), "rb").read())
os.unlink(P("chain0.raw"))
check(chain_initial[1 * MiB:4 * MiB] == b"\x5a" * (3 * MiB), "qemu-io's pattern (test bug)")
below = {img: image_digest(f"rbd/{img}") for img in ("bbase", "bmid", "cbase", "cmid")}

q = QemuNbd("rbd:rbd/atop", "diff", shared=CONNS + 1, fmt="qcow2")
s = harness.Daemon(["name=diff,file=rbd:rbd/btop,format=qcow2,cache=writeback",
                    "name=direct,file=rbd:rbd/ctop,format=qcow2,cache=none"])
uris = (q.uri(), s.uri("diff"), s.uri("direct"))
ra, rb, rc = phase_one_connection(SEED + 1, OPS, uris, chain_initial)
phase_many_connections(SEED + 2, OPS, CONNS, uris, (ra, rb, rc))
stop_servers(q, s, "chain in RBD")
compare_files([(guest_file("rbd:rbd/btop", "b.raw"), "stratad")], rb.model,
              "chain in RBD, stratad's")
compare_files([(guest_file("rbd:rbd/atop", "a.raw"), "qemu-nbd")], ra.model,
              "chain in RBD, qemu-nbd's (reference)")
qimg("compare", "rbd:rbd/atop", "rbd:rbd/btop")
for img, dg in below.items():
    check(image_digest(f"rbd/{img}") == dg, f"backing image rbd/{img} was modified")
# back to absolute names, so that QEMU can read chain C
qimg("rebase", "-u", "-b", "rbd:rbd/cbase", "-F", "qcow2", "rbd:rbd/cmid")
qimg("rebase", "-u", "-b", "rbd:rbd/cmid", "-F", "qcow2", "rbd:rbd/ctop")
compare_files([(guest_file("rbd:rbd/ctop", "c.raw"), "stratad cache=none")], rc.model,
              "chain in RBD with relative names, cache=none")
for f in ("a.raw", "b.raw", "c.raw"):
    os.unlink(P(f))
for img in ("btop", "ctop"):
    qcheck(f"rbd:rbd/{img}", "chain in RBD")
ok(f"qcow2 chain stored in RBD (absolute and relative backing names): qemu-img compare "
   f"qemu-nbd's == stratad's chain == model; qemu-img check clean over rbd:; backing "
   f"images unchanged ({time.time() - t2:.1f} s)")

# ---------------------------------------------------------------------------
# 3. Live jobs with RBD layers.

t3 = time.time()
ctl = P("ctl.sock")
state = P("state.json")
dmn = harness.Daemon(["name=disk,file=rbd:rbd/btop,format=qcow2,backing-remote=rbd:",
                      f"name=gold,file={P('gb.qcow2')},format=qcow2,backing-remote=rbd:"],
                     extra=["--control", ctl, "--state-file", state, "--verbose"])
qmp = QMP(ctl)
model = bytearray(rb.model)
check(jobsutil.nbd_read_all(dmn.uri("disk"), SIZE) == bytes(model), "disk before the jobs")


def top_file(export="disk"):
    return [e for e in qmp.cmd("query-block-exports") if e["id"] == export][0]["file"]


def wait_job(job, active):
    if active:
        qmp.wait_event("BLOCK_JOB_READY", timeout=120, match=lambda x: x["device"] == job)
        qmp.cmd("block-job-complete", device=job)
    ev = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120, match=lambda x: x["device"] == job)
    check("error" not in ev["data"], f"job {job} failed: {ev}")


def rbd_images():
    return set(json.loads(rbd("ls", "--format", "json", "rbd")))


wl = jobsutil.Workload(dmn.uri("disk"), model, conns=2, depth=8, seed=SEED)
wl.start()
time.sleep(0.5)

# a new RBD image as the overlay
r = qmp.cmd("blockdev-snapshot-sync", device="disk", snapshot_file="rbd:rbd/bs1",
            format="qcow2")
stall1 = r["stall-ns"] / 1e6
check(top_file() == "rbd:rbd/bs1", f"top after the RBD snapshot: {top_file()}")
check("bs1" in rbd_images(), "rbd/bs1 was not created")
time.sleep(0.5)
cls, desc = qmp.error("blockdev-snapshot-sync", device="disk", snapshot_file="rbd:rbd/bmid",
                      format="qcow2")
check("already exists" in desc, f"snapshot onto an existing image: {desc}")
check("bmid" in rbd_images(), "rbd/bmid was removed by a refused snapshot")
check(top_file() == "rbd:rbd/bs1", f"top after the refused snapshot: {top_file()}")
# a local file above it
r = qmp.cmd("blockdev-snapshot-sync", device="disk", snapshot_file=P("s2.qcow2"),
            format="qcow2")
stall2 = r["stall-ns"] / 1e6
time.sleep(0.5)
# refused: an RBD overlay over a local top without backing-root
cls, desc = qmp.error("blockdev-snapshot-sync", device="disk", snapshot_file="rbd:rbd/bs3",
                      format="qcow2")
check("local backing file" in desc and "backing-root" in desc,
      f"RBD overlay above a local top: {desc}")
check("bs3" not in rbd_images(), "a refused snapshot left rbd/bs3 behind")
check(top_file() == P("s2.qcow2"), f"top after the refused snapshots: {top_file()}")
check(backing_of("rbd:rbd/bs1") == ("rbd:rbd/btop", "qcow2"), backing_of("rbd:rbd/bs1"))
check(backing_of(P("s2.qcow2")) == ("rbd:rbd/bs1", "qcow2"), backing_of(P("s2.qcow2")))
ok(f"snapshots under load onto a new RBD image ({stall1:.2f} ms stall) and a local file "
   f"({stall2:.2f} ms); an existing image and an RBD overlay over a local top refused, "
   "nothing created or removed")

# intermediate commit: bs1 and btop into bmid (RBD, qcow2); s2 re-pointed
qmp.cmd("block-commit", device="disk", job_id="c1", top="rbd:rbd/bs1", base="rbd:rbd/bmid")
wait_job("c1", active=False)
check(backing_of(P("s2.qcow2")) == ("rbd:rbd/bmid", "qcow2"),
      f"s2 after the intermediate commit: {backing_of(P('s2.qcow2'))}")
time.sleep(0.5)
# active commit of everything into the RBD base
qmp.cmd("block-commit", device="disk", job_id="c2", base="rbd:rbd/bbase")
wait_job("c2", active=True)
check(top_file() == "rbd:rbd/bbase", f"top after the active commit: {top_file()}")
time.sleep(0.5)
# and the golden overlay into its raw RBD base
gmodel = golden_model
qmp.cmd("block-commit", device="gold", job_id="c3")
wait_job("c3", active=True)
check(top_file("gold") == "rbd:rbd/golden", f"gold after the active commit: {top_file('gold')}")
wl.stop()
check(jobsutil.nbd_read_all(dmn.uri("disk"), SIZE) == bytes(model), "disk after the jobs")
check(jobsutil.nbd_read_all(dmn.uri("gold"), SIZE) == bytes(gmodel), "gold after the commit")
nops = sum(wl.counts)
check(dmn.stop() == 0, "stratad exit status after the jobs:\n" + dmn.logtext()[-3000:])

for img in ("rbd:rbd/bbase", "rbd:rbd/bmid", "rbd:rbd/bs1", P("s2.qcow2")):
    qcheck(img, "after the jobs")
compare_files([(guest_file("rbd:rbd/bbase", "final.raw"), "rbd:rbd/bbase")], model,
              "after the jobs, the committed RBD base")
os.unlink(P("final.raw"))
with open(P("gmodel.raw"), "wb") as f:
    f.write(gmodel)
qimg("compare", "-f", "raw", "-F", "raw", P("gmodel.raw"), "rbd:rbd/golden")
doc = json.load(open(state))
files = sorted(n["filename"] for n in doc["nodes"])
check(files == sorted(["rbd:rbd/bbase", "rbd:rbd/golden"]), f"state file: {files}")
dmn2 = harness.Daemon(["name=disk,file=rbd:rbd/btop,format=qcow2,backing-remote=rbd:",
                       f"name=gold,file={P('gb.qcow2')},format=qcow2,backing-remote=rbd:"],
                      extra=["--control", ctl, "--state-file", state])
check(jobsutil.nbd_read_all(dmn2.uri("disk"), SIZE) == bytes(model), "after a restart")
check(jobsutil.nbd_read_all(dmn2.uri("gold"), SIZE) == bytes(gmodel), "gold after a restart")
check(dmn2.stop() == 0, "second daemon exit status")
ok(f"commits into RBD bases under load ({nops} workload requests): intermediate into "
   "rbd/bmid, active into rbd/bbase (qcow2) and rbd/golden (raw); qemu-img check clean, "
   "compare == model, restart from the state file serves the same bytes "
   f"({time.time() - t3:.1f} s)")

# ---------------------------------------------------------------------------
# 4. Backing names a header may not carry.


def refused(export, phrase, what):
    sdir = harness.tmpdir()
    try:
        p = subprocess.run([harness.STRATAD, "--listen", f"unix:{sdir}/s.sock",
                            "--export", export], capture_output=True, text=True,
                           timeout=30)
    except subprocess.TimeoutExpired:
        harness.fail(f"{what}: stratad accepted the export and kept running")
    check(p.returncode != 0, f"{what}: stratad exited with 0")
    check(phrase in p.stderr, f"{what}: message lacks '{phrase}':\n{p.stderr}")
    check("runtime error" not in p.stderr and "Sanitizer" not in p.stderr, p.stderr)


evil_log = P("evil.log")
qimg("create", "-q", "-f", "qcow2", "-u", "-b", f"rbd:rbd/golden:log_file={evil_log}",
     "-F", "raw", P("evil.qcow2"), str(SIZE))
refused(f"name=e,file={P('evil.qcow2')},format=qcow2", "sets the Ceph option 'log_file'",
        "a Ceph option in a backing name")
check(not os.path.exists(evil_log), "the header's log_file was created")
qimg("create", "-q", "-f", "qcow2", "-u", "-b", golden_raw, "-F", "raw",
     "rbd:rbd/evil", str(SIZE))
refused("name=e,file=rbd:rbd/evil,format=qcow2", "is a local file under an image on RBD",
        "a local backing file under an RBD overlay")
qimg("create", "-q", "-f", "qcow2", "-u", "-b", "rbd:rbd/loop2", "-F", "qcow2",
     "rbd:rbd/loop1", str(SIZE))
qimg("create", "-q", "-f", "qcow2", "-u", "-b", "loop1", "-F", "qcow2",
     "rbd:rbd/loop2", str(SIZE))
refused("name=e,file=rbd:rbd/loop1,format=qcow2", "the backing chain loops",
        "a loop of RBD images")
ok("refused: a Ceph option in a backing name (no log file appeared), a local backing "
   "file under an RBD overlay, a loop of two RBD images")

# ---------------------------------------------------------------------------
# 5. blockdev-add of RBD images over QMP (QEMU's driver=rbd), and the loop
# keeps serving its other exports while a cluster that does not answer is
# being reached (the connect runs on a thread of its own).

ctl5 = P("ctl5.sock")
local = harness.make_file(P("local.raw"), 4 * MiB, bytes(range(256)))
dmn5 = harness.Daemon([f"name=local,file={local}"], extra=["--control", ctl5])
q5 = QMP(ctl5)
mon_port = open(cluster.conf).read().split("mon host = ")[1].split()[0].rsplit(":", 1)[1]
q5.cmd("blockdev-add", driver="raw", node_name="g", read_only=True,
       file={"driver": "rbd", "pool": "rbd", "image": "golden", "conf": cluster.conf})
q5.cmd("blockdev-add", driver="qcow2", node_name="b", read_only=True,
       file={"driver": "rbd", "pool": "rbd", "image": "bbase", "user": "admin",
             "server": [{"host": "127.0.0.1", "port": mon_port}]})
for node in ("g", "b"):
    q5.cmd("block-export-add", type="nbd", id=node, node_name=node)
check(jobsutil.nbd_read_all(dmn5.uri("g"), SIZE) == bytes(gmodel), "driver=rbd, conf: data")
check(jobsutil.nbd_read_all(dmn5.uri("b"), SIZE) == bytes(model), "driver=rbd, server: data")
files = {n["node-name"]: n["file"] for n in q5.cmd("query-named-block-nodes")
         if n["node-name"] in ("g", "b")}
check(files == {"g": f"rbd:rbd/golden:conf={cluster.conf}",
                "b": f"rbd:rbd/bbase:id=admin:mon_host=127.0.0.1\\:{mon_port}"},
      f"query-named-block-nodes: {files}")
# images opened with the same settings share one cluster connection: three
# more nodes like "g" add a helper thread each, not a client's ~16 threads;
# deleting them leaves the connection to "g"
def nthreads():
    return len(os.listdir(f"/proc/{dmn5.proc.pid}/task"))


t_before = nthreads()
for k in range(3):
    q5.cmd("blockdev-add", driver="raw", node_name=f"g{k}", read_only=True,
           file={"driver": "rbd", "pool": "rbd", "image": "golden", "conf": cluster.conf})
t_after = nthreads()
check(t_after - t_before <= 6, f"3 more images on the same connection settings took "
      f"{t_after - t_before} more threads (a connection each?)")
for k in range(3):
    q5.cmd("blockdev-del", node_name=f"g{k}")
check(jobsutil.nbd_read_all(dmn5.uri("g"), SIZE) == bytes(gmodel),
      "g after the nodes sharing its connection were deleted")
ok(f"3 more images on one shared connection: {t_before} -> {t_after} threads; deleting "
   "them left the connection to the first")
cls, desc = q5.error("blockdev-add", driver="raw", node_name="x",
                     file={"driver": "rbd", "pool": "rbd", "image": "golden",
                           "key-secret": "sec0"})
check("'file.key-secret'" in desc and "keyring" in desc, desc)
cls, desc = q5.error("blockdev-add", driver="raw", node_name="x",
                     file={"driver": "rbd", "image": "golden"})
check(desc == "Parameter 'file.pool' is missing", desc)
cls, desc = q5.error("blockdev-add", driver="raw", node_name="x",
                     file={"driver": "rbd", "pool": "rbd", "image": "nosuch"})
check("image 'nosuch' does not exist in pool 'rbd'" in desc, desc)
ok("blockdev-add driver=rbd (conf; user and server) serves the images; key-secret, "
   "a missing pool and a missing image are refused clearly")

dead = harness.free_port()
result = {}


def add_dead():
    t0 = time.time()
    try:
        q5.cmd("blockdev-add", driver="raw", node_name="dead",
               file={"driver": "file",
                     "filename": f"rbd:rbd/x:mon_host=127.0.0.1\\:{dead}:connect_timeout=3"})
        result["err"] = None
    except harness.QMPError as e:
        result["err"] = e.desc
    result["end"] = time.time()
    result["took"] = result["end"] - t0


th = threading.Thread(target=add_dead)
h5 = nbd.NBD()
h5.connect_uri(dmn5.uri("local"))
expect = open(local, "rb").read(4096)
th.start()
reads, worst, done_at = 0, 0.0, []
while th.is_alive() or reads == 0:
    t0 = time.time()
    check(h5.pread(4096, 0) == expect, "local export: read differs")
    done_at.append(time.time())
    worst = max(worst, done_at[-1] - t0)
    reads += 1
th.join()
h5.shutdown()
check(result["err"] and "no answer from the Ceph monitors within 3 s" in result["err"],
      f"blockdev-add of an unreachable cluster: {result}")
check(result["took"] >= 2.5, f"the connect gave up after {result['took']:.1f} s, not 3 s")
# The loop is not blocked while the cluster is being reached: local reads
# are answered while blockdev-add still waits.  (A blocked loop would
# answer them only together with blockdev-add; the 0.5 s keeps reads
# answered in the same instant out of the count.)
waiting = [t for t in done_at if t < result["end"] - 0.5]
check(len(waiting) >= 3, f"only {len(waiting)} reads of the local export were answered "
      f"while blockdev-add waited {result['took']:.1f} s for the cluster: the loop was "
      "blocked")
# the CLI passes rbd: specs through as they are (not as paths)
cli = [os.environ.get("STRATA_CLI") or os.path.join(os.path.dirname(harness.STRATAD), "..",
                                                    "contrib", "strata"), "--socket", ctl5]
p = run([*cli, "add-export", "cq", "rbd:rbd/q-cli", "--format", "qcow2"], ok_codes=(1,))
check(b"image 'q-cli' does not exist in pool 'rbd'" in p.stdout + p.stderr, p)
qimg("create", "-q", "-f", "qcow2", "rbd:rbd/q-cli", str(4 * MiB))
run([*cli, "add-export", "cq", "rbd:rbd/q-cli", "--format", "qcow2"])
run([*cli, "snapshot", "cq", "rbd:rbd/q-cli-s1"])
p = run([*cli, "chain", "cq"])
check(b"rbd:rbd/q-cli-s1" in p.stdout and b"rbd:rbd/q-cli" in p.stdout, p.stdout)
check(backing_of("rbd:rbd/q-cli-s1") == ("rbd:rbd/q-cli", "qcow2"),
      backing_of("rbd:rbd/q-cli-s1"))
ok("strata add-export and snapshot with rbd: specs (an RBD overlay created)")
check(dmn5.stop() == 0, "stratad exit status (QMP rbd)")
ok(f"while blockdev-add waited {result['took']:.1f} s for monitors that do not answer, "
   f"the local export served {reads} reads ({len(waiting)} before the last 0.5 s), the "
   f"slowest in {worst * 1000:.1f} ms")
print("PASS")
