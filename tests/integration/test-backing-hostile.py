#!/usr/bin/python3
"""Backing names written in an image header may not reach beyond what the
operator allows.  No Ceph cluster is needed: every refusal below happens
before any connection.

1. A local qcow2 whose backing name is
     rbd:pool/img:conf=/dev/null:keyring=FIFO:mon_host=127.0.0.1\\:PORT:connect_timeout=1
   (PORT: a socket this test listens on; FIFO: a named pipe, which a
   reader's open would block on) is refused with a message naming the key
   ('conf') and saying how to serve such an image (backing-remote=); the
   listener received no connection and stratad did not block on the FIFO.
   The same with backing-remote=rbd: on the export (the header still may
   not choose the cluster).  Each key alone (conf, keyring, id, mon_host,
   timeout, connect_timeout, a Ceph option) is refused by name.
2. A clean backing name (rbd:pool/img) under a local image is refused
   unless the export sets backing-remote=; with backing-remote=rbd:
   mon_host=127.0.0.1\\:PORT the daemon does try the monitor the operator
   named (the listener sees a connection) -- only when stratad has librbd.
   A backing-remote= that names no remote storage is refused.
3. Backing files are opened beneath the backing root: a thread swaps the
   backing file's directory with a symlink out of the root while stratad
   starts again and again; every start either refuses or serves the data
   inside the root, never the file outside (the open itself cannot leave
   the root: openat2 RESOLVE_BENEATH).
4. QMP blockdev-add follows the same rules with the same two settings
   (backing-root, backing-remote): refused without them, a relative
   backing-root refused, served with them, and kept across a restart
   through the state file.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-backing-hostile.py
"""
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, fail, need, ok  # noqa: E402
from qcow2lib import KiB, MiB, qemu_io, run, stratad_refuses  # noqa: E402

need("qemu-img", "qemu-io")
harness.require_built()
harness.nbd_handle()
harness.report_unexpected_exceptions()
import nbd  # noqa: E402

D = harness.tmpdir()
P = lambda name: os.path.join(D, name)  # noqa: E731


def overlay(name, backing, bfmt="raw", directory=D):
    path = os.path.join(directory, name)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", bfmt,
         path, str(MiB)])
    return path


class Listener:
    """A TCP socket on 127.0.0.1 that counts the connections it gets."""

    def __init__(self):
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        self.s.listen(16)
        self.s.settimeout(0.2)
        self.port = self.s.getsockname()[1]
        self.count = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            try:
                c, _ = self.s.accept()
                self.count += 1
                c.close()
            except socket.timeout:
                pass

    def close(self):
        self.stop.set()
        self.t.join()
        self.s.close()


def refused(what, export, phrases, timeout=30):
    code, out = stratad_refuses([export], timeout=timeout)
    for ph in phrases:
        check(ph in out, f"{what}: message lacks {ph!r}:\n{out[-2000:]}")
    line = [x for x in out.splitlines() if phrases[0] in x]
    ok(f"{what}: refused (exit {code}): ...{(line[0] if line else out)[-150:]}")
    return out


# ---------------------------------------------------------------------------
# 1. The probe, and each key a header may not set.

lis = Listener()
fifo = P("keyring.fifo")
os.mkfifo(fifo)
probe = (f"rbd:pool/img:conf=/dev/null:keyring={fifo}:"
         f"mon_host=127.0.0.1\\:{lis.port}:connect_timeout=1")
top = overlay("probe.qcow2", probe)
for extra, what in (("", "the probe"), (",backing-remote=rbd:",
                                        "the probe, export with backing-remote=rbd:")):
    refused(what, f"name=x,file={top},format=qcow2,readonly=on{extra}",
            ["sets 'conf'", "backing-remote=rbd:"])
check(lis.count == 0, f"stratad connected {lis.count} time(s) to the monitor the "
                      "image named")
ok("the probe: no connection to the listener on 127.0.0.1, no open of the keyring "
   "FIFO (stratad would have blocked on it)")

cases = [
    ("conf=/etc/passwd", "sets 'conf'"),
    (f"keyring={fifo}", "sets 'keyring'"),
    ("id=admin", "sets 'id'"),
    (f"mon_host=127.0.0.1\\:{lis.port}", "sets the Ceph option 'mon_host'"),
    ("timeout=0", "sets 'timeout'"),
    ("connect_timeout=1", "sets 'connect_timeout'"),
    (f"log_file={P('evil.log')}", "sets the Ceph option 'log_file'"),
]
for i, (opt, phrase) in enumerate(cases):
    top = overlay(f"key{i}.qcow2", f"rbd:pool/img:{opt}")
    refused(f"backing name with {opt.split('=')[0]}",
            f"name=x,file={top},format=qcow2,readonly=on,backing-remote=rbd:",
            [phrase])
check(lis.count == 0, f"stratad connected {lis.count} time(s) to the listener")
check(not os.path.exists(P("evil.log")), "the header's log_file was created")

# ---------------------------------------------------------------------------
# 2. A clean name: only where the export allows it, with its settings.

top = overlay("clean.qcow2", "rbd:pool/img")
refused("an RBD backing image under a local image, no backing-remote=",
        f"name=x,file={top},format=qcow2,readonly=on",
        ["names an RBD image under a local image", "backing-remote=rbd:"])
refused("backing-remote= naming a directory",
        f"name=x,file={top},format=qcow2,readonly=on,backing-remote=/srv",
        ["backing-remote=/srv", "prefix of remote storage"])
refused("backing-remote= with bad settings",
        f"name=x,file={top},format=qcow2,readonly=on,backing-remote=rbd:conf",
        ["backing-remote=rbd:conf", "expected KEY=VALUE"])
check(lis.count == 0, f"stratad connected {lis.count} time(s) to the listener")
out = refused("backing-remote= naming a monitor that is no monitor",
              f"name=x,file={top},format=qcow2,readonly=on,backing-remote=rbd:"
              f"mon_host=127.0.0.1\\:{lis.port}:connect_timeout=2", ["rbd:pool/img"],
              timeout=90)
if "without librbd" in out or "cannot load" in out:
    print("note: stratad cannot open RBD images here; the operator's monitor is "
          "not tried")
else:
    check(lis.count > 0, "stratad did not try the monitor given in backing-remote=:\n"
          + out[-2000:])
    ok(f"the export's backing-remote= settings are used: {lis.count} connection(s) "
       "to the monitor it names")
lis.close()

# ---------------------------------------------------------------------------
# 3. A symlink swapped in between check and open.

outside = harness.tmpdir()
root = P("root")
os.makedirs(os.path.join(root, "store"))
for d, pattern in ((os.path.join(root, "store"), 0x11), (outside, 0x66)):
    base = os.path.join(d, "base.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(MiB)])
    qemu_io(base, [f"write -P {pattern} 0 64k"])
top = overlay("top.qcow2", "store/base.qcow2", bfmt="qcow2", directory=root)
os.symlink(outside, os.path.join(root, "evil"))

stop = threading.Event()
swaps = [0]


def swapper():
    """store <-> evil, over and over: 'store' is the real directory one
    moment and a symlink out of the root the next (or briefly missing)."""
    s, e, t = (os.path.join(root, x) for x in ("store", "evil", "tmp"))
    while not stop.is_set():
        os.rename(s, t)
        os.rename(e, s)
        os.rename(t, e)
        swaps[0] += 1


def start_once(i):
    sdir = harness.tmpdir()
    sock, pid = os.path.join(sdir, "s.sock"), os.path.join(sdir, "pid")
    log = open(os.path.join(sdir, "log"), "w+")
    p = subprocess.Popen([harness.STRATAD, "--listen", "unix:" + sock, "--pid-file", pid,
                          "--export", f"name=x,file={top},format=qcow2,readonly=on"],
                         stdout=log, stderr=subprocess.STDOUT,
                         preexec_fn=harness._die_with_parent)
    deadline = time.time() + 30
    while not os.path.exists(pid) and p.poll() is None:
        if time.time() > deadline:
            p.kill()
            fail(f"round {i}: stratad neither served nor refused in 30 s")
        time.sleep(0.01)
    if p.poll() is not None:
        log.seek(0)
        text = log.read()
        check(p.returncode > 0, f"round {i}: stratad died: {p.returncode}\n{text}")
        for marker in ("ERROR: AddressSanitizer", "runtime error:"):
            check(marker not in text, f"round {i}: sanitizer report:\n{text}")
        if "leads out of the backing root" in text:
            return "refused at the open (the swap came after the check)"
        if "outside the export's backing root" in text:
            return "refused at the check"
        return "refused otherwise (the directory was being swapped)"
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///x?socket={sock}")
    data = h.pread(64 * KiB, 0)
    h.shutdown()
    p.terminate()
    p.wait(30)
    check(data == b"\x11" * (64 * KiB),
          f"round {i}: served data that is not the file inside the root "
          f"(first byte {data[0]:#x}: 0x66 is the file outside)")
    return "served the file inside the root"


th = threading.Thread(target=swapper, daemon=True)
th.start()
outcomes = {}
ROUNDS = int(os.environ.get("STRATA_RACE_ROUNDS", "25"))
for i in range(ROUNDS):
    r = start_once(i)
    outcomes[r] = outcomes.get(r, 0) + 1
stop.set()
th.join()
ok(f"{ROUNDS} starts while the backing directory was swapped {swaps[0]} times with "
   f"a symlink out of the root: {outcomes}; the file outside was never served")

# ---------------------------------------------------------------------------
# 4. The same rules for nodes added over QMP, with the same two settings.

qd = harness.tmpdir()
ctl = os.path.join(qd, "ctl.sock")
state = os.path.join(qd, "state.json")
dmn = harness.Daemon([], extra=["--control", ctl, "--state-file", state])
q = harness.QMP(ctl)
# a backing file one directory up from the top: outside the top's directory
updir = os.path.join(qd, "images")
os.makedirs(os.path.join(updir, "vm"))
ubase = os.path.join(updir, "base.raw")
harness.make_file(ubase, MiB, b"\x22")
utop = overlay("top.qcow2", "../base.raw", directory=os.path.join(updir, "vm"))


def qmp_refused(args, phrases):
    try:
        q.cmd("blockdev-add", **args)
    except harness.QMPError as e:
        for ph in phrases:
            check(ph in e.desc, f"blockdev-add {args}: {e.desc!r} lacks {ph!r}")
        return e.desc
    fail(f"blockdev-add {args} was accepted")


fileobj = {"driver": "file", "filename": utop}
d1 = qmp_refused({"driver": "qcow2", "node-name": "n1", "file": fileobj},
                 ["backing root"])
d2 = qmp_refused({"driver": "qcow2", "node-name": "n1", "file": fileobj,
                  "backing-root": "images"}, ["'backing-root' must be an absolute"])
q.cmd("blockdev-add", driver="qcow2", node_name="n1", file=fileobj,
      backing_root=updir)
q.cmd("block-export-add", type="nbd", id="e1", node_name="n1")
h = nbd.NBD()
h.connect_uri(dmn.uri("n1"))
check(h.pread(4096, 0) == b"\x22" * 4096, "the backing file under backing-root")
h.shutdown()
rtop = overlay("rclean.qcow2", "rbd:pool/img", directory=qd)
d3 = qmp_refused({"driver": "qcow2", "node-name": "n2", "read-only": True,
                  "file": {"driver": "file", "filename": rtop}},
                 ["names an RBD image under a local image", "backing-remote"])
d4 = qmp_refused({"driver": "qcow2", "node-name": "n2", "read-only": True,
                  "file": {"driver": "file", "filename": rtop},
                  "backing-remote": "/srv"}, ["prefix of remote storage"])
ptop = overlay("rprobe.qcow2", "rbd:pool/img:conf=/etc/passwd", directory=qd)
d5 = qmp_refused({"driver": "qcow2", "node-name": "n3", "read-only": True,
                  "file": {"driver": "file", "filename": ptop},
                  "backing-remote": "rbd:"}, ["sets 'conf'"])
# the setting survives a restart through the state file
dmn.stop()
dmn = harness.Daemon([], extra=["--control", ctl, "--state-file", state])
h = nbd.NBD()
h.connect_uri(dmn.uri("n1"))
check(h.pread(4096, 0) == b"\x22" * 4096, "after a restart from the state file")
h.shutdown()
check(dmn.stop() == 0, "stratad did not stop cleanly")
ok("blockdev-add: a backing file outside the top's directory needs an absolute "
   "backing-root, kept across a restart; an RBD backing under a local image needs "
   "backing-remote, and the header still may not set Ceph keys")
