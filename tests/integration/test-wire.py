#!/usr/bin/python3
"""Wire-level NBD tests for stratad through raw sockets (nbdwire.py).

Covers what libnbd will not send: exact handshake bytes, malformed options
and requests, extended headers (64-bit requests, extended reply chunks,
BLOCK_STATUS_EXT), abrupt clients, the handshake timeout and soft
disconnect with requests in flight.  Finally checks that the daemon
survived all of it and still serves fresh clients.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-wire.py
"""
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, fail  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402

T0 = harness.T0
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MAX_PAYLOAD = 32 * MiB

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok
first_diff = harness.first_diff
check = harness.check_hard
soft = harness.check_soft
FAILURES = harness.FAILURES


def expect_rep(reps, rtype, what):
    last = reps[-1][0]
    check(last == rtype,
          f"{what}: expected final reply {w.rep_name(rtype)}, got "
          f"{[w.rep_name(t) for t, _ in reps]}")


def expect_closed(c, what, timeout=5.0):
    closed, extra, secs = c.wait_closed(timeout)
    check(closed, f"{what}: expected the server to close the connection, "
          f"still open after {timeout:.0f}s (received {len(extra)} bytes: {extra[:64]!r})")
    c.close()
    return extra, secs


def expect_error_chunk(c, reps, err, cookie, offset, what):
    """reps = reply_for(cookie): a failed request must end in an error."""
    errs = [r for r in reps if r.is_error]
    check(errs, f"{what}: expected error {err}, got success {reps}")
    r = errs[0]
    res = soft(r.error == err, f"{what}: expected error {err}, got {r.error} ({reps})")
    check(r.cookie == cookie, f"{what}: cookie 0x{r.cookie:x}, sent 0x{cookie:x}")
    check(reps[-1].done, f"{what}: last chunk lacks DONE: {reps}")
    if c.extended:
        for x in reps:
            check(x.kind == "extended",
                  f"{what}: {x.kind} reply on an extended-headers connection: {x}")
            check(x.offset == offset,
                  f"{what}: extended reply offset field {x.offset}, request offset {offset}")
        check(r.type in (w.REPLY_TYPE_ERROR, w.REPLY_TYPE_ERROR_OFFSET),
              f"{what}: error chunk type {r.type}")
        e, msg, eoff = w.parse_error_payload(r.payload)
        want = 6 + len(msg) + (8 if r.type == w.REPLY_TYPE_ERROR_OFFSET else 0)
        check(r.length == want,
              f"{what}: error chunk length {r.length}, expected {want} for message {msg!r}")
    return res


# --------------------------------------------------------------------------
# Images.
d = harness.tmpdir()
rng = random.Random(0x5eed)
DISK = os.path.join(d, "disk.img")
DISK_SIZE = 16 * MiB
disk = bytearray(rng.randbytes(DISK_SIZE))      # shadow of disk.img
with open(DISK, "wb") as f:
    f.write(disk)

BIG = os.path.join(d, "big.img")                # sparse 8 GiB
BIG_SIZE = 8 * GiB
big_marks = {0: rng.randbytes(MiB), 4 * GiB: rng.randbytes(64 * KiB),
             BIG_SIZE - 4096: rng.randbytes(4096)}
with open(BIG, "wb") as f:
    f.truncate(BIG_SIZE)
    for off, data in big_marks.items():
        f.seek(off)
        f.write(data)

RO = os.path.join(d, "ro.img")
ro_data = rng.randbytes(MiB)
with open(RO, "wb") as f:
    f.write(ro_data)

SMALL = os.path.join(d, "small.img")
small_data = rng.randbytes(MiB)
with open(SMALL, "wb") as f:
    f.write(small_data)


def big_expected(off, n):
    out = bytearray(n)
    for mo, md in big_marks.items():
        lo, hi = max(off, mo), min(off + n, mo + len(md))
        if lo < hi:
            out[lo - off:hi - off] = md[lo - mo:hi - mo]
    return bytes(out)


def big_write(off, data):
    """Records a write to big.img in big_marks (non-overlapping use only)."""
    big_marks[off] = data


def big_zero(off, n):
    for mo in list(big_marks):
        md = big_marks[mo]
        lo, hi = max(off, mo), min(off + n, mo + len(md))
        if lo < hi:
            md = bytearray(md)
            md[lo - mo:hi - mo] = bytes(hi - lo)
            big_marks[mo] = bytes(md)


dm = Daemon([
    f"name=disk,file={DISK},format=raw,cache=writeback,description=wire test disk",
    f"name=big,file={BIG},format=raw,cache=writeback",
    f"name=ro,file={RO},format=raw,readonly=on",
], tcp=True)
SOCK = dm.sock
ok("stratad started")


def conn(timeout=10.0):
    return Conn(SOCK, timeout)


# --------------------------------------------------------------------------
# Greeting and client flags.
c = conn()
g = c.greeting()
want = b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES)
check(g == want, f"greeting: expected {want!r}, got {g!r}")
extra = c.pending(0.3)
check(extra == b"", f"greeting: {len(extra)} unexpected bytes after the 18-byte greeting: {extra[:32]!r}")
c.close()
ok("greeting is exactly NBDMAGIC IHAVEOPT 0x0003 (18 bytes)")

c = Conn(("127.0.0.1", dm.port))
g = c.greeting()
check(g == want, f"greeting over TCP: expected {want!r}, got {g!r}")
c.close()
ok("greeting over TCP listener")

c = conn()
c.start(w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES | (1 << 9))
expect_closed(c, "client flags with unknown bit 9")
ok("client flags with an unknown bit -> connection closed")

c = conn()
c.start()
c.send_option(w.OPT_GO, Conn.info_payload("disk"), magic=0x1122334455667788)
expect_closed(c, "option with bad magic")
ok("option with bad magic -> connection closed")

# --------------------------------------------------------------------------
# NBD_OPT_EXPORT_NAME (old-style entry into transmission).
c = conn()
c.start(w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES)
c.send_option(w.OPT_EXPORT_NAME, b"disk")
size, flags = struct.unpack(">QH", c.recv_exact(10))
check(size == DISK_SIZE, f"EXPORT_NAME: size {size}, expected {DISK_SIZE}")
check(flags & w.FLAG_HAS_FLAGS, f"EXPORT_NAME: flags 0x{flags:x} lack HAS_FLAGS")
check(not flags & w.FLAG_SEND_DF, f"EXPORT_NAME: SEND_DF 0x{flags:x} without structured replies")
extra = c.pending(0.3)
check(extra == b"", f"EXPORT_NAME with NO_ZEROES: {len(extra)} bytes after size+flags "
      f"(expected none; first bytes {extra[:16]!r})")
data, err = c.read(0x1001, 4096, 4096)
check(err == 0 and data == disk[4096:8192], f"EXPORT_NAME+NO_ZEROES: read failed (err {err})")
c.disc()
expect_closed(c, "DISC after EXPORT_NAME")
ok("EXPORT_NAME with NO_ZEROES: 10 bytes, no padding, simple-reply read works")

c = conn()
c.start(w.FLAG_C_FIXED_NEWSTYLE)
c.send_option(w.OPT_EXPORT_NAME, b"disk")
rep = c.recv_exact(10 + 124)
size, flags = struct.unpack(">QH", rep[:10])
check(size == DISK_SIZE, f"EXPORT_NAME (zeroes): size {size}")
check(rep[10:] == bytes(124), f"EXPORT_NAME without NO_ZEROES: 124 padding bytes not all zero: {rep[10:]!r}")
data, err = c.read(0x1002, 12345, 100)
check(err == 0 and data == disk[12345:12445], "EXPORT_NAME (zeroes): read after padding failed")
c.disc()
c.close()
ok("EXPORT_NAME without NO_ZEROES: 124 zero bytes follow, then transmission works")

c = conn()
c.start()
c.send_option(w.OPT_EXPORT_NAME, b"")
size, flags = struct.unpack(">QH", c.recv_exact(10))
check(size == DISK_SIZE, f"EXPORT_NAME '' (default export): size {size}, expected {DISK_SIZE}")
c.disc()
c.close()
ok("EXPORT_NAME with empty name selects the first export")

c = conn()
c.start()
c.send_option(w.OPT_EXPORT_NAME, b"no-such-export")
expect_closed(c, "EXPORT_NAME of an unknown export")
ok("EXPORT_NAME of an unknown export -> connection closed")

# --------------------------------------------------------------------------
# Option negotiation errors; negotiation continues after each.
c = conn()
c.start()
reps = c.option(w.OPT_ABORT)
check(reps == [(w.REP_ACK, b"")], f"ABORT: expected one empty ACK, got {reps}")
expect_closed(c, "after ABORT")
ok("ABORT -> ACK, then close")

c = conn()
c.start()
reps = c.option(0x7777, b"hello")
expect_rep(reps, w.REP_ERR_UNSUP, "unknown option 0x7777")
ok("unknown option -> ERR_UNSUP")
reps = c.option(w.OPT_STRUCTURED_REPLY, b"x")
expect_rep(reps, w.REP_ERR_INVALID, "STRUCTURED_REPLY with a 1-byte payload")
ok("STRUCTURED_REPLY with payload -> ERR_INVALID")
bad = struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0)
reps = c.option(w.OPT_GO, bad)
expect_rep(reps, w.REP_ERR_INVALID, "GO with name length 100 in a 10-byte option")
ok("GO with name length beyond the option length -> ERR_INVALID")
reps = c.option(w.OPT_INFO, bad)
expect_rep(reps, w.REP_ERR_INVALID, "INFO with name length 100 in a 10-byte option")
ok("INFO with name length beyond the option length -> ERR_INVALID")
bad = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + struct.pack(">H", w.INFO_NAME)
reps = c.option(w.OPT_GO, bad)
expect_rep(reps, w.REP_ERR_INVALID, "GO with 3 info requests announced, 1 present")
ok("GO with info count beyond the option length -> ERR_INVALID")
reps = c.option(w.OPT_LIST, b"abc")
expect_rep(reps, w.REP_ERR_INVALID, "LIST with 3 bytes of data")
ok("LIST with data -> ERR_INVALID")
reps = c.option(w.OPT_STARTTLS)
expect_rep(reps, w.REP_ERR_UNSUP, "STARTTLS")
ok("STARTTLS -> ERR_UNSUP")
reps = c.option(w.OPT_SET_META_CONTEXT, Conn.meta_payload("disk", ["base:allocation"]))
expect_rep(reps, w.REP_ERR_INVALID, "SET_META_CONTEXT before STRUCTURED_REPLY")
ok("SET_META_CONTEXT before structured replies -> ERR_INVALID")
reps = c.option(w.OPT_INFO, Conn.info_payload("no-such-export"))
expect_rep(reps, w.REP_ERR_UNKNOWN, "INFO for an unknown export")
reps = c.option(w.OPT_GO, Conn.info_payload("no-such-export"))
expect_rep(reps, w.REP_ERR_UNKNOWN, "GO for an unknown export")
ok("INFO / GO of an unknown export -> ERR_UNKNOWN")

reps = c.option(w.OPT_LIST)
expect_rep(reps, w.REP_ACK, "LIST")
names = []
for rtype, data in reps[:-1]:
    check(rtype == w.REP_SERVER, f"LIST: unexpected reply {w.rep_name(rtype)}")
    n = struct.unpack(">I", data[:4])[0]
    check(4 + n <= len(data), f"LIST: REP_SERVER name length {n} beyond reply of {len(data)}")
    names.append((data[4:4 + n].decode(), data[4 + n:].decode()))
check(sorted(x[0] for x in names) == ["big", "disk", "ro"],
      f"LIST: expected exports big, disk, ro; got {names}")
check(dict(names)["disk"] == "wire test disk",
      f"LIST: description of disk {dict(names)['disk']!r}, expected 'wire test disk'")
ok(f"LIST -> one REP_SERVER per export with description: {names}")

reps = c.option(w.OPT_INFO, Conn.info_payload("disk", (w.INFO_NAME, w.INFO_DESCRIPTION)))
expect_rep(reps, w.REP_ACK, "INFO disk")
info = Conn.parse_infos(reps)
check(info.get(w.INFO_EXPORT, (None,))[0] == DISK_SIZE, f"INFO disk: INFO_EXPORT {info.get(w.INFO_EXPORT)}")
check(info.get(w.INFO_BLOCK_SIZE) == (1, 4096, MAX_PAYLOAD),
      f"INFO disk: block sizes {info.get(w.INFO_BLOCK_SIZE)}, expected (1, 4096, {MAX_PAYLOAD})")
check(info.get(w.INFO_NAME) == b"disk", f"INFO disk: INFO_NAME {info.get(w.INFO_NAME)!r}")
check(info.get(w.INFO_DESCRIPTION) == b"wire test disk",
      f"INFO disk: INFO_DESCRIPTION {info.get(w.INFO_DESCRIPTION)!r}")
ok("INFO with NAME+DESCRIPTION requests -> EXPORT, BLOCK_SIZE, NAME, DESCRIPTION")

# Now structured replies on the same connection, and go.
reps = c.option(w.OPT_STRUCTURED_REPLY)
expect_rep(reps, w.REP_ACK, "STRUCTURED_REPLY")
reps = c.option(w.OPT_LIST_META_CONTEXT, Conn.meta_payload("disk", []))
expect_rep(reps, w.REP_ACK, "LIST_META_CONTEXT (all)")
listed = sorted(d_[4:].decode() for t, d_ in reps if t == w.REP_META_CONTEXT)
check(listed == ["base:allocation", "qemu:allocation-depth"],
      f"LIST_META_CONTEXT: expected base:allocation and qemu:allocation-depth, got {listed}")
ok("negotiation continued after every error; LIST_META_CONTEXT lists both contexts")


def listed_contexts(queries, opt=w.OPT_LIST_META_CONTEXT):
    reps = c.option(opt, Conn.meta_payload("disk", queries))
    return reps[-1][0], sorted(d_[4:].decode() for t, d_ in reps if t == w.REP_META_CONTEXT)


for queries, want_ctx, rule in (
        (["base:"], ["base:allocation"], "MUST support 'base:' as a wildcard in LIST"),
        (["qemu:"], ["qemu:allocation-depth"], "qemu's nbd.rst: 'qemu:' lists the whole namespace"),
        (["base:allocation"], ["base:allocation"], "exact name"),
        (["base:nonsense"], [], "MUST ignore an unknown base: leaf-name"),
        (["foo:bar", "x-strata:thing"], [], "MUST ignore unknown namespaces"),
        (["foo:bar", "qemu:allocation-depth"], ["qemu:allocation-depth"], "unknown namespace ignored, rest listed")):
    last, got_ctx = listed_contexts(queries)
    soft(last == w.REP_ACK and got_ctx == want_ctx,
         f"LIST_META_CONTEXT {queries}: expected {want_ctx} then ACK ({rule}); got {got_ctx} then {w.rep_name(last)}")
for queries, rule in ((["base:"], "MUST ignore 'base:' in SET"), (["base:nonsense", "foo:bar"], "MUST ignore unknown")):
    last, got_ctx = listed_contexts(queries, w.OPT_SET_META_CONTEXT)
    soft(last == w.REP_ACK and got_ctx == [],
         f"SET_META_CONTEXT {queries}: expected no context then ACK ({rule}); got {got_ctx} then {w.rep_name(last)}")
bad = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 200) + b"base:allocation"
for opt, oname in ((w.OPT_LIST_META_CONTEXT, "LIST_META_CONTEXT"), (w.OPT_SET_META_CONTEXT, "SET_META_CONTEXT")):
    reps = c.option(opt, bad)
    soft(reps[-1][0] == w.REP_ERR_INVALID,
         f"{oname} with query length 200 beyond the option: expected ERR_INVALID (MUST), got "
         f"{[w.rep_name(t) for t, _ in reps]}")
reps = c.option(w.OPT_INFO, Conn.info_payload("disk", (0x1234, w.INFO_NAME)))
soft(reps[-1][0] == w.REP_ACK and w.INFO_EXPORT in Conn.parse_infos(reps),
     f"INFO with an unknown information request 0x1234: expected it ignored and ACK, got "
     f"{[w.rep_name(t) for t, _ in reps]}")
ok("meta-context queries: wildcards, unknown names/namespaces ignored, malformed -> ERR_INVALID; "
   "unknown info request ignored")
reps, ctx = c.set_meta_context("disk", ["base:allocation"])
expect_rep(reps, w.REP_ACK, "SET_META_CONTEXT base:allocation")
check(list(ctx) == ["base:allocation"], f"SET_META_CONTEXT: contexts {ctx}")
c.structured = True
c.contexts = ctx
info = c.go("disk")
fl = c.export_flags
want_flags = (w.FLAG_HAS_FLAGS | w.FLAG_SEND_FLUSH | w.FLAG_SEND_FUA | w.FLAG_SEND_TRIM
              | w.FLAG_SEND_WRITE_ZEROES | w.FLAG_SEND_FAST_ZERO | w.FLAG_SEND_CACHE
              | w.FLAG_CAN_MULTI_CONN | w.FLAG_SEND_DF)
check(fl & want_flags == want_flags and not fl & w.FLAG_READ_ONLY,
      f"GO disk (structured): flags 0x{fl:04x}, expected all of 0x{want_flags:04x} and not READ_ONLY")
ok(f"GO after STRUCTURED_REPLY: transmission flags 0x{fl:04x}")

# Compact structured transmission.
data, err = c.read(0x2001, 1000, 8192)
check(err == 0 and data == disk[1000:9192], f"structured READ: err {err}, data match {data == disk[1000:9192]}")
c.request(w.CMD_READ, 0x2002, 4096, 4096, w.CMD_FLAG_DF)
reps = c.reply_for(0x2002)
check(len([r for r in reps if r.type == w.REPLY_TYPE_OFFSET_DATA]) <= 1,
      f"READ with DF: more than one data chunk {reps}")
check(c.read_data(reps, 4096, 4096)[0] == disk[4096:8192], "READ with DF: data mismatch")
c.request(w.CMD_BLOCK_STATUS, 0x2003, 0, MiB)
reps = c.reply_for(0x2003)
bs = [r for r in reps if r.type == w.REPLY_TYPE_BLOCK_STATUS]
check(len(bs) == 1 and all(r.kind == "structured" for r in reps),
      f"structured BLOCK_STATUS: expected one type-5 chunk, got {reps}")
cid, ext = w.parse_block_status(bs[0])
check(cid == ctx["base:allocation"], f"BLOCK_STATUS: context id {cid}, negotiated {ctx}")
check(ext[0][1] == 0, f"BLOCK_STATUS on fully written disk.img: first extent {ext[0]} should be data (0)")
c.request(w.CMD_READ, 0x2004, DISK_SIZE - 100, 200)
expect_error_chunk(c, c.reply_for(0x2004), w.EINVAL, 0x2004, DISK_SIZE - 100, "structured READ past end")
c.request(w.CMD_WRITE, 0x2005, DISK_SIZE - 100, 200, 0, bytes(200))
expect_error_chunk(c, c.reply_for(0x2005), w.ENOSPC, 0x2005, DISK_SIZE - 100, "structured WRITE past end")
data, err = c.read(0x2006, 0, 512)
check(err == 0 and data == disk[:512], "structured READ after errors")
ok("structured replies: READ chunks, DF, BLOCK_STATUS, EINVAL/ENOSPC error chunks")
# "NBD_CMD_FLAG_FUA: valid for all commands, provided NBD_FLAG_SEND_FUA has
# been negotiated, in which case the server MUST accept all commands with
# this bit set".
data, err = c.read(0x2100, 8192, 4096, w.CMD_FLAG_FUA)
soft(err == 0 and data == disk[8192:12288], f"READ with FUA: expected success, got error {err}")
for i, (cmd, o, n, what) in enumerate(((w.CMD_FLUSH, 0, 0, "FLUSH"), (w.CMD_CACHE, 0, MiB, "CACHE"),
                                       (w.CMD_BLOCK_STATUS, 0, MiB, "BLOCK_STATUS"),
                                       (w.CMD_TRIM, 15 * MiB, 8192, "TRIM"),
                                       (w.CMD_WRITE_ZEROES, 15 * MiB + 8192, 8192, "WRITE_ZEROES"))):
    err = c.simple_cmd(cmd, 0x2101 + i, o, n, w.CMD_FLAG_FUA)
    soft(err == 0, f"{what} with FUA (SEND_FUA advertised): expected success, got error {err}")
disk[15 * MiB:15 * MiB + 16384] = bytes(16384)
data, err = c.read(0x2110, 15 * MiB - 4096, 6 * 4096)
check(err == 0 and data == disk[15 * MiB - 4096:15 * MiB + 5 * 4096], "TRIM/WRITE_ZEROES with FUA: wrong data after")
ok("FUA accepted on READ, FLUSH, CACHE, BLOCK_STATUS, TRIM, WRITE_ZEROES")
c.disc()
expect_closed(c, "DISC (structured)")

# SET_META_CONTEXT replaces the previous selection; zero queries select none.
c = conn()
c.start()
expect_rep(c.option(w.OPT_STRUCTURED_REPLY), w.REP_ACK, "STRUCTURED_REPLY")
c.structured = True
reps, ctx1 = c.set_meta_context("disk", ["base:allocation"])
reps, ctx2 = c.set_meta_context("disk", ["qemu:allocation-depth"])
check(list(ctx2) == ["qemu:allocation-depth"], f"second SET_META_CONTEXT: {ctx2}")
c.go("disk")
c.request(w.CMD_BLOCK_STATUS, 0x2200, 0, MiB)
reps = c.reply_for(0x2200)
ids = sorted(w.parse_block_status(r)[0] for r in reps if r.type == w.REPLY_TYPE_BLOCK_STATUS)
soft(ids == [ctx2["qemu:allocation-depth"]],
     f"SET_META_CONTEXT replaces earlier ones: expected only context {ctx2}, block status chunks for ids {ids} "
     f"(first selection was {ctx1}): {reps}")
c.disc()
c.close()
c = conn()
c.start()
expect_rep(c.option(w.OPT_STRUCTURED_REPLY), w.REP_ACK, "STRUCTURED_REPLY")
c.structured = True
reps, ctx1 = c.set_meta_context("disk", ["base:allocation"])
reps, ctx2 = c.set_meta_context("disk", [])
check(reps == [(w.REP_ACK, b"")], f"SET_META_CONTEXT with zero queries: expected a bare ACK, got {reps}")
c.go("disk")
c.request(w.CMD_BLOCK_STATUS, 0x2201, 0, MiB)
expect_error_chunk(c, c.reply_for(0x2201), w.EINVAL, 0x2201, 0,
                   "BLOCK_STATUS after SET_META_CONTEXT with zero queries")
c.disc()
c.close()
ok("SET_META_CONTEXT replaces the previous selection; zero queries -> no context, BLOCK_STATUS EINVAL")

# Handshake and first request pipelined in one send.
c = conn()
hs = c.read_greeting()
c.send(struct.pack(">I", w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES)
       + struct.pack(">QII", w.NBD_OPT_MAGIC, w.OPT_STRUCTURED_REPLY, 0)
       + struct.pack(">QII", w.NBD_OPT_MAGIC, w.OPT_GO, len(Conn.info_payload("disk")))
       + Conn.info_payload("disk")
       + c.header(w.CMD_READ, 0x2300, 5 * MiB, 8192))
ropt, rtype, _ = c.recv_option_reply()
check((ropt, rtype) == (w.OPT_STRUCTURED_REPLY, w.REP_ACK), f"pipelined STRUCTURED_REPLY: {ropt} {w.rep_name(rtype)}")
while True:
    ropt, rtype, _ = c.recv_option_reply()
    check(ropt == w.OPT_GO and (rtype == w.REP_INFO or rtype == w.REP_ACK),
          f"pipelined GO: reply {ropt} {w.rep_name(rtype)}")
    if rtype == w.REP_ACK:
        break
c.structured = True
data, err = c.read_data(c.reply_for(0x2300), 5 * MiB, 8192)
check(err == 0 and data == disk[5 * MiB:5 * MiB + 8192], "pipelined READ after GO: wrong reply")
c.disc()
c.close()
ok("options and the first request sent in one packet are all answered")

# STRUCTURED_REPLY first, then EXTENDED_HEADERS: allowed, replies are extended.
c = conn()
c.start()
expect_rep(c.option(w.OPT_STRUCTURED_REPLY), w.REP_ACK, "STRUCTURED_REPLY")
expect_rep(c.option(w.OPT_EXTENDED_HEADERS), w.REP_ACK, "EXTENDED_HEADERS after STRUCTURED_REPLY")
c.structured = c.extended = True
c.go("disk")
c.request(w.CMD_READ, 0x2400, 4096, 4096)
reps = c.reply_for(0x2400)
check(all(r.kind == "extended" for r in reps), f"STRUCTURED_REPLY then EXTENDED_HEADERS: non-extended replies {reps}")
check(c.read_data(reps, 4096, 4096)[0] == disk[4096:8192], "STRUCTURED then EXTENDED: wrong data")
c.request(w.CMD_FLUSH, 0x2401)
reps = c.reply_for(0x2401)
check(len(reps) == 1 and reps[0].kind == "extended" and reps[0].type == w.REPLY_TYPE_NONE,
      f"FLUSH with extended headers: expected one extended NONE chunk (never a simple reply), got {reps}")
c.disc()
c.close()
ok("STRUCTURED_REPLY then EXTENDED_HEADERS -> both ACK, all replies extended")

# --------------------------------------------------------------------------
# Extended headers.
c = conn(timeout=20.0)
c.start()
reps = c.option(w.OPT_EXTENDED_HEADERS, b"xy")
expect_rep(reps, w.REP_ERR_INVALID, "EXTENDED_HEADERS with a 2-byte payload")
ok("EXTENDED_HEADERS with payload -> ERR_INVALID")
reps = c.option(w.OPT_EXTENDED_HEADERS)
expect_rep(reps, w.REP_ACK, "EXTENDED_HEADERS")
c.extended = c.structured = True
reps = c.option(w.OPT_STRUCTURED_REPLY)
expect_rep(reps, w.REP_ERR_EXT_HEADER_REQD, "STRUCTURED_REPLY after EXTENDED_HEADERS")
ok("EXTENDED_HEADERS -> ACK; STRUCTURED_REPLY afterwards -> ERR_EXT_HEADER_REQD")
reps, ctx = c.set_meta_context("big", ["base:allocation", "qemu:allocation-depth"])
expect_rep(reps, w.REP_ACK, "SET_META_CONTEXT (extended)")
check(sorted(ctx) == ["base:allocation", "qemu:allocation-depth"],
      f"SET_META_CONTEXT: expected both contexts, got {ctx}")
check(len(set(ctx.values())) == 2, f"SET_META_CONTEXT: context ids not distinct: {ctx}")
c.contexts = ctx
c.go("big")
fl = c.export_flags
check(c.export_size == BIG_SIZE, f"GO big: size {c.export_size}, expected {BIG_SIZE}")
check(fl & w.FLAG_SEND_DF, f"GO big (extended): SEND_DF missing from 0x{fl:04x}")
ok(f"GO with extended headers: size 8 GiB, flags 0x{fl:04x}")


def ext_ok(reps, cookie, offset, what):
    for r in reps:
        check(r.kind == "extended", f"{what}: {r.kind} reply with extended headers negotiated: {r}")
        check(r.cookie == cookie, f"{what}: cookie 0x{r.cookie:x}, expected 0x{cookie:x}")
        check(r.offset == offset, f"{what}: reply offset field {r.offset}, request offset {offset}")
        check(not r.is_error, f"{what}: error {r.error}: {r}")
    check(reps[-1].done, f"{what}: last chunk without DONE: {reps}")
    check(all(not r.done for r in reps[:-1]), f"{what}: DONE before the last chunk: {reps}")


off = 4 * GiB + 3 * 4096 + 5
data = rng.randbytes(64 * KiB)
cookie = 0xfeedface00000001
c.write(cookie, off, data)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, off, "extended WRITE")
check(len(reps) == 1 and reps[0].type == w.REPLY_TYPE_NONE and reps[0].length == 0,
      f"extended WRITE: expected one NONE chunk with length 0, got {reps}")
big_write(off, data)
ok("extended WRITE with PAYLOAD_LEN -> one extended NONE|DONE chunk, offset echoed, 64-bit cookie echoed")

roff, rlen = 4 * GiB - 4096, 64 * KiB + 3 * 4096 + 4096 + 4096
cookie = 0xfeedface00000002
c.request(w.CMD_READ, cookie, roff, rlen)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, roff, "extended READ")
got, err = c.read_data(reps, roff, rlen)
check(got == big_expected(roff, rlen), "extended READ: data differs from what was written")
ok(f"extended READ -> {len(reps)} extended chunk(s), offset field = request offset, DONE on last")

cookie = 0xfeedface00000003
c.request(w.CMD_READ, cookie, 2 * GiB, MiB)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, 2 * GiB, "extended READ of a hole")
got, err = c.read_data(reps, 2 * GiB, MiB)
check(got == bytes(MiB), "extended READ of a hole: not zeros")
ok(f"extended READ of a hole -> zeros (chunk types {[r.type for r in reps]})")

cookie = 0xfeedface00000010
c.request(w.CMD_READ, cookie, 512 * KiB, MiB, w.CMD_FLAG_DF)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, 512 * KiB, "extended READ with DF over data + hole")
content = [r for r in reps if r.type in (w.REPLY_TYPE_OFFSET_DATA, w.REPLY_TYPE_OFFSET_HOLE)]
check(len(content) == 1, f"READ with DF over [512 KiB, 1.5 MiB) (data then hole): expected one content chunk, "
      f"got {content}")
check(c.read_data(reps, 512 * KiB, MiB)[0] == big_expected(512 * KiB, MiB), "READ with DF: wrong data")
ok("extended READ with DF over data and hole -> exactly one content chunk")

cookie = 0xfeedface00000011
c.request(w.CMD_READ, cookie, 0, MAX_PAYLOAD)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, 0, "extended READ of 32 MiB")
check(c.read_data(reps, 0, MAX_PAYLOAD)[0] == big_expected(0, MAX_PAYLOAD), "extended READ of 32 MiB: wrong data")
ok(f"extended READ of exactly 32 MiB -> {len(reps)} chunk(s), right data")

# Block status with extended headers.
layout = w.merge_extents(w.file_layout(BIG, 0, 16 * MiB))
cookie = 0xfeedface00000004
c.request(w.CMD_BLOCK_STATUS, cookie, 0, 16 * MiB)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, 0, "BLOCK_STATUS (extended)")
bs = {}
for r in reps:
    check(r.type == w.REPLY_TYPE_BLOCK_STATUS_EXT,
          f"BLOCK_STATUS (extended): chunk type {r.type}, expected BLOCK_STATUS_EXT (6)")
    cid, ext = w.parse_block_status(r)
    check(cid not in bs, f"BLOCK_STATUS: two chunks for context {cid}")
    bs[cid] = ext
check(sorted(bs) == sorted(ctx.values()), f"BLOCK_STATUS: chunks for contexts {sorted(bs)}, negotiated {ctx}")
for cid, ext in bs.items():
    for ln, st in ext:
        check(ln > 0, f"BLOCK_STATUS_EXT: zero-length extent in {ext}")
        check(st >> 32 == 0, f"BLOCK_STATUS_EXT: status 0x{st:x} has high 32 bits set")
base = bs[ctx["base:allocation"]]
pos, got_layout = 0, []
for ln, st in base:
    got_layout.append((pos, ln, st))
    pos += ln
got_layout = w.merge_extents(got_layout)
covered = min(pos, 16 * MiB)
exp_layout = w.merge_extents(w.file_layout(BIG, 0, covered))
clipped = w.merge_extents([(o, min(n, covered - o), f) for o, n, f in got_layout if o < covered])
check(clipped == exp_layout,
      f"base:allocation (extended) over [0, {covered}): got {clipped}, file layout {exp_layout}")
depth = bs[ctx["qemu:allocation-depth"]]
check(all(st == 1 for _, st in depth), f"qemu:allocation-depth: expected depth 1 everywhere, got {depth}")
ok(f"BLOCK_STATUS -> BLOCK_STATUS_EXT per context, count field right, base:allocation = {exp_layout}")

cookie = 0xfeedface00000005
c.request(w.CMD_BLOCK_STATUS, cookie, 512 * KiB, 64 * KiB, w.CMD_FLAG_REQ_ONE)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, 512 * KiB, "BLOCK_STATUS REQ_ONE (extended)")
for r in reps:
    cid, ext = w.parse_block_status(r)
    check(len(ext) == 1 and 0 < ext[0][0] <= 64 * KiB,
          f"BLOCK_STATUS REQ_ONE: context {cid}: expected one extent <= 64 KiB, got {ext}")
    if cid == ctx["base:allocation"]:
        check(ext[0][1] == 0, f"BLOCK_STATUS REQ_ONE at 512 KiB (data): flags {ext[0][1]}")
ok("BLOCK_STATUS REQ_ONE -> exactly one extent per context, not longer than the request")

cookie = 0xfeedface00000006
c.request(w.CMD_BLOCK_STATUS, cookie, MiB, 6 * GiB)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, MiB, "BLOCK_STATUS with a 6 GiB effect length")
for r in reps:
    cid, ext = w.parse_block_status(r)
    if cid == ctx["base:allocation"]:
        check(ext[0][1] == w.STATE_HOLE | w.STATE_ZERO,
              f"BLOCK_STATUS 6 GiB from 1 MiB: first extent {ext[0]} should be a hole (3)")
ok("BLOCK_STATUS with a 64-bit effect length (6 GiB) succeeds")

# 64-bit TRIM and WRITE_ZEROES.
for moff in (GiB - 4096, 6 * GiB, 3 * GiB, 2 * GiB - 4096, 7 * GiB + 4096, 5 * GiB):
    data = rng.randbytes(4096)
    cookie = 0xa000 + moff // 4096
    c.write(cookie, moff, data)
    ext_ok(c.reply_for(cookie), cookie, moff, "marker WRITE")
    big_write(moff, data)
cookie = 0xfeedface00000007
t = time.time()
c.request(w.CMD_TRIM, cookie, GiB, 5 * GiB)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, GiB, "TRIM 5 GiB")
check(len(reps) == 1 and reps[0].type == w.REPLY_TYPE_NONE, f"TRIM 5 GiB: {reps}")
for moff in (GiB - 4096, 6 * GiB):
    got, err = c.read(0xb000, moff, 4096)
    check(got == big_marks[moff], f"TRIM [1 GiB, 6 GiB): data at {moff} outside the range changed")
big_zero(GiB, 5 * GiB)   # a trimmed raw file reads back as zeros
ok(f"TRIM with a 5 GiB (64-bit) length succeeds ({time.time() - t:.1f}s), data outside kept")

cookie = 0xfeedface00000008
t = time.time()
c.request(w.CMD_WRITE_ZEROES, cookie, 2 * GiB, 5 * GiB + 4096)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, 2 * GiB, "WRITE_ZEROES 5 GiB")
big_zero(2 * GiB, 5 * GiB + 4096)
for moff, n in ((2 * GiB - 4096, 8192), (5 * GiB, 4096), (7 * GiB, 8192)):
    got, err = c.read(0xb001, moff, n)
    check(err == 0 and got == big_expected(moff, n),
          f"WRITE_ZEROES [2 GiB, 7 GiB+4096): wrong data at {moff}+{n}")
ok(f"WRITE_ZEROES with a 64-bit length succeeds ({time.time() - t:.1f}s), range zero, neighbours kept")

cookie = 0xfeedface00000009
c.request(w.CMD_FLUSH, cookie)
reps = c.reply_for(cookie)
ext_ok(reps, cookie, 0, "FLUSH")
check(len(reps) == 1 and reps[0].type == w.REPLY_TYPE_NONE and reps[0].length == 0, f"FLUSH: {reps}")
with open(BIG, "rb") as f:
    for moff, md in big_marks.items():
        f.seek(moff)
        check(f.read(len(md)) == md, f"after FLUSH: big.img on disk differs at {moff}")
ok("FLUSH -> extended NONE|DONE; big.img on disk matches")

cookie = 0xfeedface0000000a
c.request(w.CMD_CACHE, cookie, 0, MiB)
ext_ok(c.reply_for(cookie), cookie, 0, "CACHE")
ok("CACHE -> success")

# Errors as extended ERROR chunks.
errcases = [
    ("READ past end", w.CMD_READ, BIG_SIZE - 4096, 8192, 0, w.EINVAL),
    ("READ at end", w.CMD_READ, BIG_SIZE, 512, 0, w.EINVAL),
    ("READ longer than 32 MiB", w.CMD_READ, 0, MAX_PAYLOAD + 4096, 0, w.EINVAL),
    ("WRITE_ZEROES past end", w.CMD_WRITE_ZEROES, BIG_SIZE - 4096, 8192, 0, w.ENOSPC),
    # Spec, "Error values": EINVAL for a read or *trim* beyond the end,
    # ENOSPC for a write (WRITE_ZEROES counts as a write).
    ("TRIM past end", w.CMD_TRIM, BIG_SIZE - 4096, 8192, 0, w.EINVAL),
    ("unknown command 42", 42, 0, 4096, 0, w.EINVAL),
    ("READ with unknown flag bit 9", w.CMD_READ, 0, 4096, 1 << 9, w.EINVAL),
    ("BLOCK_STATUS past end", w.CMD_BLOCK_STATUS, BIG_SIZE + 4096, 4096, 0, w.EINVAL),
    # 64-bit lengths must not be truncated to 32 bits (2^32 + 4096 -> 4096).
    ("READ of 4 GiB + 4 KiB", w.CMD_READ, 0, (1 << 32) + 4096, 0, w.EINVAL),
    ("WRITE_ZEROES of 4 GiB + 4 KiB ending past the end", w.CMD_WRITE_ZEROES, 4 * GiB, (1 << 32) + 4096, 0,
     w.ENOSPC),
    ("TRIM of 4 GiB + 4 KiB ending past the end", w.CMD_TRIM, 4 * GiB, (1 << 32) + 4096, 0, w.EINVAL),
    # offset + length wrapping around 2^64
    ("READ with offset+length wrapping 2^64", w.CMD_READ, (1 << 64) - 4096, 8192, 0, w.EINVAL),
    ("WRITE_ZEROES with offset+length wrapping 2^64", w.CMD_WRITE_ZEROES, (1 << 64) - 4096, 8192, 0, w.ENOSPC),
    ("TRIM with offset+length wrapping 2^64", w.CMD_TRIM, (1 << 64) - 4096, 8192, 0, w.EINVAL),
    ("BLOCK_STATUS with offset+length wrapping 2^64", w.CMD_BLOCK_STATUS, (1 << 64) - 4096, 8192, 0, w.EINVAL),
]
for i, (what, cmd, eoff, elen, eflags, eerr) in enumerate(errcases):
    cookie = 0xee00000000000000 + i
    c.request(cmd, cookie, eoff, elen, eflags)
    if expect_error_chunk(c, c.reply_for(cookie), eerr, cookie, eoff, what + " (extended)"):
        ok(f"{what} -> extended ERROR chunk, error {eerr}, offset echoed")
# BLOCK_STATUS whose range runs past the end: EINVAL like every other
# command (spec, "Size constraints" and NBD_CMD_BLOCK_STATUS: the server
# SHOULD return NBD_EINVAL for a request including sectors beyond the
# size; docs/nbd-conformance.md).  Extended headers, 64-bit length:
cookie = 0xee000000000000d0
c.request(w.CMD_BLOCK_STATUS, cookie, 4 * GiB, (1 << 32) + 4096)
if expect_error_chunk(c, c.reply_for(cookie), w.EINVAL, cookie, 4 * GiB,
                      "BLOCK_STATUS of 4 GiB + 4 KiB ending past the end (extended)"):
    ok("BLOCK_STATUS of 4 GiB + 4 KiB ending past the end -> EINVAL")
cookie = 0xee000000000000f0
c.write(cookie, BIG_SIZE - 100, bytes(200))
if expect_error_chunk(c, c.reply_for(cookie), w.ENOSPC, cookie, BIG_SIZE - 100, "WRITE past end (extended)"):
    ok("WRITE past end -> extended ERROR chunk ENOSPC")
cookie = 0xee000000000000e0
c.write(cookie, (1 << 64) - 100, bytes(200))
if expect_error_chunk(c, c.reply_for(cookie), w.ENOSPC, cookie, (1 << 64) - 100,
                      "WRITE with offset+length wrapping 2^64 (extended)"):
    ok("WRITE with offset+length wrapping 2^64 -> ENOSPC")
cookie = 0xee000000000000e2
c.request(w.CMD_WRITE, cookie, 0, 4096, w.CMD_FLAG_PAYLOAD_LEN | (1 << 9), b"\x5a" * 4096)
expect_error_chunk(c, c.reply_for(cookie), w.EINVAL, cookie, 0, "WRITE with unknown flag bit 9 (extended)")
got, err = c.read(0xee000000000000e3, 0, 4096)
check(err == 0 and got == big_expected(0, 4096),
      "READ after a WRITE with an unknown flag: wrong data (payload not consumed, or written despite the error)")
ok("WRITE with an unknown flag -> EINVAL, payload consumed and not written")
cookie = 0xee000000000000e1
c.request(w.CMD_READ, cookie, 0, 8, w.CMD_FLAG_PAYLOAD_LEN, b"\x5a" * 8)
if expect_error_chunk(c, c.reply_for(cookie), w.EINVAL, cookie, 0, "READ with an 8-byte payload (extended)"):
    ok("READ with PAYLOAD_LEN -> EINVAL")
cookie = 0xee000000000000f1
c.request(w.CMD_FLUSH, cookie, 0, 16, w.CMD_FLAG_PAYLOAD_LEN, b"\xa5" * 16)
soft_ok = expect_error_chunk(c, c.reply_for(cookie), w.EINVAL, cookie, 0, "FLUSH with a 16-byte payload")
got, err = c.read(0xee000000000000f2, 0, 4096)
check(err == 0 and got == big_expected(0, 4096),
      "READ after FLUSH+payload: payload was not consumed (stream out of sync)")
ok("FLUSH with PAYLOAD_LEN -> EINVAL (if no failure above), payload consumed, next request works")
if not c.export_flags & w.FLAG_BLOCK_STATUS_PAYLOAD:
    cookie = 0xee000000000000f3
    pl = struct.pack(">QI", 4096, ctx["base:allocation"])
    c.request(w.CMD_BLOCK_STATUS, cookie, 0, len(pl), w.CMD_FLAG_PAYLOAD_LEN, pl)
    soft_ok = expect_error_chunk(c, c.reply_for(cookie), w.EINVAL, cookie, 0,
                                 "BLOCK_STATUS with payload, BLOCK_STATUS_PAYLOAD not advertised")
    got, err = c.read(0xee000000000000f4, 0, 4096)
    check(err == 0 and got == big_expected(0, 4096), "READ after BLOCK_STATUS+payload: out of sync")
    ok("BLOCK_STATUS with PAYLOAD_LEN (not advertised) -> EINVAL, payload consumed")
got, err = c.read(0xee000000000000f5, 4 * GiB, 64 * KiB)
check(err == 0 and got == big_expected(4 * GiB, 64 * KiB), "extended READ after all errors failed")
c.disc()
expect_closed(c, "DISC (extended)")
ok("extended connection usable after every error; DISC closes it")

# --------------------------------------------------------------------------
# Compact-mode abuse.  `good` stays connected throughout and must keep working.
good = conn()
good.handshake("disk")
good_cookie = [0x6000]


def good_works(what):
    good_cookie[0] += 1
    o = rng.randrange(0, 8 * MiB - 4096)
    try:
        got, err = good.read(good_cookie[0], o, 4096)
    except (w.Closed, OSError) as e:
        fail(f"{what}: the well-behaved connection broke: {e}")
    check(err == 0 and got == disk[o:o + 4096], f"{what}: well-behaved connection read wrong data")
    check(dm.alive(), f"{what}: stratad died:\n{dm.logtext()}")


c = conn()
c.handshake("disk")
c.request(w.CMD_READ, 1, 0, 4096, magic=0xdeadbeef)
expect_closed(c, "request with bad magic 0xdeadbeef")
good_works("after a bad request magic")
ok("request with bad magic -> that client disconnected, another client keeps working")

c = conn()
c.handshake("disk")
c.request(42, 0x42, 0, 0)
r = c.recv_reply()
check(r.kind == "simple" and r.cookie == 0x42 and r.error == w.EINVAL,
      f"unknown command 42 (simple replies): expected simple reply EINVAL, got {r}")
c.request(77, 0x43, 4096, 4096, 0)
r = c.recv_reply()
check(r.kind == "simple" and r.cookie == 0x43 and r.error == w.EINVAL,
      f"unknown command 77: expected simple reply EINVAL, got {r}")
data, err = c.read(0x44, 8192, 4096)
check(err == 0 and data == disk[8192:12288], "READ after unknown commands failed")
err = c.simple_cmd(w.CMD_READ, 0x45, 0, 4096, 1 << 12)
check(err == w.EINVAL, f"READ with unknown flag bit 12 (simple): expected EINVAL, got {err}")
err = c.simple_cmd(w.CMD_WRITE, 0x46, DISK_SIZE - 10, 0, 0, bytes(20))
check(err == w.ENOSPC, f"WRITE past end (simple): expected ENOSPC, got {err}")
err = c.simple_cmd(w.CMD_WRITE, 0x4e, 0, 0, 1 << 9, b"\x5a" * 4096)
soft(err == w.EINVAL, f"WRITE with unknown flag bit 9 (simple): expected EINVAL, got {err}")
data, err = c.read(0x4f, 0, 4096)
check(err == 0 and data == disk[0:4096],
      "READ after a WRITE with an unknown flag (simple): wrong data (payload not consumed, or written anyway)")
err = c.simple_cmd(w.CMD_READ, 0x4a, (1 << 64) - 4096, 8192)
soft(err == w.EINVAL, f"READ with offset+length wrapping 2^64 (simple): expected EINVAL, got {err}")
err = c.simple_cmd(w.CMD_WRITE, 0x4b, (1 << 64) - 100, 0, 0, bytes(200))
soft(err == w.ENOSPC, f"WRITE with offset+length wrapping 2^64 (simple): expected ENOSPC, got {err}")
data, err = c.read(0x47, 0, 4096)
check(err == 0 and data == disk[0:4096], "READ after errors (simple) failed")
ok("unknown command -> simple EINVAL reply and the next request works")

c.request(w.CMD_WRITE, 0x48, 0, MAX_PAYLOAD + 1)
extra, secs = expect_closed(c, "WRITE declaring a 32 MiB + 1 payload (no payload sent)")
good_works("after an oversized WRITE")
ok(f"WRITE with payload > 32 MiB -> disconnect ({secs:.2f}s, {len(extra)} bytes before close)")

c = conn()
c.handshake("disk")
c.request(w.CMD_WRITE, 0x49, 0, 64 * MiB)
expect_closed(c, "WRITE declaring a 64 MiB payload")
good_works("after a 64 MiB WRITE header")
ok("WRITE with payload 64 MiB -> disconnect")

c = conn()
c.handshake("disk", extended=True)
c.request(w.CMD_WRITE, 0x4c, 0, MAX_PAYLOAD + 4096, w.CMD_FLAG_PAYLOAD_LEN)
expect_closed(c, "extended WRITE declaring a 32 MiB + 4 KiB payload")
good_works("after an oversized extended WRITE")
ok("extended WRITE with PAYLOAD_LEN > 32 MiB -> disconnect")

c = conn()
c.handshake("disk", extended=True)
c.request(w.CMD_FLUSH, 0x4d, 0, 1 << 40, w.CMD_FLAG_PAYLOAD_LEN)
expect_closed(c, "extended FLUSH declaring a 1 TiB payload")
good_works("after a 1 TiB payload header")
ok("extended FLUSH with PAYLOAD_LEN 1 TiB -> disconnect")

c = conn()
c.handshake("disk", structured=True)
N = 256
c.send(b"".join(c.header(w.CMD_READ, 0x7000 + i, (i * 64 * KiB) % (8 * MiB), 64 * KiB) for i in range(N)))
for i in range(N):
    o = (i * 64 * KiB) % (8 * MiB)
    data, err = c.read_data(c.reply_for(0x7000 + i), o, 64 * KiB)
    check(err == 0 and data == disk[o:o + 64 * KiB], f"{N} pipelined reads: read {i} wrong (error {err})")
c.disc()
c.close()
ok(f"{N} reads sent back to back before reading any reply -> all answered correctly")

c = conn()
c.start()
c.send_option(0x7777, length=0xffffffff)
try:
    closed, extra, _ = c.wait_closed(2.0)
except OSError:
    closed, extra = True, b""
c.close()
good_works("after an option declaring a 4 GiB payload")
ok(f"option declaring a 4 GiB payload -> daemon fine ({'closed' if closed else 'left open'}, "
   f"{len(extra)} bytes of reply)")

c = conn()
c.start()
try:
    c.send_option(0x7777, bytes(MiB))
    r = c.recv_option_reply()
    reps = c.option(w.OPT_INFO, Conn.info_payload("disk"))
    check(r[1] in (w.REP_ERR_UNSUP, w.REP_ERR_TOO_BIG, w.REP_ERR_INVALID) and reps[-1][0] == w.REP_ACK,
          f"unknown option with a 1 MiB payload: reply {w.rep_name(r[1])}, then INFO {reps}")
    how = f"{w.rep_name(r[1])}, negotiation continues"
except (w.Closed, OSError) as e:
    how = f"connection closed ({e})"
c.close()
good_works("after an option with a 1 MiB payload")
ok(f"unknown option with a 1 MiB payload -> {how}")

c = conn()
c.handshake("disk")
c.send(c.header(w.CMD_READ, 0x50, 0, 4096)[:13])
c.close()
time.sleep(0.2)
good_works("after a half request header")
ok("half a request header then close -> daemon fine")

c = conn()
c.handshake("disk")
c.send(c.header(w.CMD_WRITE, 0x51, 8 * MiB, MiB) + bytes(MiB // 2))
c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()   # RST
time.sleep(0.2)
good_works("after a WRITE with half its payload then reset")
ok("WRITE header + half the payload then vanish (RST) -> daemon fine")

c = conn()
c.handshake("disk")
for i in range(32):
    c.request(w.CMD_READ, 0x100 + i, i * MiB % DISK_SIZE, MiB)
c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
time.sleep(0.3)
good_works("after a client vanished with 32 MiB of read replies pending")
ok("client vanishes with 32 reads in flight -> daemon fine")

c = conn()
c.start()
c.send(struct.pack(">QI", w.NBD_OPT_MAGIC, w.OPT_GO))
c.close()
c = conn()
c.start()
c.send_option(w.OPT_GO, b"", length=100)
c.send(b"\0\0\0\4di")
c.close()
time.sleep(0.2)
good_works("after clients vanished mid-option")
ok("clients vanishing mid-option header / mid-option payload -> daemon fine")

# Dribbled input: handshake, request header and write payload in tiny pieces.
c = Conn(("127.0.0.1", dm.port))
c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.read_greeting()
msg = (struct.pack(">I", w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES)
       + struct.pack(">QII", w.NBD_OPT_MAGIC, w.OPT_GO, len(Conn.info_payload("disk"))) + Conn.info_payload("disk"))
for i in range(len(msg)):
    c.send(msg[i:i + 1])
    time.sleep(0.001)
while True:
    ropt, rtype, _ = c.recv_option_reply()
    check(rtype in (w.REP_INFO, w.REP_ACK), f"GO sent byte by byte: reply {w.rep_name(rtype)}")
    if rtype == w.REP_ACK:
        break
data = rng.randbytes(256 * KiB)
msg = c.header(w.CMD_WRITE, 0x8000, 10 * MiB + 3, len(data)) + data
for i in range(0, 28):
    c.send(msg[i:i + 1])
    time.sleep(0.001)
for i in range(28, len(msg), 1000):
    c.send(msg[i:i + 1000])
r = c.recv_reply()
check(r.kind == "simple" and r.cookie == 0x8000 and r.error == 0, f"WRITE sent in pieces: reply {r}")
disk[10 * MiB + 3:10 * MiB + 3 + len(data)] = data
c.request(w.CMD_READ, 0x8001, 10 * MiB + 3, len(data))
got = c.recv_reply()
check(got.error == 0 and got.payload == data, "READ after a WRITE sent in pieces: wrong data")
c.disc()
c.close()
ok("handshake, header and payload dribbled in 1-byte / 1000-byte pieces -> handled")

# A client that stops reading its replies must not stall the others: the
# well-behaved connection's reads are answered (each within its socket
# timeout, which only bounds a hang) while the lazy client's 64 MiB of
# replies are undelivered (they cannot fit in its 4 KiB receive buffer and
# the daemon's send buffer).  How long the reads take is only reported.
lazy = conn()
lazy.handshake("disk")
lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
lazy.send(b"".join(lazy.header(w.CMD_READ, 0x9000 + i, (i % 8) * MiB, MiB) for i in range(64)))
time.sleep(0.5)
t = time.monotonic()
for i in range(20):
    good_works("while another client does not read its 64 MiB of replies")
secs = time.monotonic() - t
lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
lazy.close()
ok(f"a client not reading 64 MiB of replies does not stall another ({secs * 1000:.0f} ms for 20 reads)")

conns = []
for i in range(64):
    cc = conn()
    cc.handshake("disk", structured=bool(i % 2))
    conns.append(cc)
for i, cc in enumerate(conns):
    o = (i * 4096 * 3) % (8 * MiB)
    data, err = cc.read(1, o, 4096)
    check(err == 0 and data == disk[o:o + 4096], f"64 simultaneous connections: connection {i} read wrong data")
for cc in conns:
    cc.disc()
    cc.close()
good_works("after 64 simultaneous connections")
ok("64 simultaneous connections each served")

# Soft disconnect with requests in flight.
c = conn()
c.handshake("disk", structured=True)
msgs = []
expect = {}
for i in range(8):
    o = 12 * MiB + i * 256 * KiB
    data = rng.randbytes(256 * KiB)
    msgs.append(c.header(w.CMD_WRITE, 0x300 + i, o, len(data)) + data)
    disk[o:o + len(data)] = data
for i in range(8):
    o = i * 256 * KiB + 7
    msgs.append(c.header(w.CMD_READ, 0x400 + i, o, 256 * KiB))
    c.read_lengths[0x400 + i] = 256 * KiB
    expect[0x400 + i] = (o, bytes(disk[o:o + 256 * KiB]))
msgs.append(c.header(w.CMD_FLUSH, 0x500))
msgs.append(c.header(w.CMD_DISC, 0x501))
c.send(b"".join(msgs))
want_cookies = {0x300 + i for i in range(8)} | set(expect) | {0x500}
seen = set()
for ck in sorted(want_cookies):
    try:
        reps = c.reply_for(ck)
    except (w.Closed, OSError) as e:
        fail(f"DISC with requests in flight: connection closed before the reply to 0x{ck:x} "
             f"(have replies for {sorted(hex(x) for x in seen)}): {e}")
    check(not any(r.is_error for r in reps), f"DISC in flight: request 0x{ck:x} failed: {reps}")
    if ck in expect:
        o, want_data = expect[ck]
        got, err = c.read_data(reps, o, len(want_data))
        check(got == want_data, f"DISC in flight: READ 0x{ck:x} returned wrong data")
    seen.add(ck)
check(not c.stash, f"DISC in flight: stray replies {c.stash}")
expect_closed(c, "after DISC with requests in flight")
with open(DISK, "rb") as f:
    on_disk = f.read()
diff = first_diff(on_disk, disk)
check(diff is None, f"DISC in flight: disk.img on disk differs from the expected content at offset {diff}"
      + (" (inside the 8 MiB area of the WRITE whose payload was cut off: the daemon wrote a partial payload)"
         if diff is not None and 8 * MiB <= diff < 9 * MiB else ""))
ok("DISC with 17 requests in flight -> all replies arrive, then close; writes on disk")

good_works("after all compact abuse")
good.disc()
good.close()

# --------------------------------------------------------------------------
# BLOCK_STATUS past the end, stratad and qemu-nbd asked the same on the same
# file (structured replies, base:allocation): a range that ends past the end
# of the export is refused with EINVAL by both, one that ends at the end is
# answered by both.  (qemu-nbd here has no extended headers: compact
# requests.)
def bs_answers(addr):
    """[(what, error or None, extents covered)] for the requests below."""
    cb = Conn(addr)
    cb.handshake("big", structured=True, contexts=["base:allocation"])
    out = []
    for i, (what, boff, blen) in enumerate((
            ("ending 4 KiB past the end", BIG_SIZE - 4096, 8192),
            ("ending 1 MiB past the end", BIG_SIZE - MiB, 2 * MiB),
            ("starting at the end", BIG_SIZE, 4096),
            ("ending at the end", BIG_SIZE - 8192, 8192))):
        cb.request(w.CMD_BLOCK_STATUS, 0x7700 + i, boff, blen)
        reps = cb.reply_for(0x7700 + i)
        errs = [r for r in reps if r.is_error]
        if errs:
            out.append((what, errs[0].error, None))
        else:
            ext = [e for r in reps if r.type == w.REPLY_TYPE_BLOCK_STATUS
                   for e in w.parse_block_status(r)[1]]
            out.append((what, None, sum(n for n, _ in ext)))
    cb.disc()
    cb.close()
    return out


ours = bs_answers(SOCK)
for what, err, covered in ours:
    if what.startswith("ending at"):
        check(err is None and 0 < covered <= 8192,
              f"stratad: BLOCK_STATUS {what}: error {err}, {covered} bytes covered")
    else:
        check(err == w.EINVAL, f"stratad: BLOCK_STATUS {what}: expected EINVAL, got "
              f"{'success' if err is None else err}")
if shutil.which("qemu-nbd"):
    qsock = os.path.join(d, "qemu-nbd.sock")
    qn = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-t", "-x", "big", "-k", qsock,
                           BIG], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t_q = time.monotonic() + 30                # bounds a hang
    while not os.path.exists(qsock):
        check(qn.poll() is None and time.monotonic() < t_q,
              f"qemu-nbd did not start: {qn.stderr.read() if qn.poll() is not None else ''}")
        time.sleep(0.02)
    try:
        theirs = bs_answers(qsock)
    finally:
        # the reference server only has to answer; one that does not
        # stop on SIGTERM (seen once under load) is killed
        qn.terminate()
        try:
            qn.wait(30)
        except subprocess.TimeoutExpired:
            qn.kill()
            qn.wait(30)
    for (what, err, covered), (_, qerr, qcovered) in zip(ours, theirs):
        check((err is None) == (qerr is None) and (err is None or err == qerr),
              f"BLOCK_STATUS {what}: stratad answers "
              f"{'success' if err is None else err}, qemu-nbd "
              f"{'success' if qerr is None else qerr}")
    ok("BLOCK_STATUS past the end -> EINVAL, ending at the end -> answered; "
       "the same as qemu-nbd on the same file")
else:
    ok("BLOCK_STATUS past the end -> EINVAL, ending at the end -> answered "
       "(qemu-nbd not installed: not compared)")

# --------------------------------------------------------------------------
# Handshake timeout (separate daemon, --handshake-timeout 2).  The same
# silent and stalled clients go at the same moment to the main daemon,
# whose handshake timeout is the default 10 s: those of the 2 s daemon
# must be dropped while the others are still connected (an order, which a
# busy machine does not change), and not before 2 s (a lower bound, which
# it cannot break either).  The waits of 30 s only bound a hang.
dt = Daemon([f"name=small,file={SMALL},format=raw,readonly=on"],
            extra=["--handshake-timeout", "2"])
t0 = time.monotonic()
silent = Conn(dt.sock)                    # never reads, never sends
stalled = Conn(dt.sock)
stalled.start()
stalled.send(struct.pack(">Q", w.NBD_OPT_MAGIC))   # half an option header
silent10 = Conn(dm.sock)
stalled10 = Conn(dm.sock)
stalled10.start()
stalled10.send(struct.pack(">Q", w.NBD_OPT_MAGIC))
ready = Conn(dt.sock)
ready.handshake("small")
closed, extra, _ = silent.wait_closed(30.0)
secs = time.monotonic() - t0
check(closed, "handshake timeout 2 s: a silent client was still connected after 30 s")
check(secs >= 1.5, f"handshake timeout 2 s: silent client dropped after {secs:.1f}s, before 2 s")
ok(f"silent client dropped after {secs:.1f}s (--handshake-timeout 2)")
closed, extra, _ = stalled.wait_closed(30.0)
secs = time.monotonic() - t0
check(closed, f"handshake timeout: a client stalled mid-option still connected after {secs:.1f}s")
ok(f"client stalled mid-option dropped after {secs:.1f}s")
for c10, what in ((silent10, "silent"), (stalled10, "stalled mid-option")):
    closed, _, _ = c10.wait_closed(0.05)
    check(not closed, f"default handshake timeout: a {what} client was dropped as early as "
          f"with --handshake-timeout 2 ({time.monotonic() - t0:.1f}s)")
    c10.close()
ok("the same clients of a daemon with the default handshake timeout (10 s) were still "
   "connected then")
time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
try:
    got, err = ready.read(1, 4096, 4096)
except (w.Closed, OSError) as e:
    fail(f"handshake timeout: a client in transmission phase was dropped after "
         f"{time.monotonic() - t0:.1f}s idle ({e}); the timeout must apply to the handshake only")
check(err == 0 and got == small_data[4096:8192], "READ after 3 s idle in transmission failed")
ready.disc()
ready.close()
ok("client idle 3 s in transmission phase is not dropped")
check(dt.alive(), "handshake-timeout daemon died:\n" + dt.logtext())

# --------------------------------------------------------------------------
# The daemon survived everything and still serves fresh clients.
check(dm.alive(), "stratad died:\n" + dm.logtext())
c = Conn(("127.0.0.1", dm.port))
c.handshake("disk", extended=True, contexts=["base:allocation"])
got, err = c.read(1, 12 * MiB, MiB)
check(err == 0 and got == bytes(disk[12 * MiB:13 * MiB]), "fresh wire client (TCP, extended): wrong data")
c.disc()
c.close()
ok("fresh wire client over TCP with extended headers works")
# A refused write is answered only after its whole payload was read: a
# client still sending the payload has not yet filed the request as sent
# (libnbd puts it in flight when the send is done), so an early reply
# carries a cookie it does not know, and libnbd hangs up, failing every
# other request in flight, also writes the server did and answered after.
for what, export, woff, werr in (("read-only export", "ro", 0, w.EPERM),
                                 ("write past the end", "disk", DISK_SIZE - 4096, w.ENOSPC)):
    c = conn()
    c.handshake(export, structured=True)
    payload = b"\x77" * (256 * KiB)
    cookie = 0xdd00000000000001
    c.send(c.header(w.CMD_WRITE, cookie, woff, len(payload)) + payload[:100 * KiB])
    early = c.pending(0.5)
    check(early == b"", f"{what}: the daemon answered a refused write before its payload was "
          f"all sent ({len(early)} bytes came back after 100 of 256 KiB); expected the reply "
          f"after the payload")
    c.send(payload[100 * KiB:])
    expect_error_chunk(c, c.reply_for(cookie), werr, cookie, woff, what + " (payload in two parts)")
    got, err = c.read(cookie + 1, 0, 4096)
    check(err == 0, f"{what}: a read after the refused write failed ({err}): payload not consumed?")
    c.disc()
    c.close()
    ok(f"{what}: refused write (error {werr}) answered after its whole payload")

# A client that sends options but never reads the replies: the daemon must
# stop reading it (its sends block) instead of queueing replies without
# bound, and keep serving others.
rss_kib = harness.rss_kib


flood = w.Conn(dm.sock, timeout=2.0)
flood.start()
rss0 = rss_kib(dm.proc.pid)
one = struct.pack(">QII", w.NBD_OPT_MAGIC, 3, 0)       # NBD_OPT_LIST
batch = one * 4096
sent = 0
blocked = False
t_end = time.time() + 20
while time.time() < t_end and sent < (64 << 20):
    try:
        flood.sock.sendall(batch)
        sent += len(batch)
    except (socket.timeout, TimeoutError):
        blocked = True
        break
grown = rss_kib(dm.proc.pid) - rss0
# unbounded, every 16-byte LIST would queue several reply messages: ~4x more
check(blocked, f"daemon kept reading {sent} bytes of options from a client "
      "that reads no replies (no back-pressure)")
check(grown < 32 * 1024, f"daemon RSS grew by {grown} KiB while a client "
      f"flooded {sent} bytes of options without reading replies")
probe = w.Conn(dm.sock)
probe.handshake("disk", structured=True)
data, err = probe.read(1, 0, 4096)
check(err == 0 and bytes(data) == bytes(disk[:4096]),
      f"another client is not served while one floods options (error {err})")
probe.disc()
flood.close()
ok(f"option flood without reading replies: daemon stopped reading after {sent >> 10} KiB, "
   f"RSS +{grown} KiB, others served")

try:
    import nbd
except ImportError:
    nbd = None
    print("note: python3-libnbd not available, fresh libnbd client check skipped")
if nbd is not None:
    h = nbd.NBD()
    h.connect_uri(dm.uri("disk"))
    got = h.pread(MiB, 12 * MiB)
    check(got == bytes(disk[12 * MiB:13 * MiB]), "fresh libnbd client: wrong data")
    h.shutdown()
    ok("fresh libnbd client works")
check(dm.alive(), "stratad died at the end:\n" + dm.logtext())
if FAILURES:
    fail(f"{len(FAILURES)} check(s) failed:\n  " + "\n  ".join(FAILURES))
rc = dm.stop()
print(f"note: stratad exited with status {rc} on SIGTERM")
print(f"PASS test-wire ({time.time() - T0:.1f}s)")
sys.exit(0)
