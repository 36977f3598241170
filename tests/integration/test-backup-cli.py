#!/usr/bin/python3
"""`strata backup start EXPORT [--incremental BITMAP]` / `strata backup
end EXPORT [--abort]`: start prints the NBD URI of the frozen view (it
reads the disk of the instant while the guest overwrites it) and the
bitmap for the next incremental; an incremental's view offers the
meta context of what changed; end removes the view, its scratch image
and the exported bitmap; --abort merges the new bitmap back into the old
one, which records again; after a kill -9 and restart, end removes the
scratch node and image the interrupted backup left; a second start on a running backup, an end
without one and an unknown verb fail with exit 1 / 2 and a message.

Run:  STRATAD=build/daemon/stratad STRATA_CLI=build/contrib/strata \\
      /usr/bin/python3 tests/integration/test-backup-cli.py
"""
import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "nbdinfo")
import backuplib as bl  # noqa: E402

CLI = os.environ.get("STRATA_CLI") or os.path.join(
    os.path.dirname(harness.STRATAD), "..", "contrib", "strata")
SIZE = 8 * bl.MiB
d = harness.tmpdir()
disk = os.path.join(d, "disk.qcow2")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, str(SIZE)], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x33 0 {SIZE}", disk],
               check=True, capture_output=True)
ctl = os.path.join(d, "ctl.sock")
state = os.path.join(d, "state.json")


def start():
    return harness.Daemon([f"name=disk,file={disk},format=qcow2"],
                          extra=["--control", ctl, "--state-file", state])


dmn = start()
S = QMP(ctl)


def cli(*args, rc=0):
    p = subprocess.run([CLI, "--socket", ctl, *args], capture_output=True, text=True,
                       timeout=60)
    check(p.returncode == rc, f"strata {' '.join(args)}: rc {p.returncode}, want {rc}\n"
          f"{p.stdout}{p.stderr}")
    return p.stdout + p.stderr


def bitmaps():
    for n in S.cmd("query-named-block-nodes"):
        if n["node-name"] == "disk":
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}


h = bl.nbd.NBD()
h.connect_uri(dmn.uri("disk"))
out = cli("--json", "backup", "start", "disk", "--bitmap", "bm1")
r = json.loads(out)
check(r["export"] == "backup-disk" and r["bitmap"] == "bm1", out)
uri = r["uris"][0]
check(uri == dmn.uri("backup-disk"), f"uri {uri}, want {dmn.uri('backup-disk')}")
check(os.path.exists(r["scratch"]), f"no scratch image {r['scratch']}")
h.pwrite(b"\x44" * 65536, 0)
h.flush()
view = bl.read_all(uri, SIZE)
check(view == b"\x33" * SIZE, "the view does not read the disk of the instant")
out = cli("backup", "start", "disk", rc=1)
check("running" in out, out)
out = cli("backup", "end", "disk")
check("--incremental bm1" in out, out)
check(not os.path.exists(r["scratch"]), "scratch image left behind")
check(list(bitmaps()) == ["bm1"] and bitmaps()["bm1"]["recording"], f"{bitmaps()}")
ok("full backup: the printed URI reads the instant; end drops the view and scratch")

h.pwrite(b"\x55" * 65536, 3 * 65536)
h.flush()
out = cli("backup", "start", "disk", "--incremental", "bm1", "--bitmap", "bm2")
check(dmn.uri("backup-disk") in out and "qemu:dirty-bitmap:bm1" in out, out)
ext = bl.dirty_extents(dmn.uri("backup-disk"), "bm1")
check(ext == [(0, 65536), (3 * 65536, 65536)], f"dirty extents {ext}")
h.pwrite(b"\x66" * 65536, 5 * 65536)
h.flush()
cli("backup", "end", "disk", "--abort")
bms = bitmaps()
check(list(bms) == ["bm1"] and bms["bm1"]["recording"] and bms["bm1"]["count"] == 3 * 65536,
      f"--abort: {bms}")
ok("incremental: the view offers the changes; --abort merges the new bitmap back")

out = cli("backup", "start", "disk", "--incremental", "bm1", "--bitmap", "bm3")
ext = bl.dirty_extents(dmn.uri("backup-disk"), "bm1")
check(ext == [(0, 65536), (3 * 65536, 65536), (5 * 65536, 65536)], f"dirty extents {ext}")
cli("backup", "end", "disk")
check(list(bitmaps()) == ["bm3"], f"{bitmaps()}")
out = cli("backup", "end", "disk", rc=1)
check("no backup of disk is running" in out, out)
out = cli("backup", "stop", "disk", rc=2)
check("expected start or end" in out, out)
ok("the next incremental after --abort holds both changes; errors exit 1 and 2")

# a restart interrupts a backup: end removes what it left
r = json.loads(cli("--json", "backup", "start", "disk", "--bitmap", "bm4"))
h.shutdown()
dmn.proc.send_signal(signal.SIGKILL)
dmn.proc.wait()
dmn = start()
S = QMP(ctl)
out = cli("backup", "end", "disk")
check("interrupted" in out, out)
check(not os.path.exists(r["scratch"]), "scratch image left behind after the restart")
check(not any(n["node-name"].startswith("backup-") for n in S.cmd("query-named-block-nodes")),
      "scratch node left behind")
cli("backup", "start", "disk")
cli("backup", "end", "disk")
p = subprocess.run(["qemu-img", "check", disk], capture_output=True, text=True)
check(p.returncode in (0, 3), p.stdout + p.stderr)
ok("after a restart interrupted a backup, end removes its scratch node and image")
