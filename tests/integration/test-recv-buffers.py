#!/usr/bin/python3
"""How stratad receives requests: the multishot receive into provided
buffers, and the fallback to one receive per request.

Runs the same client traffic three times: with every io_uring feature the
kernel has (transmission then uses one multishot receive per connection,
filling a ring of provided buffers), without SINGLE_ISSUER and
DEFER_TASKRUN (a 5.19 kernel: COOP_TASKRUN), and with
STRATA_URING_DISABLE=all (one recv at a time, the path for kernels without
any of them).  The traffic is cut so that
buffer boundaries fall everywhere: request headers sent a byte at a time,
write payloads in odd pieces and spanning several buffers, a burst whose
requests straddle buffer boundaries, a refused write whose payload must be
skipped across buffers, and a flood of pipelined requests sent without
reading replies (the server must stop reading, then go on: back-pressure
with every buffer held).  Every byte is checked by reading it back.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-recv-buffers.py
"""
import os
import random
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB
BUFSIZE = 32 * KiB          # STREAM_MS_BUFSIZE (common/stream.h)

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok
check = harness.check_hard

rng = random.Random(17)


def write_ok(c, cookie):
    reps = c.reply_for(cookie)
    errs = [r for r in reps if r.is_error]
    check(not errs, f"write {cookie:#x} failed: {errs}")


def verify(c, model, what):
    """Reads the whole export back in 1 MiB pieces and compares."""
    for off in range(0, SIZE, MiB):
        data, err = c.read(0xF0000000 + off // MiB, off, MiB)
        check(err == 0, f"{what}: read at {off} failed with {err}")
        if data != bytes(model[off:off + MiB]):
            i = next(k for k in range(MiB) if data[k] != model[off + k])
            harness.fail(f"{what}: data differs at byte {off + i}")


def run(mode, disable):
    d = harness.tmpdir()
    img = os.path.join(d, "disk.img")
    model = bytearray(rng.randbytes(SIZE))
    with open(img, "wb") as f:
        f.write(model)
    dm = harness.daemon_uring_disabled(
        disable, [f"name=disk,file={img},format=raw,cache=writeback"], extra=["--verbose"])

    c = Conn(dm.sock, timeout=30)
    c.handshake("disk", structured=True)

    # 1. Headers and payloads a byte at a time and in odd pieces: every
    #    piece arrives on its own, in a buffer of its own.
    cookie = 1
    for n, cuts in ((4096, (1, 7, 4000, 88)), (513, (512, 1)), (64 * KiB, (3,))):
        off = rng.randrange(0, SIZE - n)
        data = rng.randbytes(n)
        msg = c.header(w.CMD_WRITE, cookie, off, n) + data
        for b in msg[:28]:
            c.send(bytes([b]))
            time.sleep(0.003)
        pos = 28
        for k in cuts:
            c.send(msg[pos:pos + k])
            pos += k
            time.sleep(0.01)
        c.send(msg[pos:])
        write_ok(c, cookie)
        model[off:off + n] = data
        cookie += 1
    ok(f"{mode}: headers a byte at a time, payloads in odd pieces")

    # 2. A payload spanning many buffers, sent in pieces that do not line
    #    up with them.
    n = 200 * KiB + 5
    off = rng.randrange(0, SIZE - n)
    data = rng.randbytes(n)
    msg = c.header(w.CMD_WRITE, cookie, off, n) + data
    for pos in range(0, len(msg), 5000):
        c.send(msg[pos:pos + 5000])
        time.sleep(0.001)
    write_ok(c, cookie)
    model[off:off + n] = data
    cookie += 1
    ok(f"{mode}: a {n}-byte write payload across {n // BUFSIZE + 1}+ buffers")

    # 3. A burst of requests of 28 + 1000 bytes in one send: headers and
    #    payloads straddle every buffer boundary.
    burst = bytearray()
    cookies = []
    for i in range(300):
        # disjoint ranges: writes in flight together may land in any order
        off = i * 50000 + rng.randrange(0, 49000)
        data = rng.randbytes(1000)
        burst += c.header(w.CMD_WRITE, cookie, off, 1000) + data
        model[off:off + 1000] = data
        cookies.append(cookie)
        cookie += 1
    c.send(bytes(burst))
    for k in cookies:
        write_ok(c, k)
    ok(f"{mode}: 300 pipelined writes in one {len(burst)}-byte send")

    # 4. A refused write (past the end) with a payload spanning buffers:
    #    the payload is skipped, the next request is parsed correctly.
    bad = rng.randbytes(100 * KiB)
    c.send(c.header(w.CMD_WRITE, cookie, SIZE, len(bad)) + bad)
    reps = c.reply_for(cookie)
    check(any(r.is_error for r in reps), f"{mode}: a write past the end succeeded")
    cookie += 1
    data, err = c.read(cookie, 4096, 4096)
    check(err == 0 and data == bytes(model[4096:8192]),
          f"{mode}: the read after a refused write's payload is wrong (err {err})")
    cookie += 1
    ok(f"{mode}: a refused write's 100 KiB payload skipped across buffers")

    # 5. Flood: 4000 reads and 400 writes pipelined from a thread while
    #    this one reads replies only after a pause, so the server meets its
    #    in-flight bound with every receive buffer held, stops reading,
    #    and must resume.
    reads = []
    msgs = []
    wdata = {}
    pages = list(range(0, SIZE // 4096 - 1, 2))   # disjoint 8 KiB writes
    rng.shuffle(pages)
    for i in range(4400):
        if i % 11 == 5:
            off = pages.pop() * 4096
            data = rng.randbytes(8192)
            msgs.append(c.header(w.CMD_WRITE, cookie, off, len(data)) + data)
            wdata[cookie] = (off, data)
        else:
            off = rng.randrange(0, SIZE - 4096)
            msgs.append(c.header(w.CMD_READ, cookie, off, 4096))
            c.read_lengths[cookie] = 4096
            reads.append((cookie, off))
        cookie += 1
    # reads may overlap writes of the same flood: check them against the
    # model only where no write of the flood touched
    touched = bytearray(SIZE // 4096 + 2)
    for off, data in wdata.values():
        for p in range(off // 4096, (off + len(data) + 4095) // 4096):
            touched[p] = 1
    errors = []

    def sender():
        try:
            c.send(b"".join(msgs))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    t = threading.Thread(target=sender)
    t.start()
    time.sleep(1.0)         # nothing read: the server must hold back
    check(dm.alive(), f"{mode}: stratad died under a pipelined flood")
    got = {}
    done = 0
    while done < len(msgs):
        r = c.recv_reply()
        if r.done:
            done += 1
        if r.kind == "structured" and r.type == w.REPLY_TYPE_OFFSET_DATA:
            got[("data", r.cookie)] = r.payload[8:]
        if r.is_error:
            harness.fail(f"{mode}: request {r.cookie:#x} of the flood failed: {r.error}")
    t.join(60)
    check(not t.is_alive() and not errors, f"{mode}: sending the flood failed: {errors}")
    checked = 0
    for k, off in reads:
        data = got.get(("data", k))
        check(data is not None and len(data) == 4096,
              f"{mode}: read {k:#x} of the flood returned no data")
        if not any(touched[p] for p in range(off // 4096, (off + 4095) // 4096 + 1)):
            check(data == bytes(model[off:off + 4096]),
                  f"{mode}: read {k:#x} at {off} of the flood returned wrong data")
            checked += 1
    for off, data in wdata.values():
        model[off:off + len(data)] = data
    ok(f"{mode}: flood of {len(reads)} reads and {len(wdata)} writes pipelined "
       f"({checked} reads checked), every reply arrived")

    verify(c, model, mode)
    ok(f"{mode}: the whole export reads back as written")
    c.disc()
    c.wait_closed(10)
    c.close()

    # several connections at once, each with its own buffers
    conns = [Conn(dm.sock, timeout=30) for _ in range(4)]
    for k, cc in enumerate(conns):
        cc.handshake("disk", structured=True)
        off = k * MiB
        data = rng.randbytes(300 * KiB)
        cc.write(0x100 + k, off, data)
        model[off:off + len(data)] = data
    for k, cc in enumerate(conns):
        write_ok(cc, 0x100 + k)
    verify(conns[0], model, f"{mode}, 4 connections")
    for cc in conns:
        cc.disc()
        cc.close()
    ok(f"{mode}: four connections at once")

    log = dm.logtext()
    check(dm.stop() == 0, f"{mode}: stratad did not exit cleanly:\n{log[-3000:]}")
    feat = [ln for ln in log.splitlines() if "io_uring: " in ln]
    check(feat, f"{mode}: --verbose did not log the io_uring features in use")
    if disable == "all":
        check("multishot receive" not in log and feat[0].endswith("none"),
              f"{mode}: features in use although all disabled: {feat[0]}")
    elif "recv_multishot" in feat[0]:
        check(log.count("multishot receive") >= 5,
              f"{mode}: connections did not use the multishot receive")
    else:
        print(f"note: this kernel offers no multishot receive ({feat[0]})")
    ok(f"{mode}: {feat[0].split('io_uring: ', 1)[1]}")


run("every feature", "")
run("COOP_TASKRUN", "single_issuer,defer_taskrun")
run("fallback", "all")
print("PASS")
