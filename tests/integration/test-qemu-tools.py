#!/usr/bin/python3
"""stratad against the stock NBD clients: qemu-img, qemu-io, nbdcopy, nbdinfo.

A raw file with a known layout of data and holes is served under several
export names (each on its own copy, so that one check's writes cannot
disturb another's expectations):

    disk     copy of the source, read-write   (info, convert, compare, map)
    ro       copy of the source, readonly=on  (refused writes, map, list)
    target   empty sparse file, read-write    (convert -n into, nbdcopy into)
    scratch  copy of the source, read-write   (qemu-io)
    direct   copy of the source, cache=none   (O_DIRECT: convert from, nbdcopy into)

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-qemu-tools.py
"""
import hashlib
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness
import nbdwire  # noqa: E402
from harness import check, fail, need  # noqa: E402

need("qemu-img", "qemu-io", "nbdcopy", "nbdinfo")

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB
# Data extents of the source image; everything else is a hole.  The qemu-io
# commands below (write 1M, write -z 2M, discard 3M) land on a hole, on data
# and on data respectively.
DATA = [(0, 1 * MiB), (2 * MiB, 2 * MiB), (5 * MiB, 64 * KiB)]


def ok(msg):
    print("ok:", msg, flush=True)


def run(cmd, timeout=60, expect_rc=0):
    """Runs cmd; fails the test (with its output) unless it exits with
    expect_rc (None = any).  Returns the CompletedProcess."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout, text=True, errors="replace")
    except subprocess.TimeoutExpired:
        fail(f"{' '.join(cmd)}: did not finish within {timeout}s")
    if expect_rc is not None and p.returncode != expect_rc:
        fail(f"{' '.join(cmd)}: expected exit {expect_rc}, got {p.returncode}\n"
             f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def make_source(path, seed):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, length in DATA:
            f.seek(off)
            f.write(rnd.randbytes(length))
    return path


def sparse_copy(src, dst):
    run(["cp", "--sparse=always", src, dst])
    return dst


def file_layout(path):
    """[(offset, length, is_data)] as SEEK_DATA/SEEK_HOLE see the file."""
    out = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole remains
                d = size
            if d > off:
                out.append((off, d - off, False))
            if d >= size:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d, True))
            off = h
    return out




def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_range(path, off, length):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(length)


def files_equal(a, b):
    return subprocess.run(["cmp", "-s", a, b], timeout=60).returncode == 0


def qemu_io_problems(out):
    """Lines of qemu-io output that report a failure."""
    bad = []
    for line in out.splitlines():
        low = line.lower()
        if ("pattern verification failed" in low or "failed" in low
                or "error" in low or "can't open" in low
                or "permission denied" in low):
            bad.append(line)
    return bad


def main():
    d = harness.tmpdir()
    src = make_source(os.path.join(d, "src.img"), 1)
    layout = file_layout(src)
    fs_has_holes = any(not isdata for _, _, isdata in layout)
    disk = sparse_copy(src, os.path.join(d, "disk.img"))
    ro = sparse_copy(src, os.path.join(d, "ro.img"))
    scratch = sparse_copy(src, os.path.join(d, "scratch.img"))
    target = harness.make_file(os.path.join(d, "target.img"), SIZE)
    direct = sparse_copy(src, os.path.join(d, "direct.img"))
    ro_sum = sha(ro)

    daemon = harness.Daemon([
        f"name=disk,file={disk},format=raw",
        f"name=ro,file={ro},format=raw,readonly=on,description=read only copy",
        f"name=target,file={target},format=raw,cache=writeback",
        f"name=scratch,file={scratch},format=raw",
        f"name=direct,file={direct},format=raw,cache=none",
    ], tcp=True)

    # ---- qemu-img info over unix and TCP --------------------------------
    for tcp in (False, True):
        uri = daemon.uri("disk", tcp=tcp)
        p = run(["qemu-img", "info", "--output=json", uri])
        try:
            info = json.loads(p.stdout)
        except ValueError:
            fail(f"qemu-img info {uri}: not JSON:\n{p.stdout}")
        check(info.get("virtual-size") == SIZE,
              f"qemu-img info {uri}: expected virtual-size {SIZE}, got {info.get('virtual-size')}")
        check(info.get("format") == "raw",
              f"qemu-img info {uri}: expected format raw, got {info.get('format')}")
        ok(f"qemu-img info over {'tcp' if tcp else 'unix'}: virtual-size {SIZE}, raw")

    # ---- qemu-img convert from the export ---------------------------------
    for tcp in (False, True):
        out = os.path.join(d, f"convert-out-{int(tcp)}.img")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri("disk", tcp=tcp), out])
        check(files_equal(out, src),
              f"qemu-img convert {daemon.uri('disk', tcp=tcp)} -> {out}: expected a copy "
              f"identical to the source, cmp reports a difference")
        ok(f"qemu-img convert export -> file over {'tcp' if tcp else 'unix'}: bytes identical")

    # ---- qemu-img compare against the export -------------------------------
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, daemon.uri("disk")])
    ok("qemu-img compare src.img == export 'disk'")
    other = make_source(os.path.join(d, "other.img"), 2)
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", other, daemon.uri("disk")],
            expect_rc=None)
    check(p.returncode == 1,
          f"qemu-img compare of a different image against the export: expected exit 1 "
          f"(images differ), got {p.returncode}: {p.stdout}{p.stderr}")
    ok("qemu-img compare detects a differing image (exit 1)")

    # ---- qemu-img convert -n into the export -------------------------------
    local = make_source(os.path.join(d, "local.img"), 3)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", local, daemon.uri("target")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", local, daemon.uri("target")])
    check(files_equal(local, target),
          "qemu-img convert -n local.img -> export 'target': the file behind the export "
          "differs from local.img")
    ok("qemu-img convert -n file -> export, qemu-img compare and cmp of the backing file agree")

    # ---- qemu-io on a read-write export -----------------------------------
    before = read_range(scratch, 0, SIZE)
    p = run(["qemu-io", "-f", "raw", daemon.uri("scratch"),
             "-c", "write -P 0xab 1M 64k",
             "-c", "read -P 0xab 1M 64k",
             "-c", "write -z 2M 64k",
             "-c", "discard 3M 64k",
             "-c", "read -P 0 2M 64k"], expect_rc=None)
    out = p.stdout + p.stderr
    bad = qemu_io_problems(out)
    check(p.returncode == 0 and not bad,
          f"qemu-io on a rw export: expected exit 0 and no failures, got exit "
          f"{p.returncode}, problems {bad}\n{out}")
    for want in ("wrote 65536/65536 bytes at offset 1048576",
                 "read 65536/65536 bytes at offset 1048576",
                 "wrote 65536/65536 bytes at offset 2097152",
                 "discard 65536/65536 bytes at offset 3145728",
                 "read 65536/65536 bytes at offset 2097152"):
        check(want in out, f"qemu-io: expected a line '{want}', output was:\n{out}")
    after = read_range(scratch, 0, SIZE)
    check(after[MiB:MiB + 64 * KiB] == b"\xab" * (64 * KiB),
          "after qemu-io write -P 0xab 1M 64k: file bytes [1M,1M+64k) are not all 0xab")
    check(after[2 * MiB:2 * MiB + 64 * KiB] == bytes(64 * KiB),
          "after qemu-io write -z 2M 64k: file bytes [2M,2M+64k) are not all zero")
    disc = after[3 * MiB:3 * MiB + 64 * KiB]
    check(disc in (bytes(64 * KiB), before[3 * MiB:3 * MiB + 64 * KiB]),
          "after qemu-io discard 3M 64k: [3M,3M+64k) is neither the old data nor zeros")
    touched = [(MiB, 64 * KiB), (2 * MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    pos = 0
    for off, length in touched + [(SIZE, 0)]:
        check(after[pos:off] == before[pos:off],
              f"qemu-io changed bytes outside the ranges it wrote (somewhere in [{pos},{off}))")
        pos = off + length
    ok("qemu-io write/read -P/write -z/discard/read -P 0: no failures, file content as expected")

    # Mismatch detection sanity: a wrong pattern must be reported (so that the
    # check above is meaningful with this qemu-io).
    p = run(["qemu-io", "-f", "raw", "-r", daemon.uri("scratch"), "-c", "read -P 0xac 1M 64k"],
            expect_rc=None)
    check("Pattern verification failed" in p.stdout + p.stderr,
          "qemu-io read -P 0xac over 0xab data: expected 'Pattern verification failed', got:\n"
          + p.stdout + p.stderr)
    ok("qemu-io reports a wrong pattern (the pattern checks are live)")

    # ---- qemu-io on a readonly export -------------------------------------
    p = run(["qemu-io", "-f", "raw", daemon.uri("ro"), "-c", "write -P 0xcd 0 4k"],
            expect_rc=None)
    out = p.stdout + p.stderr
    check("wrote 4096/4096" not in out and (p.returncode != 0 or qemu_io_problems(out)),
          f"qemu-io write on a readonly export: expected a refusal, got exit "
          f"{p.returncode}:\n{out}")
    check(sha(ro) == ro_sum, "qemu-io write on a readonly export: the backing file changed")
    ok(f"qemu-io write to readonly export refused ({(out.strip().splitlines() or [''])[-1][:100]})")
    p = run(["qemu-io", "-f", "raw", "-r", daemon.uri("ro"),
             "-c", "read 0 64k", "-c", "read 1M 64k"], expect_rc=None)
    out = p.stdout + p.stderr
    check(p.returncode == 0 and not qemu_io_problems(out),
          f"qemu-io -r reads from the readonly export: expected success, got exit "
          f"{p.returncode}:\n{out}")
    ok("qemu-io -r reads the readonly export")

    # ---- nbdcopy ------------------------------------------------------------
    out = os.path.join(d, "nbdcopy-out.img")
    run(["nbdcopy", daemon.uri("disk"), out])
    check(files_equal(out, src), "nbdcopy export 'disk' -> file: copy differs from the source")
    ok("nbdcopy export -> file: bytes identical")

    local2 = make_source(os.path.join(d, "local2.img"), 4)
    run(["nbdcopy", local2, daemon.uri("target")])
    check(files_equal(local2, target), "nbdcopy file -> export 'target': backing file differs")
    ok("nbdcopy file -> export: backing file identical")

    out = os.path.join(d, "nbdcopy-mc.img")
    p = run(["nbdcopy", "--verbose", "--connections=4", "--threads=4",
             daemon.uri("disk", tcp=True), out], timeout=90)
    check(files_equal(out, src), "nbdcopy --connections=4 export -> file: copy differs")
    conns = [l for l in p.stderr.splitlines() if l.startswith("nbdcopy: connections=")]
    check(conns and conns[0].startswith("nbdcopy: connections=4 "),
          f"nbdcopy --connections=4: expected nbdcopy to use 4 connections (needs "
          f"CAN_MULTI_CONN), its verbose output says {conns}")
    ok(f"nbdcopy --connections=4 export -> file over tcp: identical ({conns[0][9:]})")

    local3 = make_source(os.path.join(d, "local3.img"), 5)
    run(["nbdcopy", "--connections=4", "--threads=4", local3, daemon.uri("target")],
        timeout=90)
    check(files_equal(local3, target), "nbdcopy --connections=4 file -> export: backing file differs")
    ok("nbdcopy --connections=4 file -> export: backing file identical")

    # ---- a cache=none (O_DIRECT) export ------------------------------------------
    out = os.path.join(d, "direct-out.img")
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri("direct"), out])
    check(files_equal(out, src), "qemu-img convert from the cache=none export: copy differs")
    local4 = make_source(os.path.join(d, "local4.img"), 6)
    run(["nbdcopy", "--connections=4", "--threads=4", local4, daemon.uri("direct")], timeout=90)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", local4, daemon.uri("direct")])
    check(files_equal(local4, direct), "nbdcopy into the cache=none export: backing file differs")
    ok("cache=none export: qemu-img convert from it, nbdcopy into it, qemu-img compare")

    # ---- nbdinfo --json -------------------------------------------------------
    p = run(["nbdinfo", "--json", daemon.uri("disk")])
    info = json.loads(p.stdout)
    check(info.get("protocol") == "newstyle-fixed",
          f"nbdinfo: expected protocol newstyle-fixed, got {info.get('protocol')}")
    check(info.get("structured") is True, "nbdinfo: expected structured replies")
    ex = info["exports"][0]
    want = {"export-name": "disk", "export-size": SIZE, "is_read_only": False,
            "can_multi_conn": True, "can_flush": True, "can_fua": True,
            "can_trim": True, "can_zero": True}
    for k, v in want.items():
        check(ex.get(k) == v, f"nbdinfo --json {daemon.uri('disk')}: expected {k}={v!r}, "
                              f"got {ex.get(k)!r}")
    for ctx in ("base:allocation", "qemu:allocation-depth"):
        check(ctx in ex.get("contexts", []),
              f"nbdinfo --json: expected meta context {ctx}, got {ex.get('contexts')}")
    ok("nbdinfo --json 'disk': " + ", ".join(f"{k}={ex.get(k)}" for k in want))

    p = run(["nbdinfo", "--json", daemon.uri("ro", tcp=True)])
    ex = json.loads(p.stdout)["exports"][0]
    check(ex.get("is_read_only") is True, f"nbdinfo 'ro': expected is_read_only true, got {ex}")
    check(ex.get("can_trim") is not True and ex.get("can_zero") is not True,
          f"nbdinfo 'ro': a readonly export should not advertise trim/zero: "
          f"can_trim={ex.get('can_trim')} can_zero={ex.get('can_zero')}")
    check(ex.get("description") == "read only copy",
          f"nbdinfo 'ro': expected description 'read only copy', got {ex.get('description')!r}")
    ok("nbdinfo --json 'ro' over tcp: read-only, no trim/zero, description")

    # Default export (the first one) under the empty name.
    p = run(["nbdinfo", "--json", daemon.uri("")])
    ex = json.loads(p.stdout)["exports"][0]
    check(ex.get("export-size") == SIZE,
          f"nbdinfo on the default (empty-name) export: expected size {SIZE}, got {ex}")
    ok("nbdinfo on the default export (empty name) works")

    # ---- nbdinfo --list -------------------------------------------------------
    p = run(["nbdinfo", "--list", "--json", daemon.uri("")])
    lst = json.loads(p.stdout)
    # (a server may also list the default export under the empty name)
    names = sorted(e.get("export-name") for e in lst.get("exports", [])
                   if e.get("export-name") != "")
    check(names == ["direct", "disk", "ro", "scratch", "target"],
          f"nbdinfo --list: expected exports direct, disk, ro, scratch, target; got {names}")
    descs = {e.get("export-name"): e.get("description") for e in lst["exports"]}
    check(descs.get("ro") == "read only copy",
          f"nbdinfo --list: expected the description of 'ro', got {descs}")
    ok(f"nbdinfo --list: {names}")

    # ---- nbdinfo --map --------------------------------------------------------
    if not fs_has_holes:
        print("note: the filesystem under", d, "keeps no holes; skipping the map layout check")
    else:
        expected = nbdwire.merge_extents([(o, l, 0 if isdata else 3) for o, l, isdata in file_layout(ro)])
        for tcp in (False, True):
            p = run(["nbdinfo", "--map", "--json", daemon.uri("ro", tcp=tcp)])
            got = nbdwire.merge_extents([(e["offset"], e["length"], e["type"]) for e in json.loads(p.stdout)])
            check(got == expected,
                  f"nbdinfo --map on 'ro' ({'tcp' if tcp else 'unix'}): expected extents "
                  f"{expected}, got {got}")
        ok(f"nbdinfo --map matches the file's data/hole layout ({len(expected)} extents)")

    p = run(["nbdinfo", "--map=qemu:allocation-depth", "--json", daemon.uri("ro")])
    ext = [(e["offset"], e["length"], e["type"]) for e in json.loads(p.stdout)]
    pos = 0
    for off, length, typ in ext:
        check(off == pos and length > 0,
              f"--map=qemu:allocation-depth: extents do not tile the disk: {ext}")
        pos += length
        check(typ in (0, 1),
              f"--map=qemu:allocation-depth: a raw file without backing has depth 0 or 1, "
              f"got {typ} at {off}")
        if typ == 0:
            for doff, dlen in DATA:
                check(off + length <= doff or doff + dlen <= off,
                      f"--map=qemu:allocation-depth: data at [{doff},{doff + dlen}) "
                      f"reported unallocated (depth 0) by extent {off}+{length}")
    check(pos == SIZE, f"--map=qemu:allocation-depth: extents end at {pos}, expected {SIZE}")
    ok(f"nbdinfo --map=qemu:allocation-depth tiles the disk: {nbdwire.merge_extents(ext)}")

    # ---- the daemon is still healthy, stops cleanly ---------------------------
    check(daemon.alive(), "stratad died during the test:\n" + daemon.logtext())
    rc = daemon.stop()
    check(rc == 0, f"stratad exit status after SIGTERM: expected 0, got {rc}")
    check(sha(ro) == ro_sum, "the readonly export's file changed during the test")
    ok("stratad stops with exit 0 on SIGTERM; readonly file untouched")
    print("PASS")


if __name__ == "__main__":
    main()
