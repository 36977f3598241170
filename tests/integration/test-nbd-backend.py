#!/usr/bin/env python3
"""The nbd: backend: layers served by other NBD servers.

1. Header rules: a local qcow2 overlay whose backing name is nbd+unix://...
   is refused without backing-remote=nbd:..., and one naming another
   server than the allowed one too.
2. The golden-image case, base exported read-only by nbdkit (unix socket):
   a seeded workload (writes, FUA writes, zeroes, trims, flushes) on
   stratad's export of the overlay and on qemu-nbd's export of a twin
   overlay whose backing the same nbdkit serves to QEMU's own nbd driver;
   qemu-img compare of the two exports, qemu-img check of what stratad
   wrote.
3. The same with the base exported by qemu-nbd over TCP (nbd://).
4. raw over nbd: as the top (writable) layer, on nbdkit's memory plugin:
   writes, zeroes, trims and FUA reach the server (the bytes equal a model
   and the server's own base:allocation map equals stratad's: block
   status passes through); over a server without FUA, a TRIM with FUA is
   followed by a flush before its reply.
6. A base exported by another stratad; a qcow2 image stored on an NBD
   export (nbdkit memory), added over QMP as QEMU's driver=nbd file node:
   the same workload as on a local image under qemu-nbd gives the same
   bytes, and qemu-img check (over NBD) passes.
5. The base's server killed and restarted under load (nbdkit, and
   qemu-nbd): requests that need the base fail with EIO while it is gone,
   an export on a local file keeps being served meanwhile (the loop never
   blocks), after the restart and reconnect-delay reads of the base are
   right again, every successful write is there, and qemu-img check
   passes.
"""
import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import check, fail, ok, skip  # noqa: E402
from nbdserver import Server  # noqa: E402

harness.require_built()
harness.need("nbdkit", "qemu-nbd", "qemu-img", "qemu-io")
h0 = harness.nbd_handle()
import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
D = harness.tmpdir()


def run(*args, timeout=60):
    p = subprocess.run(args, capture_output=True, timeout=timeout)
    if p.returncode != 0:
        fail(f"{' '.join(args)}: {p.stderr.decode(errors='replace')}")
    return p.stdout.decode()




def nbdkit_file(path, sock, readonly=True):
    return Server(["nbdkit", "-f", "--exit-with-parent", "-U", sock,
                   *(["-r"] if readonly else []), "file", path],
                  ready_path=sock)


def qemu_nbd_tcp(path, port, name, fmt="raw"):
    return Server(["qemu-nbd", "-t", "-e", "16", "-r", "-b", "127.0.0.1",
                   "-p", str(port), "-x", name, "-f", fmt, path], port=port)


def make_base(path):
    """SIZE bytes: a data pattern in some MiBs, holes elsewhere."""
    harness.make_file(path, SIZE)
    rnd = random.Random(16)
    with open(path, "r+b") as f:
        for m in range(0, SIZE // MiB):
            if m % 3 != 1:
                f.seek(m * MiB)
                f.write(bytes([(m * 7 + 1) & 0xff]) * (MiB // 2) +
                        rnd.randbytes(MiB // 2))


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def workload(h, seed, n=120, span=SIZE, trims=True):
    """Seeded writes, zeroes, trims and flushes, the same on every
    server.  What a trim leaves is unspecified, and qcow2 overlays differ
    (QEMU reads zeros, strata may show the backing image again): trims=False
    replaces them with flushes."""
    rnd = random.Random(seed)
    fua = nbd.CMD_FLAG_FUA if h.can_fua() else 0
    for i in range(n):
        op = rnd.random()
        off = rnd.randrange(0, span // 4096) * 4096
        ln = min(rnd.choice([4096, 65536, 4096 * rnd.randint(1, 100)]),
                 span - off)
        if op < 0.55:
            h.pwrite(rnd.randbytes(ln), off, fua if rnd.random() < 0.3 else 0)
        elif op < 0.7:
            h.zero(ln, off, 0 if rnd.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE)
        elif op < 0.85:
            if trims and h.can_trim():
                h.trim(ln, off)
        else:
            h.flush()
    h.flush()


def qemu_img_compare(a, b):
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       capture_output=True, timeout=120)
    check(p.returncode == 0, f"qemu-img compare {a} {b}: "
          f"{p.stdout.decode()} {p.stderr.decode()}")


def qemu_img_check(path):
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", "-U", path],
                       capture_output=True, timeout=60)
    check(p.returncode == 0, f"qemu-img check {path}: {p.stdout.decode()} "
          f"{p.stderr.decode()}")


def stratad_refuses(export, want):
    p = subprocess.run([harness.STRATAD, "--listen",
                        "unix:" + os.path.join(D, "refused.sock"),
                        "--export", export], capture_output=True, timeout=30)
    out = (p.stdout + p.stderr).decode(errors="replace")
    check(p.returncode != 0, f"stratad accepted {export}")
    check(want in out, f"stratad refused {export}, but said: {out}")


def overlay(path, backing):
    run("qemu-img", "create", "-f", "qcow2", "-b", backing, "-F", "raw",
        path, str(SIZE))


# ---- setup: a base, served by nbdkit on a unix socket ----
base = os.path.join(D, "base.raw")
make_base(base)
ksock = os.path.join(D, "nbdkit.sock")
kit = nbdkit_file(base, ksock)
kit.start()
kuri = f"nbd+unix:///?socket={ksock}"

# ---- 1. header rules ----
top = os.path.join(D, "top.qcow2")
overlay(top, kuri)
stratad_refuses(f"file={top},format=qcow2", "backing-remote=nbd:")
stratad_refuses(f"file={top},format=qcow2,backing-remote=nbd:unix:/nonesuch",
                "does not allow")
stratad_refuses(f"file={top},format=qcow2,backing-remote=nbd:", "no server")
ok("a header names an NBD server only where the export allows it")

# ---- 2. golden image on nbdkit, against QEMU's nbd driver ----
ref = os.path.join(D, "ref.qcow2")
overlay(ref, kuri)
local = os.path.join(D, "local.raw")
harness.make_file(local, 4 * MiB, b"L")
dm = harness.Daemon([
    f"name=top,file={top},format=qcow2,"
    f"backing-remote=nbd:unix:{ksock};reconnect-delay=1",
    f"name=local,file={local},format=raw"])
qsock = os.path.join(D, "qemu-nbd.sock")
qn = Server(["qemu-nbd", "-t", "-e", "16", "-k", qsock, "-f", "qcow2", ref],
            ready_path=qsock)
qn.start()
quri = f"nbd+unix:///?socket={qsock}"
hs, hq = connect(dm.uri("top")), connect(quri)
check(hs.get_size() == SIZE, f"size {hs.get_size()}")
qemu_img_compare(dm.uri("top"), kuri)
workload(hs, 1, span=SIZE // 2, trims=False)
workload(hq, 1, span=SIZE // 2, trims=False)
qemu_img_compare(dm.uri("top"), quri)
ok("qcow2 over an nbdkit base: the same bytes as QEMU's nbd driver")

# ---- 3. base on qemu-nbd over TCP ----
port = harness.free_port()
qbase = qemu_nbd_tcp(base, port, "golden")
qbase.start()
turi = f"nbd://127.0.0.1:{port}/golden"
top2, ref2 = os.path.join(D, "top2.qcow2"), os.path.join(D, "ref2.qcow2")
overlay(top2, turi)
overlay(ref2, turi)
stratad_refuses(f"file={top2},format=qcow2,backing-remote=nbd:127.0.0.2",
                "does not allow")
dm2 = harness.Daemon([f"name=top,file={top2},format=qcow2,"
                      f"backing-remote=nbd:127.0.0.1:{port};reconnect-delay=1",
                      f"name=local,file={local},format=raw"])
qsock2 = os.path.join(D, "qemu-nbd2.sock")
qn2 = Server(["qemu-nbd", "-t", "-e", "16", "-k", qsock2, "-f", "qcow2", ref2],
             ready_path=qsock2)
qn2.start()
h2s, h2q = connect(dm2.uri("top")), connect(f"nbd+unix:///?socket={qsock2}")
workload(h2s, 2, span=SIZE // 2, trims=False)
workload(h2q, 2, span=SIZE // 2, trims=False)
qemu_img_compare(dm2.uri("top"), f"nbd+unix:///?socket={qsock2}")
ok("qcow2 over a qemu-nbd base (TCP): the same bytes as QEMU's nbd driver")

# ---- 4. raw over nbd: as the writable top, on nbdkit memory ----
msock = os.path.join(D, "mem.sock")
mem = Server(["nbdkit", "-f", "--exit-with-parent", "-U", msock, "memory",
              str(SIZE)], ready_path=msock)
mem.start()
muri = f"nbd+unix:///?socket={msock}"
msock2 = os.path.join(D, "mem2.sock")
mem2 = Server(["nbdkit", "-f", "--exit-with-parent", "-U", msock2, "memory",
               str(SIZE)], ready_path=msock2)
mem2.start()
dm3 = harness.Daemon([f"file={muri},format=raw"])
h3 = connect(dm3.uri())
check(h3.can_zero() and h3.can_trim() and h3.can_fua(),
      "stratad offers zero, trim and FUA over nbdkit memory")
workload(h3, 3)
workload(connect(f"nbd+unix:///?socket={msock2}"), 3)
qemu_img_compare(dm3.uri(), f"nbd+unix:///?socket={msock2}")


def alloc_map(h):
    ents = []

    def cb(meta, off, e, err):
        if meta == "base:allocation":
            for i in range(0, len(e), 2):
                ents.append((e[i], e[i + 1]))
        return 0
    off = 0
    while off < SIZE:
        before = len(ents)
        h.block_status(SIZE - off, off, cb)
        check(len(ents) > before, f"no extents at {off}")
        off += sum(ln for ln, _ in ents[before:])
    merged = []
    pos = 0
    for ln, fl in ents:
        if merged and merged[-1][2] == fl:
            merged[-1][1] += ln
        else:
            merged.append([pos, ln, fl])
        pos += ln
    return merged


mk = connect(muri)
got, want = alloc_map(h3), alloc_map(mk)
check(got == want, f"block status through stratad {got[:8]}... differs "
      f"from the server's {want[:8]}...")
check(any(fl & 1 for _, _, fl in want), "the workload left holes")
check(any(not fl & 1 for _, _, fl in want), "the workload left data")
mk.shutdown()
ok("raw over nbd: writes, zeroes, trims and FUA reach the server; block "
   "status passes through")

# A server without FUA: a TRIM with FUA is followed by a flush before the
# reply (as a FUA write is), so that it is durable when acknowledged.
nsock, nlog = os.path.join(D, "nofua.sock"), os.path.join(D, "nofua.log")
nofua = Server(["nbdkit", "-f", "--exit-with-parent", "-U", nsock, "--filter=log",
                "--filter=fua", "memory", str(SIZE), f"logfile={nlog}"],
               ready_path=nsock)
nofua.start()
dm4 = harness.Daemon([f"file=nbd+unix:///?socket={nsock},format=raw"])
h4 = connect(dm4.uri())
check(h4.can_trim() and h4.can_fua(), "stratad offers trim and FUA over a server without FUA")
h4.pwrite(b"\x5a" * (1 * MiB), 0)
h4.flush()
mark = os.path.getsize(nlog)
h4.trim(256 * 1024, 0, nbd.CMD_FLAG_FUA)
with open(nlog) as f:
    f.seek(mark)
    ops = [w for line in f for w in line.split()[3:4] if w in ("Trim", "Flush", "Write", "Zero")]
check("Trim" in ops and "Flush" in ops[ops.index("Trim"):],
      f"a TRIM with FUA over a server without FUA sent {ops}, not a trim then a flush")
h4.shutdown()
dm4.stop()
ok("raw over nbd: a TRIM with FUA over a server without FUA is followed by a flush")

# ---- 6. another stratad as the base's server; a qcow2 image stored on an
# NBD export, added over QMP (QEMU's driver=nbd file node) ----
dmb = harness.Daemon([f"name=golden,file={base},format=raw,readonly=on"])
top3 = os.path.join(D, "top3.qcow2")
overlay(top3, dmb.uri("golden"))
ctl = os.path.join(D, "ctl.sock")
dm6 = harness.Daemon([f"name=top3,file={top3},format=qcow2,"
                      f"backing-remote=nbd:unix:{dmb.sock}"],
                     extra=["--control", ctl])
qemu_img_compare(dm6.uri("top3"), base)
msock3 = os.path.join(D, "mem3.sock")
mem3 = Server(["nbdkit", "-f", "--exit-with-parent", "-U", msock3, "memory",
               str(2 * SIZE)], ready_path=msock3)
mem3.start()
m3uri = f"nbd+unix:///?socket={msock3}"
run("qemu-img", "create", "-f", "qcow2", m3uri, str(SIZE))
q = harness.QMP(ctl)
q.cmd("blockdev-add", driver="qcow2", node_name="onnbd",
      file={"driver": "nbd", "server": {"type": "unix", "path": msock3}})
q.cmd("block-export-add", type="nbd", id="onnbd", node_name="onnbd",
      writable=True)
h6 = connect(dm6.uri("onnbd"))
workload(h6, 6, span=SIZE // 2, trims=False)
h6.shutdown()
# the same workload on a local qcow2 image served by qemu-nbd
ref6 = os.path.join(D, "ref6.qcow2")
run("qemu-img", "create", "-f", "qcow2", ref6, str(SIZE))
qsock6 = os.path.join(D, "qemu-nbd6.sock")
qn6 = Server(["qemu-nbd", "-t", "-k", qsock6, "-f", "qcow2", ref6],
             ready_path=qsock6)
qn6.start()
h6q = connect(f"nbd+unix:///?socket={qsock6}")
workload(h6q, 6, span=SIZE // 2, trims=False)
h6q.shutdown()
qemu_img_compare(dm6.uri("onnbd"), f"nbd+unix:///?socket={qsock6}")
qn6.kill()
check(dm6.stop() == 0, "stratad exited with an error")
p6 = subprocess.run(["qemu-img", "check", "-f", "qcow2", m3uri],
                    capture_output=True, timeout=60)
check(p6.returncode == 0, f"qemu-img check over NBD: {p6.stdout.decode()}")
ok("a base on another stratad; a qcow2 image on an NBD export (QMP "
   "driver=nbd) written like QEMU writes it, and qemu-img check passes")

# ---- 5. the base's server killed and restarted under load ----
LOAD_SPAN = 8 * MiB
BASE_SPAN = 4 * MiB


def outage(server, dmx, hname, label):
    """Load on export hname of dmx while server is killed and restarted."""
    h = connect(dmx.uri(hname))
    model = bytearray(h.pread(LOAD_SPAN, 0))
    unknown = set()            # 4 KiB blocks of failed writes
    stop = threading.Event()
    stats = {"ok": 0, "eio": 0, "other": [], "after": 0}
    restarted = threading.Event()
    with open(base, "rb") as f:
        f.seek(SIZE - BASE_SPAN)
        basedata = f.read(BASE_SPAN)

    def load():
        rnd = random.Random(5)
        hl = connect(dmx.uri(hname))
        while not stop.is_set():
            blk = rnd.randrange(0, LOAD_SPAN // 4096)
            off = blk * 4096
            r = rnd.random()
            try:
                if r < 0.3:
                    # the base alone answers these (beyond every write)
                    o = rnd.randrange(0, BASE_SPAN // 4096 - 1) * 4096
                    got = hl.pread(8192, SIZE - BASE_SPAN + o)
                    if got != basedata[o:o + 8192]:
                        stats["other"].append(f"base read at {o}: wrong data")
                elif r < 0.6:
                    data = rnd.randbytes(4096)
                    try:
                        hl.pwrite(data, off)
                        model[off:off + 4096] = data
                        unknown.discard(blk)
                    except nbd.Error:
                        unknown.add(blk)
                        raise
                else:
                    got = hl.pread(4096, off)
                    if blk not in unknown and got != model[off:off + 4096]:
                        stats["other"].append(f"read at {off}: wrong data")
                stats["ok"] += 1
                stats["after"] += restarted.is_set()
            except nbd.Error as e:
                if e.errnum == errno.EIO:
                    stats["eio"] += 1
                else:
                    stats["other"].append(f"errno {e.errnum}: {e.string}")
        hl.shutdown()

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.5)
    server.kill()
    # requests that need the base fail; the local export is served
    deadline = time.time() + 30
    saw_eio = False
    hb = connect(dmx.uri(hname))
    while not saw_eio and time.time() < deadline:
        try:
            # beyond every workload's span: the base must answer
            hb.pread(4096, SIZE - 2 * MiB)
        except nbd.Error as e:
            check(e.errnum == errno.EIO, f"{label}: errno {e.errnum}")
            saw_eio = True
    check(saw_eio, f"{label}: reads of the base did not fail while its "
          "server was down")
    res = {}

    def read_local():
        hl = connect(dmx.uri("local"))
        res["data"] = hl.pread(MiB, 0)
        hl.shutdown()
    tl = threading.Thread(target=read_local)
    tl.start()
    tl.join(60)
    check(not tl.is_alive() and res.get("data") == b"L" * MiB,
          f"{label}: the local export was not served while the NBD server "
          "was down")
    time.sleep(0.5)
    server.start()
    # after reconnect-delay the base answers again
    deadline = time.time() + 30
    while True:
        try:
            got = hb.pread(MiB, SIZE - 2 * MiB)
            break
        except nbd.Error:
            check(time.time() < deadline, f"{label}: no reconnect")
            time.sleep(0.2)
    with open(base, "rb") as f:
        f.seek(SIZE - 2 * MiB)
        check(got == f.read(MiB), f"{label}: wrong base data after restart")
    restarted.set()
    deadline = time.time() + 30
    while stats["after"] < 100:
        check(time.time() < deadline, f"{label}: the load did not recover")
        time.sleep(0.1)
    stop.set()
    t.join(60)
    check(not t.is_alive(), f"{label}: the load did not finish")
    check(not stats["other"], f"{label}: {stats['other'][:5]}")
    check(stats["eio"] > 0, f"{label}: the load saw no EIO")
    final = hb.pread(LOAD_SPAN, 0)
    for blk in range(LOAD_SPAN // 4096):
        if blk not in unknown:
            o = blk * 4096
            if final[o:o + 4096] != model[o:o + 4096]:
                fail(f"{label}: block {blk} lost a write")
    hb.shutdown()
    h.shutdown()
    ok(f"{label}: killed and restarted under load ({stats['ok']} requests "
       f"done, {stats['eio']} EIO)")


for hh in (hs, hq, h2s, h2q, h3):
    hh.shutdown()
outage(kit, dm, "top", "nbdkit (unix socket)")
outage(qbase, dm2, "top", "qemu-nbd (TCP)")

for d in (dm, dm2, dm3):
    check(d.stop() == 0, "stratad exited with an error")
    d.check_sanitizers()
qn.kill()
qn2.kill()
qemu_img_check(top)
qemu_img_check(top2)
ok("qemu-img check passes on what stratad wrote")
print("PASS")
