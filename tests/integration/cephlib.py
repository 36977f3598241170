"""A throw-away Ceph cluster for the RBD tests (contrib/ceph-cluster.sh),
and the small tools they share: bounded subprocess runs and the rbd CLI.

start() brings up one ceph-mon and one memstore ceph-osd on 127.0.0.1 in a
temporary directory, points every client at it (CEPH_CONF) and stops it at
exit whatever happens (atexit, also on SIGTERM from meson's timeout).
Images are small: memstore keeps every byte in RAM.
"""
import atexit
import os
import signal
import subprocess
import sys
import time

import harness
from harness import check, fail

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLUSTER_SH = os.path.join(ROOT, "contrib", "ceph-cluster.sh")


def run(args, timeout=30, ok_codes=(0,), input=None):
    """Runs args (bounded by timeout); fails the test on another exit code."""
    try:
        p = subprocess.run(args, capture_output=True, timeout=timeout,
                           input=input)
    except subprocess.TimeoutExpired:
        fail(f"{' '.join(args)}: no answer within {timeout} s")
    if p.returncode not in ok_codes:
        fail(f"{' '.join(args)} exited with {p.returncode}:\n"
             f"{p.stderr.decode(errors='replace')}")
    return p


def rbd(*args, timeout=30):
    return run(["rbd", *args], timeout=timeout).stdout.decode()


def skip_without_librbd():
    """Built without librbd?  Then rbd: exports cannot work here: say so."""
    p = subprocess.run([harness.STRATAD, "--listen", "unix:/nonexistent/probe.sock",
                        "--export", "file=rbd:p/i:conf=/nonexistent/ceph.conf"],
                       capture_output=True, timeout=30)
    if b"built without librbd" in p.stderr:
        harness.skip("stratad was built without librbd (meson setup -Drbd=enabled)")


class Cluster:
    def __init__(self, cdir):
        self.dir = cdir
        self.conf = os.path.join(cdir, "ceph.conf")
        self.osd_pid = int(open(os.path.join(cdir, "run", "osd.pid")).read())
        self.strata_keyring = os.path.join(cdir, "client.strata.keyring")

    def stop(self):
        subprocess.run([CLUSTER_SH, "stop", self.dir], timeout=60)


def start():
    """Starts the cluster (or fails the test with its logs) and returns it."""
    harness.need("ceph-mon", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool")
    skip_without_librbd()
    # meson stops a test that overruns with SIGTERM: exit through atexit so
    # that the cluster is stopped all the same.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    cdir = os.path.join(harness.tmpdir(), "ceph")
    os.environ["CEPH_CONF"] = os.path.join(cdir, "ceph.conf")  # every client
    atexit.register(lambda: subprocess.run([CLUSTER_SH, "stop", cdir], timeout=60))
    t = time.time()
    p = subprocess.run([CLUSTER_SH, "start", cdir], capture_output=True, timeout=90)
    if p.returncode != 0:
        logs = ""
        for f in ("mon.a.log", "osd.0.log", "mkfs.out"):
            path = os.path.join(cdir, "log", f)
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    logs += f"--- {f} (tail)\n" + "".join(fh.readlines()[-20:])
        fail(f"the Ceph cluster did not start:\n{p.stderr.decode()}\n{logs}")
    harness.ok(f"ceph cluster up in {time.time() - t:.1f} s ({cdir})")
    check(os.path.exists(os.path.join(cdir, "run", "osd.pid")), "no osd.pid")
    return Cluster(cdir)
