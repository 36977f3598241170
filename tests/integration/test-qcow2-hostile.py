#!/usr/bin/python3
"""Hostile and corrupt qcow2 images.

Images start as qemu-img/qemu-io creations and are patched with struct.

Start-up: stratad must refuse each of these with a non-zero exit and a
message naming the problem (checked), within a timeout, without a signal or
a sanitizer report: L1 table past EOF / over the header; refcount table
past EOF; huge l1_size; huge virtual size; cluster_bits 8 and 22; an unknown
incompatible feature (its name from the feature name table must appear),
and one without a name; the corrupt bit with readonly=off (readonly=on is
served); backing loops a -> a and a -> b -> a; backing files outside the
backing root (/etc/passwd, ../x, a symlink out) refused, and served with
backing-root=; a chain of 65 layers refused (64 served); a missing backing
file.

I/O time: one daemon serves a healthy image next to images whose damage is
only found when a request touches it: a compressed L2 entry into the header
cluster, an L2 entry past the end of the file, an unaligned L2 table offset
in the L1 table, a compressed cluster holding garbage, a data cluster over
the L1 table (written to).  The request gets EIO, the daemon lives on and
the healthy export still reads and writes.

Refcount 0 for a data cluster in use (qemu-img check: "refcount=0
reference=1"): the allocator must not hand that cluster out for another
guest cluster, where a write to one would show in the other.  Reads of
the image go on (what the L2 tables map reads as QEMU reads it); every
write, allocating or in place, gets EIO, with a message naming the
cluster and 'qemu-img check -r all'; the cluster's bytes are unchanged
and no other guest offset shows them.  The same for two L2 entries that
both hold one cluster alone (COPIED, refcount 1), where a write in place
to one would show in the other.

Dirty images (incompatible bit 0, left by a qemu-io that aborted while
writing a lazy_refcounts image): readonly=on is served as QEMU reads it;
readonly=off is either refused with a message pointing at
'qemu-img check -r all', or (once stratad rebuilds refcounts) served, and
then qemu-img check must be clean after writes.  The test prints which.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-qcow2-hostile.py
"""
import errno
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import qcow2lib  # noqa: E402
from harness import check_soft, fail, need, ok  # noqa: E402
from qcow2lib import KiB, MiB, qemu_io, read_raw, run, stratad_refuses  # noqa: E402

need("qemu-img", "qemu-io")
harness.require_built()
harness.nbd_handle()
harness.report_unexpected_exceptions()
import nbd  # noqa: E402

D = harness.tmpdir()
CS = 64 * KiB
SIZE = 4 * MiB
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00fffffffffffe00


# ---------------------------------------------------------------------------
# images and patches

def make(name, opts="cluster_size=64k", size=SIZE, backing=None, bfmt="qcow2",
         writes=("write -P 0x11 0 128k", "write -P 0x22 1M 64k"), subdir=None,
         unsafe=False):
    d = os.path.join(D, subdir) if subdir else D
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", bfmt]
    if unsafe:
        args.append("-u")
    run(args + [path, str(size)])
    if writes:
        qemu_io(path, list(writes))
    return path


def get(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def put(path, off, fmt, val):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, val))


# header fields: offset, struct format
H = {"cluster_bits": (20, ">I"), "size": (24, ">Q"), "l1_size": (36, ">I"),
     "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
     "refcount_table_clusters": (56, ">I"), "incompatible": (72, ">Q"),
     "compatible": (80, ">Q"), "header_length": (100, ">I")}


def hget(path, field):
    return get(path, *H[field])


def hset(path, field, val):
    put(path, H[field][0], H[field][1], val)


def l1_entry_pos(path, i=0):
    return hget(path, "l1_table_offset") + 8 * i


def l2_entry_pos(path, i=0):
    l2 = get(path, l1_entry_pos(path), ">Q") & OFFSET_MASK
    if l2 == 0:
        fail(f"{path}: no L2 table for guest cluster 0")
    return l2 + 8 * i


def file_size(path):
    return os.path.getsize(path)


def copy(src, name):
    dst = os.path.join(D, name)
    with open(src, "rb") as a, open(dst, "wb") as b:
        b.write(a.read())
    return dst


def spec(path, name="x", ro=False, extra=""):
    return (f"name={name},file={path},format=qcow2,readonly={'on' if ro else 'off'}"
            + (f",{extra}" if extra else ""))


# ---------------------------------------------------------------------------
# start-up refusals

def refused(what, exports, *needles):
    """stratad must refuse; each needle must appear in its output."""
    code, out = stratad_refuses(exports)
    missing = [n for n in needles if n not in out]
    if check_soft(not missing, f"{what}: exit {code}, but the message lacks {missing}:\n"
                  f"{out.strip()[-1500:]}"):
        last = [ln for ln in out.strip().splitlines() if ln.strip()][-1]
        ok(f"{what}: refused (exit {code}): ...{last.strip()[-110:]}")


def served(what, exports, checks=()):
    """stratad must start; checks(daemon) may test it further."""
    srv = harness.Daemon(exports)
    for c in checks:
        c(srv)
    rc = srv.stop()
    check_soft(rc == 0, f"{what}: stratad exit status {rc}")
    ok(f"{what}: served")


def reads_like_qemu(path, name="x"):
    def c(srv):
        want = read_raw(path, tmp=os.path.join(D, "cmp"))
        got = qcow2lib.read_all(srv.uri(name), len(want))
        check_soft(got == want, f"{path}: stratad reads differently from QEMU at byte "
                   f"{harness.first_diff(got, want)}")
    return c


def feature_table_entry(path):
    """File offset of the first entry of the feature name table."""
    off = hget(path, "header_length")
    while True:
        magic, ln = get(path, off, ">I"), get(path, off + 4, ">I")
        if magic == 0:
            fail(f"{path}: no feature name table")
        if magic == 0x6803f857:
            return off + 8
        off += 8 + (ln + 7) // 8 * 8


def startup_cases():
    good = make("good.qcow2")
    top = hget(good, "l1_table_offset")

    p = copy(good, "l1-eof.qcow2")
    hset(p, "l1_table_offset", (file_size(p) // CS + 16) * CS)
    refused("L1 table past EOF", [spec(p)], "L1 table at", "past the end of the file")

    p = copy(good, "l1-header.qcow2")
    hset(p, "l1_table_offset", 0)
    refused("L1 table over the header", [spec(p)], "L1 table overlaps the header")

    p = copy(good, "rt-eof.qcow2")
    hset(p, "refcount_table_offset", (file_size(p) // CS + 16) * CS)
    refused("refcount table past EOF", [spec(p)], "refcount table at",
            "past the end of the file")

    p = copy(good, "rt-huge.qcow2")
    hset(p, "refcount_table_clusters", 0x7fffffff)
    refused("huge refcount table", [spec(p)], "refcount table too large")

    p = copy(good, "l1-huge.qcow2")
    hset(p, "l1_size", 0xffffffff)
    refused("huge l1_size", [spec(p)], "L1 table too large")

    p = copy(good, "l1-short.qcow2")
    hset(p, "size", 1 << 40)
    refused("virtual size larger than the L1 table covers", [spec(p)],
            "L1 table too small for the virtual size")

    p = copy(good, "size-huge.qcow2")
    hset(p, "size", 1 << 62)
    refused("huge virtual size", [spec(p)], "virtual size", "too large")

    for bits in (8, 22, 63):
        p = copy(good, f"cb{bits}.qcow2")
        hset(p, "cluster_bits", bits)
        refused(f"cluster_bits {bits}", [spec(p)], f"invalid cluster_bits {bits}")

    p = copy(good, "feature.qcow2")
    e = feature_table_entry(p)
    with open(p, "r+b") as f:
        f.seek(e)
        f.write(struct.pack(">BB46s", 0, 10, b"strata-test-frobnicate"))
    hset(p, "incompatible", hget(p, "incompatible") | 1 << 10)
    refused("unknown incompatible feature with a name", [spec(p, ro=True)],
            "strata-test-frobnicate", "bit 10")

    p = copy(good, "feature-noname.qcow2")
    hset(p, "incompatible", hget(p, "incompatible") | 1 << 40)
    refused("unknown incompatible feature without a name", [spec(p, ro=True)],
            "unknown incompatible feature bit 40")

    p = copy(good, "corrupt.qcow2")
    hset(p, "incompatible", hget(p, "incompatible") | 2)
    refused("corrupt bit, readonly=off", [spec(p)], "marked corrupt")
    served("corrupt bit, readonly=on", [spec(p, ro=True)], [reads_like_qemu(p)])
    del top

    # backing loops
    a = make("loop-a.qcow2")
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", a])
    refused("backing loop a -> a", [spec(a, ro=True)], "the backing chain loops")
    a = make("loop2-a.qcow2")
    make("loop2-b.qcow2", backing="loop2-a.qcow2")
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "loop2-b.qcow2", "-F", "qcow2", a])
    refused("backing loop a -> b -> a", [spec(a, ro=True)], "the backing chain loops")

    # backing root
    p = make("passwd.qcow2", backing="/etc/passwd", bfmt="raw", writes=())
    refused("backing /etc/passwd", [spec(p, ro=True)], "/etc/passwd", "outside",
            "backing root")
    served("backing /etc/passwd with backing-root=/etc",
           [spec(p, ro=True, extra="backing-root=/etc")], [reads_like_qemu(p)])
    base = make("up-base.qcow2")
    p = make("up.qcow2", backing="../up-base.qcow2", subdir="sub", writes=())
    refused("backing ../x with the default root", [spec(p)], "../up-base.qcow2", "outside")
    served("backing ../x with backing-root=..", [spec(p, extra=f"backing-root={D}")],
           [reads_like_qemu(p)])
    os.symlink("/etc/passwd", os.path.join(D, "sub", "link"))
    p = make("link.qcow2", backing="link", bfmt="raw", subdir="sub", writes=())
    refused("backing through a symlink out of the root", [spec(p, ro=True)], "outside")
    del base

    # chain depth: 64 layers open, 65 do not
    prev = None
    for i in range(65):
        name = f"deep{i}.qcow2"
        make(name, backing=prev, size=MiB,
             writes=(f"write -P {i + 1} {i * 8 * KiB} 4k",))
        prev = name
    served("chain of 64 layers", [spec(os.path.join(D, "deep63.qcow2"), ro=True)],
           [reads_like_qemu(os.path.join(D, "deep63.qcow2"))])
    refused("chain of 65 layers", [spec(os.path.join(D, "deep64.qcow2"), ro=True)],
            "backing chain deeper than 64 layers")

    p = make("missing.qcow2", backing="no-such-file.qcow2", writes=(), unsafe=True)
    refused("missing backing file", [spec(p, ro=True)], "no-such-file.qcow2",
            "No such file or directory")


# ---------------------------------------------------------------------------
# corruption met at I/O time

def io_cases():
    good = make("io-good.qcow2")
    bad = {}

    p = copy(good, "io-cheader.qcow2")
    # a compressed entry whose data starts inside the header cluster
    put(p, l2_entry_pos(p), ">Q", COMPRESSED | 0x100)
    bad["cheader"] = (p, 0, "compressed L2 entry into the header cluster")

    p = copy(good, "io-eof.qcow2")
    put(p, l2_entry_pos(p), ">Q", COPIED | (file_size(p) // CS + 64) * CS)
    bad["eof"] = (p, 0, "L2 entry past the end of the file")

    p = copy(good, "io-l1unaligned.qcow2")
    e = get(p, l1_entry_pos(p), ">Q")
    put(p, l1_entry_pos(p), ">Q", e + 0x200)
    bad["l1unaligned"] = (p, 0, "unaligned L2 table offset")

    src = os.path.join(D, "zsrc.raw")
    with open(src, "wb") as f:
        f.write(b"compressible " * (SIZE // 13) + bytes(SIZE % 13))
    z = os.path.join(D, "io-zgarbage.qcow2")
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src, z])
    e = get(z, l2_entry_pos(z), ">Q")
    if not e & COMPRESSED:
        fail("qemu-img convert -c did not write a compressed cluster")
    # cluster_bits 16: the host offset is the low 62 - (16 - 8) = 54 bits
    zoff = e & ((1 << 54) - 1)
    with open(z, "r+b") as f:
        f.seek(zoff)
        f.write(b"\xde\xad\xbe\xef" * 64)
    bad["zgarbage"] = (z, 0, "compressed cluster with garbage data")

    exports = [spec(good, "good")] + [spec(p, k) for k, (p, _, _) in bad.items()]
    meta = copy(good, "io-meta.qcow2")
    put(meta, l2_entry_pos(meta, 2), ">Q", COPIED | hget(meta, "l1_table_offset"))
    exports.append(spec(meta, "meta"))

    srv = harness.Daemon(exports)
    hg = nbd.NBD()
    hg.connect_uri(srv.uri("good"))
    want = read_raw(good, tmp=os.path.join(D, "g"))

    def healthy(after):
        got = hg.pread(256 * KiB, 0)
        check_soft(got == want[:256 * KiB], f"after {after}: the healthy export reads wrong data")
        hg.pwrite(b"\x5a" * 4096, 2 * MiB)
        check_soft(hg.pread(4096, 2 * MiB) == b"\x5a" * 4096,
                   f"after {after}: the healthy export's write does not read back")
        check_soft(srv.alive(), f"after {after}: stratad died")

    for k, (p, off, what) in bad.items():
        h = nbd.NBD()
        h.connect_uri(srv.uri(k))
        try:
            h.pread(CS, off)
            check_soft(False, f"{what}: the read succeeded, expected EIO")
        except nbd.Error as e:
            check_soft(e.errnum == errno.EIO, f"{what}: the read failed with {e}, expected EIO")
            if e.errnum == errno.EIO:
                ok(f"{what}: read gets EIO")
        h.shutdown()
        healthy(what)

    h = nbd.NBD()
    h.connect_uri(srv.uri("meta"))
    l1_before = open(meta, "rb").read()[hget(meta, "l1_table_offset"):][:CS]
    try:
        h.pwrite(b"\xee" * CS, 2 * CS)
        h.flush()
        check_soft(False, "data cluster over the L1 table: the write succeeded, expected EIO")
    except nbd.Error as e:
        check_soft(e.errnum == errno.EIO, f"data cluster over the L1 table: write failed with {e}, "
                   "expected EIO")
        if e.errnum == errno.EIO:
            ok("data cluster over the L1 table: write gets EIO")
    h.shutdown()
    l1_after = open(meta, "rb").read()[hget(meta, "l1_table_offset"):][:CS]
    check_soft(l1_after == l1_before, "data cluster over the L1 table: the L1 table changed")
    healthy("the write over the L1 table")
    hg.shutdown()
    log = srv.logtext()
    rc = srv.stop()
    check_soft(rc == 0, f"I/O cases: stratad exit status {rc}")
    check_soft("corrupt qcow2 image" in log, "I/O cases: no corruption logged:\n" + log[-2000:])
    code, out = qcow2lib.qemu_img_check(good)
    check_soft(code == 0, f"the healthy image after the run: qemu-img check exit {code}\n{out}")
    ok("I/O cases: the daemon kept serving the healthy export; it checks clean")


# ---------------------------------------------------------------------------
# refcount 0 for a cluster in use

def refcount0_case():
    p = make("rc0.qcow2")  # guest [0, 128k) = 0x11, [1M, 1M+64k) = 0x22
    host1 = get(p, l2_entry_pos(p, 1), ">Q") & OFFSET_MASK  # guest 64k
    order = get(p, 96, ">I") if hget(p, "header_length") >= 100 else 4
    if order != 4:
        fail(f"expected 16-bit refcounts, the image has refcount_order {order}")
    rb = get(p, hget(p, "refcount_table_offset"), ">Q") & OFFSET_MASK
    put(p, rb + 2 * (host1 // CS), ">H", 0)
    code, out = qcow2lib.qemu_img_check(p)
    check_soft(code == 2 and "refcount=0 reference=1" in out,
               f"refcount 0 case: qemu-img check should call it corrupt, exit {code}:\n{out}")
    want = read_raw(p, tmp=os.path.join(D, "rc0"))
    with open(p, "rb") as f:
        f.seek(host1)
        cluster_before = f.read(CS)

    srv = harness.Daemon([spec(p, "rc0")])
    h = nbd.NBD()
    h.connect_uri(srv.uri("rc0"))
    check_soft(h.pread(SIZE, 0) == want, "refcount 0: reads before a write differ from QEMU's")
    # 2M: unallocated, the write needs a new cluster; 0: in place
    for what, off in (("an allocating write", 2 * MiB), ("a write in place", 0),
                      ("another allocating write", 3 * MiB)):
        try:
            h.pwrite(b"\x33" * CS, off)
            h.flush()
            check_soft(False, f"refcount 0: {what} succeeded, expected EIO")
        except nbd.Error as e:
            if check_soft(e.errnum == errno.EIO,
                          f"refcount 0: {what} failed with {e}, expected EIO"):
                ok(f"refcount 0: {what} gets EIO")
    got = h.pread(SIZE, 0)
    check_soft(got == want, "refcount 0: the guest content changed after the refused writes")
    check_soft(b"\x33" * 512 not in got, "refcount 0: a refused write shows somewhere")
    h.shutdown()
    log = srv.logtext()
    rc = srv.stop()
    check_soft(rc == 0, f"refcount 0: stratad exit status {rc}")
    needle = f"cluster {host1:#x} has refcount 0"
    check_soft(needle in log and "qemu-img check -r all" in log,
               f"refcount 0: the log lacks '{needle}' or the repair hint:\n{log[-2000:]}")
    with open(p, "rb") as f:
        f.seek(host1)
        check_soft(f.read(CS) == cluster_before, "refcount 0: the cluster's bytes changed")
    check_soft(read_raw(p, tmp=os.path.join(D, "rc0b")) == want,
               "refcount 0: QEMU reads other content after the run")
    line = [ln for ln in log.splitlines() if "corrupt qcow2 image" in ln]
    ok("refcount 0 for a data cluster in use: never handed out again; "
       + (line[0].strip()[-120:] if line else ""))

    # Two L2 entries that both hold one cluster alone (COPIED, refcount 1):
    # a write in place to one would show in the other.
    p = make("alias.qcow2")
    put(p, l2_entry_pos(p, 2), ">Q", COPIED | host1)  # guest 128k -> guest 64k's
    want = read_raw(p, tmp=os.path.join(D, "alias"))
    srv = harness.Daemon([spec(p, "alias")])
    h = nbd.NBD()
    h.connect_uri(srv.uri("alias"))
    try:
        h.pwrite(b"\x44" * 4096, 64 * KiB)
        check_soft(False, "two COPIED entries for one cluster: the write succeeded, expected EIO")
    except nbd.Error as e:
        check_soft(e.errnum == errno.EIO,
                   f"two COPIED entries for one cluster: the write failed with {e}, expected EIO")
    check_soft(h.pread(SIZE, 0) == want,
               "two COPIED entries for one cluster: the content changed")
    h.shutdown()
    log = srv.logtext()
    srv.stop()
    check_soft(f"cluster {host1:#x}, which something else uses too" in log,
               f"two COPIED entries for one cluster: no message naming the cluster:\n{log[-2000:]}")
    ok("two COPIED entries for one cluster: writes refused, reads served")


# ---------------------------------------------------------------------------
# dirty images

def dirty_case():
    p = make("dirty.qcow2", opts="cluster_size=64k,lazy_refcounts=on", writes=())
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 256k",
                    "-c", "write -P 0x45 1M 64k", "-c", "abort", p],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    if not hget(p, "incompatible") & 1:
        fail("qemu-io abort did not leave the dirty bit set")
    want = read_raw(p, tmp=os.path.join(D, "d"))
    served("dirty image, readonly=on", [spec(p, ro=True)], [reads_like_qemu(p)])

    d = harness.tmpdir()
    sock = os.path.join(d, "s")
    args = [harness.STRATAD, "--listen", "unix:" + sock, "--pid-file",
            os.path.join(d, "pid"), "--export", spec(p)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=harness._die_with_parent)
    import time
    deadline = time.time() + 20
    while proc.poll() is None and not os.path.exists(os.path.join(d, "pid")):
        if time.time() > deadline:
            proc.kill()
            fail("dirty image, readonly=off: stratad neither refused nor served in 20 s")
        time.sleep(0.02)
    if proc.poll() is not None:
        out = proc.stdout.read()
        for marker in ("ERROR: AddressSanitizer", "runtime error:"):
            if marker in out:
                fail(f"dirty image: sanitizer report:\n{out}")
        check_soft(proc.returncode > 0 and "qemu-img check -r all" in out,
                   f"dirty image, readonly=off: exit {proc.returncode}, expected a refusal "
                   f"suggesting 'qemu-img check -r all':\n{out}")
        print("OBSERVED: dirty image, readonly=off: refused: "
              + out.strip().splitlines()[-1])
        return
    # served: stratad rebuilt the refcounts
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///x?socket={sock}")
    got = h.pread(SIZE, 0)
    check_soft(got == want, "dirty image, served read-write: reads differ from QEMU")
    h.pwrite(b"\x77" * 200 * KiB, 3 * MiB)
    h.zero(64 * KiB, 0)
    h.flush()
    h.shutdown()
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    check_soft(proc.returncode == 0, f"dirty image: stratad exit {proc.returncode}\n{out}")
    code, cout = qcow2lib.qemu_img_check(p)
    check_soft(code == 0, f"dirty image served read-write: qemu-img check exit {code}\n{cout}")
    check_soft(not hget(p, "incompatible") & 1, "dirty image: the dirty bit is still set")
    print(f"OBSERVED: dirty image, readonly=off: served (refcounts rebuilt); "
          f"qemu-img check exit {code}")


def main():
    startup_cases()
    io_cases()
    refcount0_case()
    dirty_case()
    harness.finish_soft_checks()
    print("PASS")


if __name__ == "__main__":
    main()
