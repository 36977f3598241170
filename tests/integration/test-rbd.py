#!/usr/bin/python3
"""The rbd backend against a real, throw-away Ceph cluster.

contrib/ceph-cluster.sh starts one ceph-mon and one ceph-osd (memstore) on
127.0.0.1 in a temporary directory; it is stopped at the end whatever
happens (atexit, also on SIGTERM from meson's timeout).  Images are small:
memstore keeps every byte in RAM.

 1. Bad specs fail at start-up, clearly: missing pool, image or
    snapshot, unknown user, wrong key, a monitor address where nothing
    listens (conf= file and mon_host=: connect_timeout=1 gives up while
    connect_timeout=5, started at the same time, still waits).
 2. A daemon with rbd: exports has loaded librbd and librados (stratad
    loads them when the first rbd: export opens; test-lifecycle.py checks
    that a daemon without one has not).
    A raw RBD export through libnbd: size and flags, reads against the
    imported bytes, writes (also FUA), write zeroes (with and without
    NO_HOLE and FAST_ZERO), trim (content old-or-zero), flush, cache, block
    status against `rbd diff`, 64 requests in flight, the range errors; the
    image then equals the model by `qemu-img compare` through qemu's own
    rbd driver.  An @SNAP export is read-only with the snapshot's bytes; a
    namespace image and a less privileged user (id=, keyring=) work.
 3. Backend growth, truncate and reopen (what qcow2 on RBD needs): the
    built tool rbd-backend-check drives the backend directly; then a qcow2
    image stored in an RBD image is written through stratad's qcow2
    driver (the RBD image grows), checked with qemu-img check and compare.
 4. Differential: the same seeded workload (writes, FUA, zeroes, trims,
    flushes, reads) on stratad over one image and qemu-nbd's rbd driver
    over an `rbd cp` copy; every read compared; the images end identical.
 5. Faults: the OSD is stopped (SIGSTOP) during I/O.  RBD requests end
    within a bound set by the export's timeout= (librbd's cache may take
    some), a read of data on the OSD only and a flush fail with EIO, a
    file export of the same daemon keeps serving meanwhile, the daemon
    stays up; after SIGCONT the RBD export works again, and every
    acknowledged write is in the image.
 6. librbd's writeback cache asked for together with a timeout: after a
    failed flush, every later flush (and FUA write) fails, even with the
    OSD back, and the daemon exits with status 1.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-rbd.py
"""
import atexit
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, check, fail, need  # noqa: E402
import cephlib  # noqa: E402
from cephlib import run  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
SEED = int(os.environ.get("STRATA_SEED", "20261122"))
DIFF_OPS = int(os.environ.get("STRATA_OPS", "1500"))
DEADLINE = time.time() + 220        # bounds a hang of the whole test; meson's is 240

need("qemu-nbd", "qemu-img")
harness.require_built()
harness.nbd_handle()
import nbd  # noqa: E402

harness.report_unexpected_exceptions()
ok = harness.ok
soft = harness.check_soft
first_diff = harness.first_diff


def remaining():
    left = DEADLINE - time.time()
    check(left > 0, "the test ran out of its time budget")
    return left


# ---------------------------------------------------------------------------
# The cluster (every client: rbd, qemu, stratad, reads CEPH_CONF).

cluster = cephlib.start()
d = harness.tmpdir()
CONF = cluster.conf
OSD_PID = cluster.osd_pid
STRATA_KEYRING = cluster.strata_keyring


rbd = cephlib.rbd


def rbd_import(data, name):
    path = os.path.join(d, name + ".src")
    with open(path, "wb") as f:
        f.write(data)
    rbd("import", "--no-progress", path, "rbd/" + name)
    os.unlink(path)


def rbd_bytes(spec):
    """The image's bytes, read by qemu's rbd driver (qemu-img convert)."""
    out = os.path.join(d, "export.raw")
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "rbd:" + spec, out],
        timeout=60)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


# ---------------------------------------------------------------------------
# 1. Bad specs: clear errors (a hang is bounded, not the speed).

rng = random.Random(SEED)
rbd("create", "--size", "4M", "rbd/small")


def start_bad(spec):
    return subprocess.Popen([harness.STRATAD, "--listen",
                             "unix:" + os.path.join(d, f"bad-{rng.random()}.sock"),
                             "--export", f"name=x,file={spec}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def refused(spec, p, phrase, hang_s=30):
    """Waits for the stratad p started on spec to exit (hang_s only bounds a
    hang) and checks that it refused, with phrase in its message."""
    try:
        _, err = p.communicate(timeout=hang_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        fail(f"{spec}: stratad still starting after {hang_s} s (a hang)")
    err = err.decode(errors="replace").strip()
    check(p.returncode != 0, f"{spec}: stratad started (exit {p.returncode}):\n{err}")
    for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
        check(marker not in err, f"{spec}: sanitizer report from stratad:\n{err}")
    soft(phrase in err, f"{spec}: message lacks {phrase!r}:\n{err}")
    return err


def start_fails(spec, phrase):
    err = refused(spec, start_bad(spec), phrase)
    ok(f"refused: {err.splitlines()[-1] if err else '?'}")


def connect_times_out(spec_short, spec_long, phrase):
    """connect_timeout= bounds the wait for monitors that do not answer.
    Both specs name a cluster whose monitors do not answer, spec_short with
    connect_timeout=1, spec_long with connect_timeout=5.  Started together,
    the first must give up while the second still waits (an order, which a
    busy machine does not change), and not before its 1 s (a lower bound,
    which a busy machine cannot break either)."""
    t0 = time.monotonic()
    short, slow = start_bad(spec_short), start_bad(spec_long)
    err = refused(spec_short, short, phrase)
    dt = time.monotonic() - t0
    check(slow.poll() is None, f"{spec_long}: gave up (exit {slow.returncode}) no later "
          f"than {spec_short}, whose connect_timeout is shorter")
    soft(dt >= 0.9, f"{spec_short}: gave up after {dt:.1f} s, before its connect_timeout")
    refused(spec_long, slow, "no answer from the Ceph monitors")
    ok(f"connect_timeout=1 gave up after {dt:.1f} s while connect_timeout=5 still "
       f"waited: {err.splitlines()[-1] if err else '?'}")


dead_port = harness.free_port()
dead_conf = os.path.join(d, "dead.conf")
with open(CONF) as f:
    text = f.read()
with open(dead_conf, "w") as f:
    f.write("\n".join(f"mon host = v2:127.0.0.1:{dead_port}"
                      if line.startswith("mon host") else line
                      for line in text.splitlines()) + "\n")

start_fails("rbd:nopool/small", "pool 'nopool' does not exist")
start_fails("rbd:rbd/nosuch", "image 'nosuch' does not exist")
start_fails("rbd:rbd/small@nosnap", "snapshot 'nosnap'")
start_fails(f"rbd:rbd/small:id=nobody:keyring={STRATA_KEYRING}",
            "refused client.nobody")
start_fails("rbd:rbd/small:id=strata", "refused client.strata")  # admin's key
start_fails(f"rbd:rbd/small:keyring={d}/missing.keyring", "keyring")
connect_times_out(f"rbd:rbd/small:conf={dead_conf}:connect_timeout=1",
                  f"rbd:rbd/small:conf={dead_conf}:connect_timeout=5",
                  "no answer from the Ceph monitors within 1 s")
connect_times_out(f"rbd:rbd/small:mon_host=127.0.0.1\\:{dead_port}:connect_timeout=1",
                  f"rbd:rbd/small:mon_host=127.0.0.1\\:{dead_port}:connect_timeout=5",
                  "no answer from the Ceph monitors")
start_fails(f"rbd:rbd/small:conf={d}/no-such.conf", "cannot read the Ceph configuration")
start_fails("rbd:rbd/small:no_such_ceph_option=1", "is not a Ceph option")
start_fails("rbd:rbd", "expected rbd:POOL/[NAMESPACE/]IMAGE")
start_fails("rbd:rbd/small:timeout=abc", "expected whole seconds")
harness.finish_soft_checks()

# ---------------------------------------------------------------------------
# 2. Every NBD command on a raw RBD export.

SIZE = 24 * MiB + 12 * KiB            # not a multiple of the object size
OBJ = 4 * MiB
model = bytearray(rng.randbytes(SIZE))
rbd_import(bytes(model), "disk")
rbd("snap", "create", "rbd/disk@s1")
snap_data = bytes(model)
run(["rbd", "namespace", "create", "rbd/ns1"])
rbd("create", "--size", "1M", "rbd/ns1/nsimg")
rbd("create", "--size", "20M", "rbd/sparse")
rbd("create", "--size", "2M", "rbd/nocache")

dm = Daemon([f"name=disk,file=rbd:rbd/disk:timeout=20,format=raw",
             "name=snap,file=rbd:rbd/disk@s1,readonly=on",
             "name=ns,file=rbd:rbd/ns1/nsimg",
             f"name=user,file=rbd:rbd/small:id=strata:keyring={STRATA_KEYRING}",
             "name=sparse,file=rbd:rbd/sparse:timeout=20",
             "name=nocache,file=rbd:rbd/nocache,cache=none"])
ok("stratad serves six RBD exports")
libs = harness.mapped_ceph_libs(dm.proc.pid)
check(any(n.startswith("librbd.so") for n in libs)
      and any(n.startswith("librados.so") for n in libs),
      f"stratad serving rbd: exports should have loaded librbd and librados; mapped: {libs}")
ok(f"librbd loaded once an rbd: export opened ({', '.join(libs)})")


def handle(name, meta=False):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(dm.uri(name))
    return h


def old_or_zero(got, old, off):
    """Offsets (relative) of the 4 KiB blocks, aligned on the disk, whose
    bytes after a trim are neither all the old ones nor all zeros."""
    bad = []
    i = 0
    while i < len(got):
        j = min(len(got), (off + i) // 4096 * 4096 + 4096 - off)
        blk = got[i:j]
        if blk != old[i:j] and blk != bytes(j - i):
            bad.append(i)
        i = j
    return bad


def expect_errno(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        return soft(e.errnum == want, f"{what}: expected {errno.errorcode[want]}, "
                    f"got {e.errnum}: {e.string}")
    return soft(False, f"{what}: expected {errno.errorcode[want]}, but it succeeded")


h = handle("disk", meta=True)
check(h.get_size() == SIZE, f"size {h.get_size()}, expected {SIZE}")
flags = dict(ro=h.is_read_only(), flush=h.can_flush(), fua=h.can_fua(),
             trim=h.can_trim(), zero=h.can_zero(), fast_zero=h.can_fast_zero(),
             cache=h.can_cache(), df=h.can_df(), meta=h.can_meta_context("base:allocation"))
check(not flags["ro"] and flags["flush"] and flags["fua"] and flags["trim"]
      and flags["zero"] and flags["meta"], f"export flags: {flags}")
ok(f"size {SIZE}, flags {flags}")

# reads against the imported bytes, aligned and not, across objects
for off, n in [(0, 4096), (1, 1), (OBJ - 100, 200), (OBJ - 1, 2 * OBJ + 2),
               (SIZE - 4096, 4096), (SIZE - 1, 1), (12345, 1 * MiB + 7)]:
    got = h.pread(n, off)
    check(got == model[off:off + n], f"read {n} at {off}: differs at "
          f"+{first_diff(got, model[off:off + n])}")
ok("reads equal the imported bytes (unaligned, across objects, up to the end)")

# writes, FUA, overwrites
for i in range(40):
    n = rng.choice([1, 511, 4096, 65536, 300 * KiB, MiB + 3])
    off = rng.randrange(0, SIZE - n)
    data = rng.randbytes(n)
    h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 3 == 0 else 0)
    model[off:off + n] = data
    got = h.pread(n, off)
    check(got == data, f"write {n} at {off}: read back differs at +{first_diff(got, data)}")
h.pwrite(b"\xee" * 4096, SIZE - 4096, nbd.CMD_FLAG_FUA)
model[SIZE - 4096:] = b"\xee" * 4096
ok("40 writes (1 B to 1 MiB, a third with FUA) read back; last block written")

# write zeroes: plain, NO_HOLE, FAST_ZERO (may be refused with ENOTSUP)
for off, n, fl in [(100, 5000, 0), (OBJ - 4096, 8192, nbd.CMD_FLAG_NO_HOLE),
                   (2 * OBJ, OBJ, 0), (3 * OBJ + 7, 70000, nbd.CMD_FLAG_FUA),
                   (5 * OBJ, 65536, nbd.CMD_FLAG_FAST_ZERO)]:
    try:
        h.zero(n, off, fl)
    except nbd.Error as e:
        check(fl & nbd.CMD_FLAG_FAST_ZERO and e.errnum == errno.ENOTSUP,
              f"zero {n} at {off} flags {fl}: {e.string}")
        ok(f"fast zero of {n} at {off} refused with ENOTSUP")
        continue
    model[off:off + n] = bytes(n)
    check(h.pread(n, off) == bytes(n), f"zero {n} at {off} flags {fl}: not zero")
expect_errno(lambda: h.zero(65536, 5 * OBJ + MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE),
             errno.ENOTSUP, "fast zero with NO_HOLE (thick zeroes are slow)")
ok("write zeroes (plain, NO_HOLE, FUA, FAST) read as zeros")

# trim: content afterwards is either the old bytes or zeros
for off, n in [(0, 8192), (OBJ, OBJ), (4 * OBJ + 100, 70000),
               (4 * OBJ + 300000, 200000), (SIZE - 65536, 65536)]:
    old = bytes(model[off:off + n])
    h.trim(n, off)
    got = h.pread(n, off)
    bad = old_or_zero(got, old, off)
    check(not bad, f"trim {n} at {off}: 4 KiB blocks at +{bad[:3]} neither old nor zero")
    model[off:off + n] = got
ok("trims leave each block old or zero (small ones are skipped by librbd)")

h.flush()
h.cache(MiB, 0)
ok("flush and cache")

# range errors
expect_errno(lambda: h.pread(4096, SIZE - 2048), errno.EINVAL, "read past the end")
expect_errno(lambda: h.pwrite(b"x" * 4096, SIZE - 2048), errno.ENOSPC, "write past the end")
expect_errno(lambda: h.zero(4096, SIZE), errno.ENOSPC, "zero past the end")

# 64 requests in flight, then read all back
slots = []
for i in range(64):
    n = rng.choice([4096, 65536, 200 * KiB])
    off = (i * (SIZE // 64)) + rng.randrange(0, SIZE // 64 - n)
    slots.append((off, rng.randbytes(n)))
cookies = [h.aio_pwrite(b, off) for off, b in slots]
t0 = time.time()
while h.aio_in_flight() > 0:
    h.poll(1)
    check(time.time() - t0 < 30, "64 writes still in flight after 30 s")
for c in cookies:
    h.aio_command_completed(c)
for off, b in slots:
    model[off:off + len(b)] = b
bufs = [nbd.Buffer(len(b)) for _, b in slots]
cookies = [h.aio_pread(buf, off) for buf, (off, _) in zip(bufs, slots)]
while h.aio_in_flight() > 0:
    h.poll(1)
    check(time.time() - t0 < 30, "64 reads still in flight after 30 s")
for buf, (off, b) in zip(bufs, slots):
    check(buf.to_bytearray() == b, f"in-flight write of {len(b)} at {off} read back wrong")
ok("64 writes then 64 reads in flight at once")

whole = h.pread(SIZE, 0) if SIZE <= 32 * MiB else None
check(whole == model, f"whole image differs from the model at +{first_diff(whole, model)}")
h.shutdown()
ok("whole image equals the model through stratad")

# block status against rbd diff, on a sparse image
hs = handle("sparse", meta=True)
writes = [(0, 4096), (4 * MiB + 100, 10), (13 * MiB, 3 * MiB), (20 * MiB - 1, 1)]
for off, n in writes:
    hs.pwrite(b"\x5a" * n, off)
hs.flush()
ext = []
pos = 0
while pos < 20 * MiB:
    def cb(meta, off, entries, err, ext=ext):
        for i in range(0, len(entries), 2):
            ext.append((entries[i], entries[i + 1]))
        return 0
    before = sum(e[0] for e in ext)
    hs.block_status(20 * MiB - pos, pos, cb)
    pos = sum(e[0] for e in ext)
    check(pos > before, "block status made no progress")
got_alloc = []
o = 0
for n, fl in ext:
    if not fl & nbd.STATE_HOLE:
        got_alloc.append((o, n))
    o += n
check(all(fl in (0, nbd.STATE_HOLE | nbd.STATE_ZERO) for _, fl in ext),
      f"block status flags other than data / hole+zero: {ext}")
diff = json.loads(rbd("diff", "--whole-object", "--format", "json", "rbd/sparse"))
want_alloc = []
for e in diff:
    if want_alloc and want_alloc[-1][0] + want_alloc[-1][1] == e["offset"]:
        want_alloc[-1] = (want_alloc[-1][0], want_alloc[-1][1] + e["length"])
    else:
        want_alloc.append((e["offset"], e["length"]))
merged = []
for a in got_alloc:
    if merged and merged[-1][0] + merged[-1][1] == a[0]:
        merged[-1] = (merged[-1][0], merged[-1][1] + a[1])
    else:
        merged.append(a)
check(merged == want_alloc, f"block status data extents {merged}, rbd diff says {want_alloc}")
for off, n in writes:
    check(any(a <= off and off + n <= a + ln for a, ln in merged),
          f"written range {off}+{n} not reported as data: {merged}")
ok(f"block status data extents = rbd diff --whole-object: {merged}")
hs.zero(4 * MiB, 12 * MiB)       # whole object 3 (12-16 MiB): deallocated
ext2 = []
hs.block_status(4 * MiB, 12 * MiB, lambda m, o, e, err: ext2.extend(e) or 0)
check(ext2[1] & nbd.STATE_ZERO, f"block status after zeroing a whole object: {ext2}")
hs.shutdown()
ok("block status sees a zeroed object as a hole (the window was refreshed)")

# the snapshot: read-only, its bytes
hn = handle("snap")
check(hn.is_read_only(), "the @s1 export is not read-only")
check(hn.pread(SIZE, 0) == snap_data, "the @s1 export does not read the snapshot's bytes")
expect_errno(lambda: hn.pwrite(b"x", 0), errno.EPERM, "write to the @s1 export")
hn.shutdown()
ok("@SNAP export: read-only, the snapshot's bytes")

for name, size in (("ns", MiB), ("user", 4 * MiB), ("nocache", 2 * MiB)):
    hh = handle(name)
    check(hh.get_size() == size, f"{name}: size {hh.get_size()}")
    data = rng.randbytes(size)
    hh.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    check(hh.pread(size, 0) == data, f"{name}: read back differs")
    hh.shutdown()
ok("a namespace image, client.strata with its own keyring, and cache=none work")

check(dm.stop() == 0, f"stratad exit status {dm.proc.returncode}")
harness.finish_soft_checks()
p = run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
         "rbd:rbd/disk", "rbd:rbd/disk@s1"], ok_codes=(0, 1))
check(p.returncode == 1, "qemu-img compare: the image still equals its snapshot")
with open(os.path.join(d, "model.raw"), "wb") as f:
    f.write(model)
run(["qemu-img", "compare", "-f", "raw", "-F", "raw", os.path.join(d, "model.raw"),
     "rbd:rbd/disk"], timeout=60)
ok("after stop: qemu-img compare (qemu's rbd driver): image == model")

# ---------------------------------------------------------------------------
# 3. Growth and truncate through the backend API (what qcow2 on RBD needs).

tool = os.environ.get("RBD_BACKEND_CHECK")
if tool and os.path.exists(tool):
    rbd("create", "--size", "3M", "rbd/grow")
    p = run([tool, "rbd:rbd/grow"], timeout=60)
    out = p.stdout.decode()
    final = int(out.split("final size ")[1].split()[0])
    info = json.loads(rbd("info", "--format", "json", "rbd/grow"))
    check(info["size"] == final, f"after close the image is {info['size']} bytes, "
          f"the backend's logical end was {final} (slack not cut)")
    ok(f"rbd-backend-check: {out.strip().splitlines()[-1]}; rbd info size {info['size']}")
else:
    fail("RBD_BACKEND_CHECK (tests/integration/rbd-backend-check) is not built")

# ---------------------------------------------------------------------------
# 3b. A qcow2 image stored in an RBD image: the qcow2 driver appends
# clusters past the end of its file, so the RBD image grows under it.

QSIZE = 32 * MiB
run(["qemu-img", "create", "-q", "-f", "qcow2", "rbd:rbd/q1", str(QSIZE)])
size0 = json.loads(rbd("info", "--format", "json", "rbd/q1"))["size"]
dqc = Daemon(["name=q,file=rbd:rbd/q1,format=qcow2"])
hq = nbd.NBD()
hq.connect_uri(dqc.uri("q"))
check(hq.get_size() == QSIZE, f"qcow2 on RBD: virtual size {hq.get_size()}")
qmodel = bytearray(QSIZE)
qrng = random.Random(SEED + 2)
for i in range(300):
    n = qrng.choice([512, 4096, 65536, 300 * KiB, MiB])
    off = qrng.randrange(0, QSIZE - n)
    op = qrng.random()
    if op < 0.8:
        data = qrng.randbytes(n)
        hq.pwrite(data, off, nbd.CMD_FLAG_FUA if qrng.random() < 0.1 else 0)
        qmodel[off:off + n] = data
    else:
        hq.zero(n, off)
        qmodel[off:off + n] = bytes(n)
hq.flush()
got = hq.pread(QSIZE, 0)
check(got == qmodel, f"qcow2 on RBD: read back differs at +{first_diff(got, qmodel)}")
hq.shutdown()
check(dqc.stop() == 0, "stratad did not stop cleanly (qcow2 on RBD)")
size1 = json.loads(rbd("info", "--format", "json", "rbd/q1"))["size"]
chk = json.loads(run(["qemu-img", "check", "--output=json", "rbd:rbd/q1"],
                     ok_codes=(0, 2, 3)).stdout)
check(chk.get("corruptions", 0) == 0 and chk.get("leaks", 0) == 0 and
      chk.get("check-errors", 0) == 0, f"qemu-img check of the qcow2 on RBD: {chk}")
check(size1 > size0, f"the RBD image did not grow under qcow2 ({size0} -> {size1})")
check(size1 == chk["image-end-offset"],
      f"RBD image size {size1} after close, qcow2 ends at {chk['image-end-offset']} "
      "(the growth slack was not cut)")
with open(os.path.join(d, "qmodel.raw"), "wb") as f:
    f.write(qmodel)
run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
     os.path.join(d, "qmodel.raw"), "rbd:rbd/q1"], timeout=60)
ok(f"qcow2 stored in RBD: 300 writes and zeroes, the image grew {size0} -> {size1} "
   "bytes (= qcow2's end after close), qemu-img check clean, compare == model")

# ---------------------------------------------------------------------------
# 4. Differential against qemu-nbd's rbd driver on a copy.

DSIZE = 16 * MiB
dmodel = bytearray(rng.randbytes(DSIZE))
rbd_import(bytes(dmodel), "da")
rbd("cp", "--no-progress", "rbd/da", "rbd/db")

qdir = harness.tmpdir()
qsock = os.path.join(qdir, "q.sock")
qlog = open(os.path.join(qdir, "qemu-nbd.log"), "w+")
qproc = subprocess.Popen(["qemu-nbd", "-f", "raw", "--cache=writeback", "--discard=unmap",
                          "-t", "-x", "db", "-k", qsock, "rbd:rbd/db"],
                         stdout=qlog, stderr=subprocess.STDOUT,
                         preexec_fn=harness._die_with_parent)
atexit.register(lambda: qproc.poll() is None and (qproc.kill(), qproc.wait()))
t0 = time.time()
while not os.path.exists(qsock):
    check(qproc.poll() is None, f"qemu-nbd exited: {open(qlog.name).read()}")
    check(time.time() - t0 < 20, "qemu-nbd did not start in 20 s")
    time.sleep(0.05)
ds = Daemon(["name=da,file=rbd:rbd/da"])
ha = nbd.NBD()
ha.connect_uri(ds.uri("da"))
hb = nbd.NBD()
hb.connect_uri(f"nbd+unix:///db?socket={qsock}")
check(ha.get_size() == hb.get_size() == DSIZE, "differential: sizes differ")

drng = random.Random(SEED + 1)
counts = {}
digest_a, digest_b = hashlib.sha256(), hashlib.sha256()
for i in range(DIFF_OPS):
    if i % 100 == 0:
        remaining()
    op = drng.choices(["write", "zero", "trim", "flush", "read"], [45, 12, 8, 5, 30])[0]
    n = drng.choice([1, 512, 4096, 4096, 65536, 100 * KiB, 1 * MiB])
    off = drng.randrange(0, DSIZE - n)
    counts[op] = counts.get(op, 0) + 1
    if op == "write":
        data = drng.randbytes(n)
        fl = nbd.CMD_FLAG_FUA if drng.random() < 0.2 else 0
        ha.pwrite(data, off, fl)
        hb.pwrite(data, off, fl)
        dmodel[off:off + n] = data
    elif op == "zero":
        fl = nbd.CMD_FLAG_NO_HOLE if drng.random() < 0.5 else 0
        ha.zero(n, off, fl)
        hb.zero(n, off, fl)
        dmodel[off:off + n] = bytes(n)
    elif op == "trim":
        # content after a trim is unspecified: check old-or-zero, then
        # zero the range on both so that the images stay comparable
        old = bytes(dmodel[off:off + n])
        for hh, who in ((ha, "stratad"), (hb, "qemu-nbd")):
            hh.trim(n, off)
            got = hh.pread(n, off)
            bad = old_or_zero(got, old, off)
            check(not bad, f"op {i}: {who}: trim {n} at {off}: 4 KiB blocks at "
                  f"+{bad[:3]} neither old nor zero")
            hh.zero(n, off)
        dmodel[off:off + n] = bytes(n)
    elif op == "flush":
        ha.flush()
        hb.flush()
    else:
        a = ha.pread(n, off)
        b = hb.pread(n, off)
        digest_a.update(a)
        digest_b.update(b)
        check(a == dmodel[off:off + n], f"op {i}: stratad read {n} at {off} differs "
              f"from the model at +{first_diff(a, dmodel[off:off + n])} (seed {SEED})")
        check(b == a, f"op {i}: qemu-nbd and stratad read {n} at {off} differently")
check(digest_a.digest() == digest_b.digest(), "read digests differ")
ha.shutdown()
hb.shutdown()
check(ds.stop() == 0, "stratad did not stop cleanly after the differential run")
qproc.send_signal(signal.SIGTERM)
qproc.wait(30)
run(["qemu-img", "compare", "-f", "raw", "-F", "raw", "rbd:rbd/da", "rbd:rbd/db"], timeout=60)
with open(os.path.join(d, "dmodel.raw"), "wb") as f:
    f.write(dmodel)
run(["qemu-img", "compare", "-f", "raw", "-F", "raw", os.path.join(d, "dmodel.raw"),
     "rbd:rbd/da"], timeout=60)
ok(f"differential: {DIFF_OPS} ops {counts} (seed {SEED}); qemu-img compare: "
   "stratad's image == qemu-nbd's image == model")

# ---------------------------------------------------------------------------
# 5. Faults: the OSD stops in the middle of I/O.
#
# With a timeout, librbd's cache writes through: a write ends when the OSD
# has it or fails with EIO; reads of cached data may still succeed.  So
# requests may succeed or fail, but each must end within a bound.  What
# must fail: a read of data that is on the OSD only, and a flush if any
# write was acknowledged while the OSD was stopped.

TIMEOUT = 4
# every object exists (else the object map answers reads of holes without
# the OSD), and nothing of it is in stratad's cache yet
rbd_import(rng.randbytes(16 * MiB), "fault")
fpath = harness.make_file(os.path.join(d, "local.img"), 8 * MiB, b"local!")
df = Daemon([f"name=rbd,file=rbd:rbd/fault:timeout={TIMEOUT}",
             f"name=local,file={fpath}"])
hr = nbd.NBD()
hr.connect_uri(df.uri("rbd"))
hl = nbd.NBD()
hl.connect_uri(df.uri("local"))
hr.pwrite(b"\x11" * MiB, 9 * MiB, nbd.CMD_FLAG_FUA)

stop_io = threading.Event()
io_log = []   # (start, end, ok, errno) of each background rbd request
io_writes = []  # (off, data, ok, start, end) of its writes, in order


def rbd_io():
    h2 = nbd.NBD()
    h2.connect_uri(df.uri("rbd"))
    r = random.Random(7)
    while not stop_io.is_set():
        off = r.randrange(0, 8 * MiB - 65536)      # the first half only
        t0 = time.time()
        try:
            if r.random() < 0.5:
                data = r.randbytes(65536)
                try:
                    h2.pwrite(data, off)
                    io_writes.append((off, data, True, t0, time.time()))
                except nbd.Error:
                    io_writes.append((off, data, False, t0, time.time()))
                    raise
            else:
                h2.pread(65536, off)
            io_log.append((t0, time.time(), True, 0))
        except nbd.Error as e:
            io_log.append((t0, time.time(), False, e.errnum))
    h2.shutdown()


worker = threading.Thread(target=rbd_io, daemon=True)
worker.start()
atexit.register(stop_io.set)          # runs before the daemon is stopped
time.sleep(0.5)
check(io_log and all(x[2] for x in io_log), f"rbd I/O before the fault: {io_log[:5]}")
n_before = len(io_log)
os.kill(OSD_PID, signal.SIGSTOP)
atexit.register(lambda: os.kill(OSD_PID, signal.SIGCONT))
t_stop = time.time()
ok(f"OSD stopped (SIGSTOP) after {n_before} rbd requests")

# While the OSD is stopped, in a second thread: a read of data held by
# the OSD only, then a write and a flush.  Meanwhile the local export must
# keep serving.  (The whole pause stays well inside the PGs' read lease;
# see contrib/ceph-cluster.sh.)
fault = {}


def rbd_checks():
    h3 = nbd.NBD()
    h3.connect_uri(df.uri("rbd"))
    t0 = time.time()
    fault["read_start"] = t0
    try:
        h3.pread(4096, 12 * MiB)
        fault["read"] = ("ok", time.time() - t0)
    except nbd.Error as e:
        fault["read"] = (e.errnum, time.time() - t0)
    fault["read_end"] = time.time()
    try:
        h3.pwrite(b"\x33" * 4096, 10 * MiB)
        fault["write"] = "taken by librbd's cache"
    except nbd.Error as e:
        fault["write"] = f"failed with {errno.errorcode.get(e.errnum, e.errnum)}"
    t0 = time.time()
    fault["flush_start"] = t0
    try:
        h3.flush()
        fault["flush"] = ("ok", time.time() - t0)
    except nbd.Error as e:
        fault["flush"] = (e.errnum, time.time() - t0)
    h3.shutdown()


checker = threading.Thread(target=rbd_checks, daemon=True)
checker.start()
lat = []    # (start, end) of each local write+read pair
# The loop bound only bounds a hang: the checks end with EIO (timeout=),
# the OSD stays stopped until they have.
while checker.is_alive() and time.time() - t_stop < 3 * TIMEOUT + 60:
    t0 = time.time()
    hl.pwrite(b"L" * 4096, 4096)
    check(hl.pread(4096, 4096) == b"L" * 4096, "local export: wrong data during the fault")
    lat.append((t0, time.time()))
    time.sleep(0.05)
checker.join(1)
check(not checker.is_alive(), f"RBD requests still unanswered {time.time() - t_stop:.0f} s "
      f"after the OSD stopped (timeout={TIMEOUT}): {fault}")
check(df.alive(), "stratad died while the OSD was stopped")
# The local export is not blocked by the stuck RBD read: local pairs start
# and complete while that read is still unanswered.  (A blocked loop would
# answer them only together with the read; the 0.5 s keeps a pair answered
# in the same instant as the read out of the count.)
during_read = [x for x in lat if x[0] > fault["read_start"]
               and x[1] < fault["read_end"] - 0.5]
check(len(during_read) >= 3, f"local export stalled during the RBD fault: only "
      f"{len(during_read)} of {len(lat)} local write+read pairs completed while the RBD "
      f"read ({fault['read'][1]:.1f} s) was unanswered")
ok(f"local export served {len(lat)} write+read pairs meanwhile, {len(during_read)} of them "
   f"while the RBD read was unanswered; slowest {max(e - b for b, e in lat) * 1000:.0f} ms")
# The flush must fail if any write was acknowledged while the OSD was
# stopped (it can only be in librbd's cache); with none, there is nothing
# to make durable and success is right.
acked = [w for w in io_writes if w[2] and t_stop + 0.1 < w[3] and w[4] < fault["flush_start"]]
must_fail = fault["write"].startswith("taken") or bool(acked)
for what in ("read", "flush"):
    res, _ = fault[what]
    if what == "read" or must_fail:
        check(res == errno.EIO, f"{what} while the OSD is stopped: expected EIO, got {res} "
              f"(write: {fault['write']}; {len(acked)} background writes acknowledged)")
    else:
        check(res in ("ok", errno.EIO), f"flush while the OSD is stopped: {res}")
    # Answered while the OSD was still stopped (checked above: the OSD
    # resumes only after), so timeout= ended them: without it librbd
    # would wait for the OSD.  How long they took is not asserted.
flush_res = "failed with EIO" if fault["flush"][0] == errno.EIO else "succeeded"
ok(f"while the OSD was stopped: a read of data held by the OSD only failed with EIO "
   f"after {fault['read'][1]:.1f} s; a write {fault['write']}; "
   f"{len(acked)} background writes acknowledged; a flush {flush_res} after "
   f"{fault['flush'][1]:.1f} s" + ("" if must_fail else " (nothing to make durable)"))
wrote = fault["write"]
harness.finish_soft_checks()

os.kill(OSD_PID, signal.SIGCONT)
t_cont = time.time()
recovered = None
while time.time() - t_cont < 40:
    try:
        hr.pwrite(b"\x22" * 65536, 11 * MiB, nbd.CMD_FLAG_FUA)
        if hr.pread(65536, 11 * MiB) == b"\x22" * 65536:
            recovered = time.time() - t_cont
            break
    except nbd.Error:
        time.sleep(0.5)
check(recovered is not None, "the RBD export did not work again within 40 s of SIGCONT")
# The OSD first works off what queued up while it was stopped: on a loaded
# machine a request may still time out just after the resume.  The export
# is back when the background client's last 50 requests all succeeded.
streak_deadline = time.time() + 30
while True:
    tail = io_log[-50:]
    if len(io_log) - n_before >= 50 and tail[0][0] > t_cont and all(x[2] for x in tail):
        break
    check(time.time() < streak_deadline, "the background RBD client had no 50 "
          f"successes in a row within 30 s of the resume: {io_log[-5:]}")
    time.sleep(0.2)
streak_at = time.time() - t_cont
stop_io.set()
worker.join(30)
check(not worker.is_alive(), "the background RBD client is stuck")
during = io_log[n_before:]
longest = max(x[1] - x[0] for x in during)
failed = sorted(set(errno.errorcode.get(x[3], x[3]) for x in during if not x[2]))
# No background request waited for the OSD: while it was stopped the
# client, which sends one request at a time, kept getting answers (EIO, or
# from librbd's cache) and was not stuck on one until the resume.
done_stopped = [x for x in during if x[1] < t_cont]
check(len(done_stopped) >= 1, f"the background RBD client got no answer in the "
      f"{t_cont - t_stop:.1f} s the OSD was stopped (timeout={TIMEOUT}): {during[:3]}")
ok(f"background client: {len(during)} requests since the stop, {len(done_stopped)} "
   f"answered while the OSD was stopped, longest {longest:.1f} s, "
   f"errors {failed or 'none'} (the others: reads from librbd's cache)")
n_after = [x for x in io_log if x[0] > t_cont]
ok(f"OSD resumed: the RBD export works again after {recovered:.1f} s; the background "
   f"client had 50 successes in a row {streak_at:.1f} s after the resume "
   f"({sum(1 for x in n_after if not x[2])} of its {len(n_after)} requests since failed)")
hr.shutdown()
hl.shutdown()
check(df.stop() == 0, f"stratad did not stop cleanly after the fault (exit {df.proc.returncode})")

# Nothing acknowledged is lost: a flush succeeded after the recovery, so
# every write acknowledged before it is on the OSD, including those that
# librbd's cache took during the fault.  Bytes last touched by a failed
# write are unknown.
img = rbd_bytes("rbd/fault")
exp = bytearray(8 * MiB)
known = bytearray(8 * MiB)
for off, data, good, _, _ in io_writes:
    exp[off:off + len(data)] = data
    known[off:off + len(data)] = (b"\x01" if good else b"\x00") * len(data)
ALL, NONE = b"\x01" * 4096, bytes(4096)
bad = []
for i in range(0, 8 * MiB, 4096):
    m = known[i:i + 4096]
    if m == NONE:
        continue
    if m == ALL:
        differs = img[i:i + 4096] != exp[i:i + 4096]
    else:
        differs = any(m[k] and img[i + k] != exp[i + k] for k in range(4096))
    if differs:
        bad.append(i)
check(not bad, f"acknowledged background writes missing from the image at "
      f"{[hex(b) for b in bad[:4]]} ({len(bad)} blocks)")
check(img[9 * MiB:10 * MiB] == b"\x11" * MiB, "the FUA write made before the fault is gone")
check(img[11 * MiB:11 * MiB + 65536] == b"\x22" * 65536, "the FUA write after the recovery is gone")
if wrote.startswith("taken"):
    check(img[10 * MiB:10 * MiB + 4096] == b"\x33" * 4096,
          "the write taken by librbd's cache during the fault is lost, though a "
          "later flush succeeded")
ok(f"after stop: every acknowledged write is in the image "
   f"({sum(1 for w in io_writes if w[2])} background writes, "
   f"{sum(1 for w in io_writes if not w[2])} failed)")

# ---------------------------------------------------------------------------
# 6. librbd's writeback cache asked for explicitly (rbd_cache_max_dirty)
# together with a timeout: a write taken by the cache while the OSD is
# stopped, then a flush fails.  librbd forgets what it could not write
# back, so every later flush must keep failing (even once the OSD is back),
# and the daemon's final flush too: exit status 1.

dq = Daemon([f"name=rbd,file=rbd:rbd/fault:timeout={TIMEOUT}"
             ":rbd_cache_max_dirty=8388608"])
hq = nbd.NBD()
hq.connect_uri(dq.uri("rbd"))
hq.pwrite(b"\x44" * 65536, 0, nbd.CMD_FLAG_FUA)    # the cache goes writeback
os.kill(OSD_PID, signal.SIGSTOP)
atexit.register(lambda: os.kill(OSD_PID, signal.SIGCONT))   # before dq.stop
try:
    hq.pwrite(b"\x55" * 65536, 65536)
    cached = True
except nbd.Error as e:
    check(e.errnum == errno.EIO, f"write with the OSD stopped: {e.string}")
    cached = False
# It fails while the OSD is still stopped (SIGCONT comes after), so the
# timeout= ended it; how long it took is only reported.
t0 = time.time()
expect_errno(hq.flush, errno.EIO, "flush of a write held by the writeback cache, OSD stopped")
flush_s = time.time() - t0
os.kill(OSD_PID, signal.SIGCONT)
time.sleep(1)
expect_errno(hq.flush, errno.EIO, "flush after a failed one, OSD back (must stay failed)")
expect_errno(lambda: hq.pwrite(b"\x66" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EIO,
             "FUA write after a failed flush")
hq.shutdown()
t0 = time.time()
status = dq.stop(timeout=6 * TIMEOUT + 10)
dt = time.time() - t0
check(status == 1, f"stratad exit status {status} after a failed flush (expected 1)")
text = dq.logtext()
check("every later flush fails too" in text and "final flush failed" in text,
      f"the log does not say why flushes fail:\n{text}")
ok(f"writeback cache: a write {'taken by the cache' if cached else 'failed'}, its flush "
   f"failed with EIO after {flush_s:.1f} s, and so did every later flush and FUA write "
   f"with the OSD back; "
   f"exit status 1 after {dt:.1f} s")
harness.finish_soft_checks()
ok("done")
