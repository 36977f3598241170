#!/usr/bin/python3
"""Protocol tests for stratad through python3-libnbd (1.14).

Listing, INFO/GO, capability flags, data round trips checked against the
backing files on disk, FUA, trim/zero/cache, block status (base:allocation
and qemu:allocation-depth) against SEEK_DATA/SEEK_HOLE, simple replies,
error codes, 64 requests in flight and 4 concurrent connections.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-libnbd.py
"""
import bisect
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, fail  # noqa: E402
import nbdwire as w  # noqa: E402  (file_layout, merge_extents)

harness.nbd_handle()      # skips when python3-libnbd is missing
import nbd  # noqa: E402

T0 = harness.T0
KiB = 1 << 10
MiB = 1 << 20
MAX_PAYLOAD = 32 * MiB
HOLE = nbd.STATE_HOLE | nbd.STATE_ZERO

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok
first_diff = harness.first_diff
check = harness.check_hard
soft = harness.check_soft
FAILURES = harness.FAILURES


def expect_errno(fn, want, what):
    try:
        r = fn()
    except nbd.Error as e:
        return soft(e.errnum == want,
                    f"{what}: expected {errno.errorcode[want]}, got errno {e.errnum} "
                    f"({errno.errorcode.get(e.errnum, '?')}): {e.string}")
    return soft(False, f"{what}: expected {errno.errorcode[want]}, but the request succeeded"
                + (f" (returned {len(r)} bytes)" if isinstance(r, (bytes, bytearray)) else ""))


# --------------------------------------------------------------------------
# Images.
d = harness.tmpdir()
rng = random.Random(0x1b4bd)

RW = os.path.join(d, "rw.img")
RW_SIZE = 64 * MiB
shadow = bytearray(rng.randbytes(RW_SIZE))
with open(RW, "wb") as f:
    f.write(shadow)

RO = os.path.join(d, "ro.img")
RO_SIZE = MiB + 3 * 4096
ro_data = rng.randbytes(RO_SIZE)
with open(RO, "wb") as f:
    f.write(ro_data)

SPARSE = os.path.join(d, "sparse.img")
SPARSE_SIZE = 16 * MiB
sparse_data = {0: 64 * KiB, MiB: 4096, 3 * MiB + 64 * KiB: 2 * MiB - 64 * KiB,
               9 * MiB + 8192: 12288, SPARSE_SIZE - 4096: 4096}
with open(SPARSE, "wb") as f:
    f.truncate(SPARSE_SIZE)
    for off, n in sparse_data.items():
        f.seek(off)
        f.write(rng.randbytes(n))
sparse_layout = w.merge_extents(w.file_layout(SPARSE))
check(len(sparse_layout) >= 8, f"test setup: sparse.img has no holes on this filesystem: {sparse_layout}")

DIRECT = os.path.join(d, "direct.img")
DIRECT_SIZE = MiB
direct_data = bytearray(rng.randbytes(DIRECT_SIZE))
with open(DIRECT, "wb") as f:
    f.write(direct_data)

FRAG = os.path.join(d, "frag.img")      # 4 KiB of data every 8 KiB: 8192 extents
FRAG_SIZE = 32 * MiB
with open(FRAG, "wb") as f:
    f.truncate(FRAG_SIZE)
    blk = rng.randbytes(4096)
    for off in range(0, FRAG_SIZE, 8192):
        f.seek(off)
        f.write(blk)
frag_layout = w.merge_extents(w.file_layout(FRAG))

EXPORTS = {   # name: (file, size, description, readonly, min block)
    "disk": (RW, RW_SIZE, "Read-write disk", False, 1),
    "ro": (RO, RO_SIZE, "Read-only disk", True, 1),
    "sparse": (SPARSE, SPARSE_SIZE, "", False, 1),
    "direct": (DIRECT, DIRECT_SIZE, "", False, 4096),
    "frag": (FRAG, FRAG_SIZE, "", True, 1),
}
dm = Daemon([
    f"name=disk,file={RW},format=raw,cache=writeback,description=Read-write disk",
    f"name=ro,file={RO},format=raw,readonly=on,cache=writeback,description=Read-only disk",
    f"name=sparse,file={SPARSE},format=raw,cache=writeback",
    f"name=direct,file={DIRECT},format=raw,cache=none",
    f"name=frag,file={FRAG},format=raw,readonly=on",
])
ok("stratad started")


def handle(name="", contexts=(), structured=True, strict=None):
    h = nbd.NBD()
    h.set_handle_name(f"test-{name or 'default'}")
    for c in contexts:
        h.add_meta_context(c)
    if not structured:
        h.set_request_structured_replies(False)
    h.connect_uri(dm.uri(name))
    if strict is not None:
        h.set_strict_mode(strict)
    return h


def opt_handle(name=""):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(dm.uri(name))
    return h


# --------------------------------------------------------------------------
# Listing, info, default export, unknown export.
h = opt_handle()
listed = []
n = h.opt_list(lambda name, desc: listed.append((name, desc)))
want = sorted((k, v[2]) for k, v in EXPORTS.items())
check(n == len(EXPORTS) and sorted(listed) == want,
      f"opt_list: expected {want}, got {n} entries {sorted(listed)}")
ok(f"opt_list: {sorted(listed)}")

h.set_full_info(True)
for name, (path, size, desc, ro, minbs) in EXPORTS.items():
    h.set_export_name(name)
    h.opt_info()
    check(h.get_size() == size == os.path.getsize(path),
          f"opt_info {name}: size {h.get_size()}, file size {os.path.getsize(path)}")
    bs = (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
          h.get_block_size(nbd.SIZE_MAXIMUM))
    check(bs == (minbs, 4096, MAX_PAYLOAD),
          f"opt_info {name}: block sizes (min, preferred, max) {bs}, expected {(minbs, 4096, MAX_PAYLOAD)}")
    check(h.get_canonical_export_name() == name,
          f"opt_info {name}: canonical name {h.get_canonical_export_name()!r}")
    if desc:
        got = h.get_export_description()
        check(got == desc, f"opt_info {name}: description {got!r}, expected {desc!r}")
    else:
        try:
            got = h.get_export_description()
        except nbd.Error:
            got = ""
        check(got == "", f"opt_info {name}: description {got!r} for an export without one")
    check(h.is_read_only() == ro, f"opt_info {name}: is_read_only {h.is_read_only()}, expected {ro}")
    ok(f"opt_info {name}: size {size}, block sizes {bs}, description {desc!r}")

h.set_export_name("")
h.opt_info()
check(h.get_size() == RW_SIZE, f"opt_info default export: size {h.get_size()}, expected {RW_SIZE} (first export)")
canon = h.get_canonical_export_name()
check(canon in ("disk", ""), f"opt_info default export: canonical name {canon!r}")
ok(f"opt_info '' -> first export (size {RW_SIZE}, canonical name {canon!r})")

h.set_export_name("no-such-export")
try:
    h.opt_info()
    fail("opt_info of an unknown export succeeded")
except nbd.Error as e:
    ok(f"opt_info of an unknown export fails: {e.string}")
try:
    h.opt_go()
    fail("opt_go of an unknown export succeeded")
except nbd.Error as e:
    ok(f"opt_go of an unknown export fails: {e.string}")
check(h.aio_is_negotiating(), "after a failed opt_go the handle should still be negotiating")
h.set_export_name("ro")
h.opt_go()
check(h.pread(4096, 0) == ro_data[:4096], "opt_go ro after a failed opt_go: wrong data")
h.shutdown()
ok("negotiation continues after the unknown export; opt_go ro then works")

h = opt_handle()
h.opt_abort()
check(h.aio_is_closed() or h.aio_is_dead(), "opt_abort: handle not closed")
ok("opt_abort")

h = handle("")
check(h.get_size() == RW_SIZE, f"default export: size {h.get_size()}")
check(h.pread(65536, 4096) == shadow[4096:69632], "default export: data differs from rw.img")
h.shutdown()
ok("default export via empty name serves rw.img")

try:
    handle("no-such-export")
    fail("connecting to an unknown export succeeded")
except nbd.Error as e:
    ok(f"connect to an unknown export fails: {e.string}")

# --------------------------------------------------------------------------
# Capability flags.
CAPS = ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
        "can_multi_conn", "can_df", "is_read_only"]


def caps(h):
    return {c: bool(getattr(h, c)()) for c in CAPS}


want_rw = dict(can_flush=True, can_fua=True, can_trim=True, can_zero=True, can_fast_zero=True,
               can_cache=True, can_multi_conn=True, can_df=True, is_read_only=False)
want_ro = dict(can_flush=True, can_fua=False, can_trim=False, can_zero=False, can_fast_zero=False,
               can_cache=True, can_multi_conn=True, can_df=True, is_read_only=True)
for name, want in (("disk", want_rw), ("direct", want_rw), ("ro", want_ro)):
    h = handle(name)
    got = caps(h)
    check(got == want, f"capabilities of {name}: got {got}, expected {want}; "
          f"differences { {k: got[k] for k in got if got[k] != want[k]} }")
    h.shutdown()
    ok(f"capabilities of {name} export: {sorted(k for k, v in got.items() if v)}")
h = handle("disk", structured=False)
got = caps(h)
want = dict(want_rw, can_df=False)
check(not h.get_structured_replies_negotiated(), "structured replies negotiated although not requested")
check(got == want, f"capabilities without structured replies: got {got}, expected {want}")
h.shutdown()
ok("without structured replies: same flags but no SEND_DF")

# --------------------------------------------------------------------------
# Data round trips.
h = handle("disk", contexts=["base:allocation"])


def rw_check(off, n, flags=0):
    data = rng.randbytes(n)
    h.pwrite(data, off, flags=flags)
    shadow[off:off + n] = data
    got = h.pread(n, off)
    check(got == data, f"pwrite/pread {n} bytes at {off}: read back differs at +{first_diff(got, data)}")


cases = [(0, 1), (12345, 1), (4095, 2), (7, 5000), (4096, 4096), (MiB + 3, MiB),
         (0, 32 * MiB), (5 * MiB + 4093, 32 * MiB), (RW_SIZE - 1, 1), (RW_SIZE - 5000, 5000),
         (31 * MiB + 7, 32 * MiB)]
for off, n in cases:
    rw_check(off, n)
    ok(f"pwrite/pread round trip {n} bytes at {off}")
chunks = []
got = h.pread_structured(MiB, 2 * MiB + 1, lambda sub, o, st, err: chunks.append((o, len(sub), st)) or 0,
                         flags=nbd.CMD_FLAG_DF)
check(got == shadow[2 * MiB + 1:3 * MiB + 1], "pread_structured with DF: wrong data")
check(len(chunks) == 1 and chunks[0] == (2 * MiB + 1, MiB, nbd.READ_DATA),
      f"pread_structured with DF over data: expected one data chunk, got {chunks}")
ok("pread with CMD_FLAG_DF -> one unfragmented data chunk")
h.flush()
with open(RW, "rb") as f:
    disk = f.read()
diff = first_diff(disk, shadow)
check(diff is None, f"after flush, rw.img on disk differs from the writes at offset {diff}")
ok("after flush, rw.img on disk equals every write")

off, data = 20 * MiB + 100, rng.randbytes(64 * KiB)
h.pwrite(data, off, flags=nbd.CMD_FLAG_FUA)
shadow[off:off + len(data)] = data
with open(RW, "rb") as f:
    got = os.pread(f.fileno(), len(data), off)
check(got == data, "FUA write: data not in rw.img right after the reply (no flush)")
data = rng.randbytes(4096)
h.pwrite(data, 20 * MiB + 256 * KiB, flags=nbd.CMD_FLAG_FUA)
shadow[20 * MiB + 256 * KiB:20 * MiB + 260 * KiB] = data
ok("FUA writes reach rw.img without a flush")

# Trim, zero, cache.
exts = {}


def bs_cb(meta, off, entries, err):
    exts.setdefault(meta, []).append((off, list(entries)))
    return 0


h.trim(MiB, 8 * MiB)
shadow[8 * MiB:9 * MiB] = bytes(MiB)
check(h.pread(MiB, 8 * MiB) == bytes(MiB), "trim 1 MiB at 8 MiB: does not read back as zeros")
exts.clear()
h.block_status(MiB, 8 * MiB, bs_cb)
e = exts.get("base:allocation")
check(e and len(e) == 1, f"block status after trim: callback calls {exts}")
ents = e[0][1]
lead = 0
for i in range(0, len(ents), 2):
    if ents[i + 1] != HOLE:
        break
    lead += ents[i]
check(lead >= MiB,
      f"block status after trim of [8 MiB, 9 MiB): expected one HOLE|ZERO extent covering it, got {ents}")
ok("trim -> reads zeros, block status shows a hole")

for off, n, flags, what in ((10 * MiB, MiB, 0, "no flags"),
                            (12 * MiB, MiB, nbd.CMD_FLAG_NO_HOLE, "NO_HOLE"),
                            (14 * MiB, MiB, nbd.CMD_FLAG_FAST_ZERO, "FAST_ZERO"),
                            (16 * MiB, MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO, "NO_HOLE|FAST_ZERO"),
                            (12345, 777, 0, "unaligned"),
                            (17 * MiB + 5, 3 * 4096, nbd.CMD_FLAG_NO_HOLE, "unaligned NO_HOLE"),
                            (18 * MiB, 4096, nbd.CMD_FLAG_FUA, "FUA")):
    try:
        h.zero(n, off, flags=flags)
    except nbd.Error as e:
        fail(f"zero {n} at {off} ({what}): failed with {e.string}")
    shadow[off:off + n] = bytes(n)
    lo, hi = max(0, off - 4096), min(RW_SIZE, off + n + 4096)
    got = h.pread(hi - lo, lo)
    check(got == shadow[lo:hi], f"zero {n} at {off} ({what}): data around it differs at "
          f"{None if first_diff(got, shadow[lo:hi]) is None else lo + first_diff(got, shadow[lo:hi])}")
    ok(f"zero {n} bytes at {off} ({what}) -> zeros, neighbours intact")

h.cache(MiB, 0)
h.cache(4096, RW_SIZE - 4096)
ok("cache")

# --------------------------------------------------------------------------
# Block status on sparse.img vs SEEK_DATA/SEEK_HOLE.
def layout_flags_ok(o, n, f, layout, size):
    """True if [o, o+n) (clipped to size) has status f everywhere in layout
    (a sorted, contiguous list of (offset, length, flags))."""
    end = min(o + n, size)
    i = max(0, bisect.bisect_right(layout, (o, float("inf"), 0)) - 1)
    while i < len(layout) and layout[i][0] < end:
        lo, ln, lf = layout[i]
        if lo + ln > o and lf != f:
            return False
        i += 1
    return True


def walk(hh, name, esize, layout, step, ctxname="base:allocation", flags=0, start=0, end=None):
    """Walks [start, end) of an export of `esize` bytes with block status
    queries of `step` bytes, checks each extent against the file layout
    and returns the merged extents (clipped to the export)."""
    end = esize if end is None else end
    out = []
    off = start
    while off < end:
        cnt = min(step, esize - off)
        got = {}
        hh.block_status(cnt, off, lambda m, o, e, err: got.setdefault(m, []).append((o, list(e))) or 0,
                        flags=flags)
        calls = got.get(ctxname, [])
        check(len(calls) == 1, f"block_status {cnt} at {off} on {name}: {len(calls)} {ctxname} callbacks: {got}")
        o, ents = calls[0]
        check(o == off, f"block_status at {off}: callback offset {o}")
        check(ents and len(ents) % 2 == 0, f"block_status at {off}: no extents")
        pos = off
        for i in range(0, len(ents), 2):
            n, f = ents[i], ents[i + 1]
            if n == 0:
                check(False, f"block_status {cnt} at {off} on {name}: zero-length extent in {ents}")
            if pos + n > esize:
                check(False, f"block_status {cnt} at {off} on {name}: extents {ents} run past "
                      f"the end of the export ({esize})")
            if layout is not None and not layout_flags_ok(pos, n, f, layout, esize):
                check(False, f"block_status {cnt} at {off} on {name}: extent [{pos}, {pos + n}) flags {f} "
                      f"disagrees with the file layout {[x for x in layout if x[0] < pos + n and x[0] + x[1] > pos]}")
            out.append((pos, min(n, esize - pos), f))
            pos += n
        if flags & nbd.CMD_FLAG_REQ_ONE:
            check(len(ents) == 2 and ents[0] <= cnt,
                  f"block_status REQ_ONE {cnt} at {off} on {name}: expected one extent <= {cnt}, got {ents}")
        off = pos
    return w.merge_extents(out)


hs = handle("sparse", contexts=["base:allocation"])
check(hs.can_meta_context("base:allocation"), "sparse: base:allocation not negotiated")
check(not hs.can_meta_context("qemu:allocation-depth"), "sparse: allocation-depth negotiated without asking")
got = walk(hs, "sparse", SPARSE_SIZE, sparse_layout, SPARSE_SIZE)
check(got == sparse_layout, f"base:allocation over sparse.img: got {got}, file layout {sparse_layout}")
ok(f"base:allocation over the whole export matches SEEK_DATA/SEEK_HOLE: {sparse_layout}")
got = walk(hs, "sparse", SPARSE_SIZE, sparse_layout, 300 * KiB + 512, start=1000)
check(got == [x for x in w.merge_extents(w.file_layout(SPARSE, 1000))],
      f"base:allocation in 300 KiB steps: got {got}")
ok("base:allocation in unaligned 300 KiB steps matches")
got = walk(hs, "sparse", SPARSE_SIZE, sparse_layout, 8 * MiB, flags=nbd.CMD_FLAG_REQ_ONE)
check(got == sparse_layout, f"base:allocation with REQ_ONE: got {got}, file layout {sparse_layout}")
for off, cnt in ((0, 4096), (0, 10 * MiB), (32 * KiB, 64 * KiB), (70 * KiB, 100), (MiB - 512, 8192),
                 (3 * MiB, 3 * MiB), (SPARSE_SIZE - 4096, 4096), (SPARSE_SIZE - 100, 100),
                 (9 * MiB + 8192 + 100, 1)):
    walk(hs, "sparse", SPARSE_SIZE, sparse_layout, cnt, flags=nbd.CMD_FLAG_REQ_ONE, start=off, end=off + 1)
ok("base:allocation with REQ_ONE: one extent, never longer than the request")
hs.shutdown()

hf = handle("frag", contexts=["base:allocation", "qemu:allocation-depth"])
first = {}
hf.block_status(FRAG_SIZE, 0, lambda m, o, e, err: first.setdefault(m, len(e) // 2) or 0)
got = walk(hf, "frag", FRAG_SIZE, frag_layout, FRAG_SIZE)
check(got == frag_layout, f"base:allocation over frag.img ({len(frag_layout)} extents): got {len(got)} extents, "
      f"first difference at {next((i for i, (a, b) in enumerate(zip(got, frag_layout)) if a != b), None)}")
hf.shutdown()
ok(f"base:allocation over a fragmented file ({len(frag_layout)} extents) matches "
   f"(extents in the first reply: {first})")

hd = handle("sparse", contexts=["qemu:allocation-depth"])
check(hd.can_meta_context("qemu:allocation-depth"), "qemu:allocation-depth not negotiated")
check(not hd.can_meta_context("base:allocation"), "base:allocation negotiated without asking")
got = walk(hd, "sparse", SPARSE_SIZE, None, SPARSE_SIZE, ctxname="qemu:allocation-depth")
check(got == [(0, SPARSE_SIZE, 1)], f"qemu:allocation-depth on a raw image: expected depth 1 everywhere, got {got}")
hd.shutdown()
ok("qemu:allocation-depth returns 1 over the whole raw image")

hb = handle("sparse", contexts=["base:allocation", "qemu:allocation-depth", "foo:bar"])
check(hb.can_meta_context("base:allocation") and hb.can_meta_context("qemu:allocation-depth"),
      "both contexts requested, not both negotiated")
check(not hb.can_meta_context("foo:bar"), "unknown context foo:bar negotiated")
for flags in (0, nbd.CMD_FLAG_REQ_ONE):
    got = {}
    hb.block_status(4 * MiB, 0, lambda m, o, e, err: got.setdefault(m, []).append(list(e)) or 0, flags=flags)
    check(sorted(got) == ["base:allocation", "qemu:allocation-depth"] and all(len(v) == 1 for v in got.values()),
          f"block status with both contexts (flags {flags}): callbacks {got}")
    check(got["base:allocation"][0][:2] == [64 * KiB, 0],
          f"both contexts: base:allocation first extent {got['base:allocation'][0][:2]}, expected [65536, 0]")
    check(all(got["qemu:allocation-depth"][0][i] == 1 for i in range(1, len(got["qemu:allocation-depth"][0]), 2)),
          f"both contexts: depth {got['qemu:allocation-depth']}")
    if flags:
        check(all(len(v[0]) == 2 and v[0][0] <= 4 * MiB for v in got.values()), f"REQ_ONE with both: {got}")
hb.shutdown()
ok("both contexts at once: one chunk per context (with and without REQ_ONE); unknown context ignored")

h2 = opt_handle("sparse")
names = []
n = h2.opt_list_meta_context(lambda name: names.append(name))
check(n == len(names) and sorted(names) == ["base:allocation", "qemu:allocation-depth"],
      f"opt_list_meta_context (all): got {n} {names}")
h2.add_meta_context("base:allocation")
names.clear()
n = h2.opt_list_meta_context(lambda name: names.append(name))
check(names == ["base:allocation"], f"opt_list_meta_context base:allocation: got {names}")
h2.opt_abort()
ok("opt_list_meta_context lists both contexts; a query for one returns just it")

# --------------------------------------------------------------------------
# Simple replies only.
hsr = handle("disk", structured=False, strict=0)
off, data = 30 * MiB + 17, rng.randbytes(100 * KiB)
hsr.pwrite(data, off)
shadow[off:off + len(data)] = data
check(hsr.pread(len(data), off) == data, "simple replies: pread after pwrite differs")
check(hsr.pread(MiB, 0) == shadow[:MiB], "simple replies: pread 1 MiB differs")
expect_errno(lambda: hsr.pread(100, RW_SIZE - 10), errno.EINVAL, "simple replies: pread past end")
expect_errno(lambda: hsr.pwrite(bytes(100), RW_SIZE - 10), errno.ENOSPC, "simple replies: pwrite past end")
expect_errno(lambda: hsr.block_status(4096, 0, lambda *a: 0), errno.EINVAL,
             "simple replies: block status (no structured replies, no context)")
check(hsr.pread(4096, off) == data[:4096], "simple replies: pread after errors")
hsr.shutdown()
ok("structured replies off: pread/pwrite round trip, EINVAL/ENOSPC simple errors, still usable")

# --------------------------------------------------------------------------
# Error cases (client-side strictness off so the requests reach the server).
he = handle("disk", strict=0)
hro = handle("ro", strict=0)
hdi = handle("direct", strict=0)


def still_usable(hh, what, ref):
    check(hh.aio_is_ready(), f"{what}: connection no longer ready")
    check(hh.pread(4096, 0) == bytes(ref[:4096]), f"{what}: pread after the error returned wrong data")


errors = [
    (hro, ro_data, "pwrite on read-only export", lambda: hro.pwrite(b"x" * 4096, 0), errno.EPERM),
    (hro, ro_data, "trim on read-only export", lambda: hro.trim(4096, 0), errno.EPERM),
    (hro, ro_data, "zero on read-only export", lambda: hro.zero(4096, 0), errno.EPERM),
    (he, shadow, "pread straddling the end", lambda: he.pread(100, RW_SIZE - 10), errno.EINVAL),
    (he, shadow, "pread at the end", lambda: he.pread(512, RW_SIZE), errno.EINVAL),
    (he, shadow, "pread beyond the end", lambda: he.pread(512, RW_SIZE + 4096), errno.EINVAL),
    (he, shadow, "pwrite past end", lambda: he.pwrite(bytes(100), RW_SIZE - 10), errno.ENOSPC),
    (he, shadow, "zero past end", lambda: he.zero(8192, RW_SIZE - 4096), errno.ENOSPC),
    # Spec, "Error values": EINVAL for a read or *trim* beyond the end.
    (he, shadow, "trim past end", lambda: he.trim(8192, RW_SIZE - 4096), errno.EINVAL),
    (he, shadow, "pread longer than 32 MiB", lambda: he.pread(MAX_PAYLOAD + 4096, 0), errno.EINVAL),
    (he, shadow, "pread with unknown flag 0x80", lambda: he.pread(4096, 0, flags=0x80), errno.EINVAL),
    (he, shadow, "block status with no context", lambda: he.block_status(4096, 0, lambda *a: 0), errno.EINVAL),
    (hdi, direct_data, "cache=none: pread unaligned length", lambda: hdi.pread(100, 0), errno.EINVAL),
    (hdi, direct_data, "cache=none: pread unaligned offset", lambda: hdi.pread(4096, 100), errno.EINVAL),
    (hdi, direct_data, "cache=none: pwrite unaligned", lambda: hdi.pwrite(bytes(512), 4096), errno.EINVAL),
    (hdi, direct_data, "cache=none: zero unaligned", lambda: hdi.zero(100, 4096), errno.EINVAL),
]
for hh, ref, what, fn, want in errors:
    if expect_errno(fn, want, what):
        still_usable(hh, what, ref)
        ok(f"{what} -> {errno.errorcode[want]}, connection still usable")
    else:
        still_usable(hh, what, ref)
check(hro.pread(RO_SIZE, 0) == ro_data, "ro export content changed")
data = rng.randbytes(8192)
hdi.pwrite(data, 8192)
direct_data[8192:16384] = data
check(hdi.pread(3 * 4096, 4096) == direct_data[4096:4 * 4096], "cache=none: aligned pread after pwrite differs")
hdi.flush()
with open(DIRECT, "rb") as f:
    check(f.read() == direct_data, "cache=none: direct.img on disk differs")
ok("cache=none: aligned pwrite/pread work and reach the file")
for hh in (he, hro, hdi):
    hh.shutdown()

# --------------------------------------------------------------------------
# BLOCK_STATUS past the end of the export, through libnbd with its
# client-side bounds check off, from stratad and from qemu-nbd serving the
# same file: a range that ends past the end is refused with EINVAL by both
# (spec, "Size constraints"; docs/nbd-conformance.md), one that ends at the
# end is answered by both.  Then the clients that map disks ask nothing
# past the end on their own: libnbd refuses it before sending (its default
# strict mode), and `nbdinfo --map` and `qemu-img map` map the whole export.
BS_CASES = (("ending 4 KiB past the end", SPARSE_SIZE - 4096, 8192),
            ("ending 1 MiB past the end", SPARSE_SIZE - MiB, 2 * MiB),
            ("starting at the end", SPARSE_SIZE, 4096),
            ("ending at the end", SPARSE_SIZE - 8192, 8192))


def bs_answers(uri):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    out = []
    for what, off, cnt in BS_CASES:
        try:
            h.block_status(cnt, off, lambda *a: 0)
            out.append((what, None))
        except nbd.Error as e:
            out.append((what, e.errnum))
    h.shutdown()
    return out


ours = bs_answers(dm.uri("sparse"))
for what, err in ours:
    want = None if what.startswith("ending at") else errno.EINVAL
    check(err == want, f"stratad: block status {what}: expected "
          f"{errno.errorcode.get(want, 'success')}, got {errno.errorcode.get(err, 'success')}")
if shutil.which("qemu-nbd"):
    from workload import QemuNbd  # noqa: E402
    qn = QemuNbd(SPARSE, "sparse", shared=1, extra=["-r"])
    theirs = bs_answers(qn.uri())
    qn.stop()
    check(ours == theirs, f"block status past the end: stratad answers {ours}, "
          f"qemu-nbd {theirs}")
    ok("block status past the end -> EINVAL, ending at the end -> answered: the same as "
       "qemu-nbd on the same file")
else:
    ok("block status past the end -> EINVAL, ending at the end -> answered (qemu-nbd not "
       "installed: not compared)")

hs = handle("sparse", contexts=["base:allocation"])
try:
    hs.block_status(8192, SPARSE_SIZE - 4096, lambda *a: 0)
    fail("libnbd (strict mode) sent a block status request past the end")
except nbd.Error as e:
    check(e.errnum == errno.EINVAL, f"libnbd strict mode: {e}")
check(hs.aio_is_ready(), "the connection after libnbd's own refusal")
hs.shutdown()
# nbdinfo --map and qemu-img map walk the whole export in block status
# requests sized to what is left: both succeed and cover the export exactly.
p = subprocess.run(["nbdinfo", "--map", "--json", dm.uri("sparse")], capture_output=True,
                   text=True, errors="replace", timeout=60)
check(p.returncode == 0, f"nbdinfo --map: exit {p.returncode}: {p.stderr}")
m = json.loads(p.stdout)
check(m and m[0]["offset"] == 0 and m[-1]["offset"] + m[-1]["length"] == SPARSE_SIZE and
      all(a["offset"] + a["length"] == b["offset"] for a, b in zip(m, m[1:])),
      f"nbdinfo --map does not cover the export exactly: {m}")
if shutil.which("qemu-img"):
    p = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", dm.uri("sparse")],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"qemu-img map: exit {p.returncode}: {p.stderr}")
    m = json.loads(p.stdout)
    check(m and m[-1]["start"] + m[-1]["length"] == SPARSE_SIZE,
          f"qemu-img map does not end at the end of the export: {m[-3:]}")
ok("libnbd refuses block status past the end before sending it; nbdinfo --map and "
   "qemu-img map cover the export exactly")

# --------------------------------------------------------------------------
# 64 requests in flight.
ha = handle("disk")
AIO_BASE = 40 * MiB
slots = []
for i in range(64):
    off = AIO_BASE + i * 256 * KiB + rng.randrange(0, 4096)
    n = rng.choice([1, 511, 4096, 65536, 100000, 200 * KiB, 252 * KiB - 1])
    slots.append((off, rng.randbytes(n)))
order = []
cookies = []
bufs = []
for i, (off, data) in enumerate(slots):
    b = nbd.Buffer.from_bytearray(bytearray(data))
    bufs.append(b)
    cookies.append(ha.aio_pwrite(b, off, completion=lambda err, i=i: order.append(i) or 0))
inflight = ha.aio_in_flight()
deadline = time.time() + 30
while ha.aio_in_flight() > 0:
    ha.poll(1000)
    check(time.time() < deadline, f"64 aio_pwrite: {ha.aio_in_flight()} still in flight after 30 s")
for i, c in enumerate(cookies):
    try:
        check(ha.aio_command_completed(c), f"aio_pwrite {i}: not completed")
    except nbd.Error as e:
        fail(f"aio_pwrite {i} ({len(slots[i][1])} bytes at {slots[i][0]}) failed: {e.string}")
for off, data in slots:
    shadow[off:off + len(data)] = data
ok(f"64 aio_pwrite submitted at once ({inflight} in flight), all completed "
   f"({'out of order' if order != sorted(order) else 'in order'})")

reads = []
for i in range(64):
    if i % 8 == 0:
        off, n = AIO_BASE + rng.randrange(0, 15 * MiB), MiB
    else:
        off, n = slots[i][0] + 1, max(1, len(slots[i][1]) - 1)
    reads.append((off, n))
order.clear()
cookies.clear()
bufs = []
for i, (off, n) in enumerate(reads):
    b = nbd.Buffer(n)
    bufs.append(b)
    cookies.append(ha.aio_pread(b, off, completion=lambda err, i=i: order.append(i) or 0))
inflight = ha.aio_in_flight()
deadline = time.time() + 30
while ha.aio_in_flight() > 0:
    ha.poll(1000)
    check(time.time() < deadline, f"64 aio_pread: {ha.aio_in_flight()} still in flight after 30 s")
for i, c in enumerate(cookies):
    try:
        check(ha.aio_command_completed(c), f"aio_pread {i}: not completed")
    except nbd.Error as e:
        fail(f"aio_pread {i} ({reads[i]}) failed: {e.string}")
    off, n = reads[i]
    got = bufs[i].to_bytearray()
    check(got == shadow[off:off + n],
          f"aio_pread {i} ({n} bytes at {off}): data differs at +{first_diff(got, shadow[off:off + n])}")
ok(f"64 aio_pread in flight ({inflight}), completion order "
   f"{'differs from submission order' if order != sorted(order) else 'same as submission'}, all data right")
ha.shutdown()

# --------------------------------------------------------------------------
# 4 connections writing disjoint areas concurrently, then cross-reading.
MC_BASE, MC_LEN = 56 * MiB, 2 * MiB
handles = [handle("disk") for _ in range(4)]
for hh in handles:
    check(hh.can_multi_conn(), "multi-conn handle lacks CAN_MULTI_CONN")
payloads = [rng.randbytes(MC_LEN) for _ in range(4)]
errors_mc = []
barrier = threading.Barrier(4)


def worker(t):
    hh = handles[t]
    base = MC_BASE + t * MC_LEN
    try:
        for k in range(0, MC_LEN, 256 * KiB):
            hh.pwrite(payloads[t][k:k + 256 * KiB], base + k)
        hh.flush()
        barrier.wait(timeout=30)
        u = (t + 1) % 4
        got = hh.pread(MC_LEN, MC_BASE + u * MC_LEN)
        if got != payloads[u]:
            errors_mc.append(f"connection {t} reading connection {u}'s area: differs at "
                             f"+{first_diff(got, payloads[u])}")
    except Exception as e:  # noqa: BLE001
        errors_mc.append(f"connection {t}: {e!r}")
        barrier.abort()


threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join(45)
check(not any(t.is_alive() for t in threads), "multi-conn: workers still running after 45 s")
check(not errors_mc, "multi-conn: " + "; ".join(errors_mc))
for t in range(4):
    shadow[MC_BASE + t * MC_LEN:MC_BASE + (t + 1) * MC_LEN] = payloads[t]
for hh in handles:
    hh.shutdown()
ok("4 connections wrote disjoint areas concurrently; each reads the others' data")

# --------------------------------------------------------------------------
# Final: whole export and rw.img equal the model.
h.flush()
for off in range(0, RW_SIZE, MAX_PAYLOAD):
    got = h.pread(MAX_PAYLOAD, off)
    diff = first_diff(got, shadow[off:off + MAX_PAYLOAD])
    check(diff is None, f"final read of the export differs from the model at {None if diff is None else off + diff}")
h.shutdown()
with open(RW, "rb") as f:
    disk = f.read()
diff = first_diff(disk, shadow)
check(diff is None, f"final: rw.img on disk differs from the model at offset {diff}")
ok("final: export contents and rw.img on disk equal the model")
check(dm.alive(), "stratad died:\n" + dm.logtext())
if FAILURES:
    fail(f"{len(FAILURES)} check(s) failed:\n  " + "\n  ".join(FAILURES))
rc = dm.stop()
print(f"note: stratad exited with status {rc} on SIGTERM")
print(f"PASS test-libnbd ({time.time() - T0:.1f}s)")
sys.exit(0)
