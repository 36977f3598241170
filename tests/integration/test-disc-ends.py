#!/usr/bin/python3
"""A client's last bytes before it goes: NBD_CMD_DISC followed at once by
the end of the connection.

Each connection sends some requests and NBD_CMD_DISC, then ends its side at
once, in the ways clients do: shutdown(SHUT_WR) and reading the replies to
the end; shutdown(SHUT_RDWR) (the kernel's nbd client); close() with the
replies unread (on TCP the client's kernel answers them with a reset).
The last bytes come together with the end of the stream, in one write or
with DISC split across writes, after bursts of writes that fill every
provided buffer (the kernel ends the multishot receive with -ENOBUFS), and
with the request header split across buffers.  stratad must parse every
connection's DISC (its --verbose log line "conn N: NBD_CMD_DISC after")
before it lets the connection go, and apply every write before it.

Runs with every io_uring feature the kernel has (multishot receive into
provided buffers) and with STRATA_URING_DISABLE=all (one recv at a time).

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-disc-ends.py [rounds]
"""
import os
import random
import re
import socket
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
SIZE = 4 * MiB
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
CONNS = 24                  # per round, all at once

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok
check = harness.check_hard

VARIANTS = ("reads+disc+shut_wr", "reads+disc+shut_rdwr", "reads+disc+close",
            "writes+disc+shut_rdwr", "writes+disc+close",
            "split-disc+shut_rdwr", "header-across-buffers+close",
            "disc-alone+shut_rdwr")


def hdr(cmd, cookie, off=0, length=0):
    return struct.pack(">IHHQQI", w.NBD_REQUEST_MAGIC, 0, cmd, cookie, off,
                       length)


def client(addr, variant, seed, errors, written):
    rng = random.Random(seed)
    try:
        c = Conn(addr, timeout=30)
        c.handshake("disk")
        s = c.sock
        disc = hdr(w.CMD_DISC, 0xD15C)
        msg = b""
        if variant.startswith("reads"):
            for i in range(rng.randrange(1, 40)):
                msg += hdr(w.CMD_READ, i + 1, rng.randrange(0, SIZE // 4096)
                           * 4096, 4096)
        elif variant.startswith("writes"):
            # enough to fill the 4 provided buffers of 8 KiB several times
            for i in range(rng.randrange(1, 12)):
                n = rng.choice((512, 4096, 9000, 20000))
                off = rng.randrange(0, SIZE - n)
                data = rng.randbytes(n)
                msg += hdr(w.CMD_WRITE, i + 1, off, n) + data
                written.append((off, data))
        elif variant.startswith("header-across"):
            # a write payload that ends 10 bytes short of an 8 KiB
            # boundary: DISC's header straddles two buffers
            n = 8192 - 28 - 10
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            msg += hdr(w.CMD_WRITE, 1, off, n) + data
            written.append((off, data))
        elif variant == "disc-alone+shut_rdwr":
            # the kernel's nbd client: everything answered, then DISC and
            # shutdown(SHUT_RDWR)
            for i in range(4):
                c.request(w.CMD_READ, i + 1, i * 4096, 4096)
            for i in range(4):
                c.reply_for(i + 1)
        s.sendall(msg + disc)
        if variant.endswith("shut_wr"):
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        elif variant.endswith("shut_rdwr"):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
    except Exception as e:  # noqa: BLE001
        errors.append(f"{variant}: {e!r}")


def client_split(addr, seed, errors):
    """DISC in two writes, the end right after the second."""
    rng = random.Random(seed)
    try:
        c = Conn(addr, timeout=30)
        c.handshake("disk")
        s = c.sock
        msg = b"".join(hdr(w.CMD_READ, i + 1, i * 4096, 4096)
                       for i in range(rng.randrange(0, 8)))
        msg += hdr(w.CMD_DISC, 0xD15C)
        cut = len(msg) - rng.randrange(1, 28)
        s.sendall(msg[:cut])
        time.sleep(rng.random() * 0.002)
        s.sendall(msg[cut:])
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    except Exception as e:  # noqa: BLE001
        errors.append(f"split-disc: {e!r}")


def run(mode, disable):
    d = harness.tmpdir()
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    dm = harness.daemon_uring_disabled(disable, [f"name=disk,file={img},format=raw"],
                                       tcp=True, extra=["--verbose"])
    addrs = (dm.sock, ("127.0.0.1", dm.port))
    total = 0
    for rnd in range(ROUNDS):
        errors = []
        threads = []
        for k in range(CONNS):
            addr = addrs[k % 2]
            variant = VARIANTS[(k // 2 + rnd) % len(VARIANTS)]
            seed = rnd * 1000 + k
            if variant.startswith("split-disc"):
                t = threading.Thread(target=client_split,
                                     args=(addr, seed, errors))
            else:
                # writes of a round go to distinct connections; their
                # ranges may overlap, so they are not read back here
                t = threading.Thread(target=client,
                                     args=(addr, variant, seed, errors, []))
            threads.append(t)
            t.start()
        for t in threads:
            t.join(60)
            check(not t.is_alive(), f"{mode}: a client hung")
        check(not errors, f"{mode}: client errors: {errors}")
        total += CONNS
        # every connection of the round has ended one way or the other
        # (DISC parsed, or the server gave up on it) before the next round
        # and before stratad is stopped (a drain would still parse DISC)
        deadline = time.time() + 30
        while True:
            log = dm.logtext()
            seen = set(re.findall(r"conn (\d+): transmission on export", log))
            ended = set(re.findall(
                r"conn (\d+): (?:closing \(|NBD_CMD_DISC after|client went "
                r"away|client closed)", log))
            if len(seen) >= total and seen <= ended:
                break
            check(time.time() < deadline,
                  f"{mode}: connections not ended: {sorted(seen - ended)}")
            time.sleep(0.02)
    log = dm.logtext()
    seen = set(re.findall(r"conn (\d+): transmission on export", log))
    disc = set(re.findall(r"conn (\d+): NBD_CMD_DISC after", log))
    missing = sorted(seen - disc, key=int)
    if missing:
        lines = [ln for ln in log.splitlines()
                 if any(re.search(rf"conn {m}\b", ln) for m in missing[:3])]
        print("\n".join(lines[-60:]))
    check(not missing, f"{mode}: {len(missing)} of {len(seen)} connections "
          f"ended without their NBD_CMD_DISC parsed: {missing[:20]}")
    if not disable:
        check(re.search(r"multishot receive", log),
              f"{mode}: no connection used the multishot receive")
    check(dm.stop() == 0, f"{mode}: stratad exited with an error")
    ok(f"{mode}: {len(seen)} connections, each one's NBD_CMD_DISC parsed "
       "before its end")


run("multishot", None)
run("one recv at a time", "all")
harness.finish_soft_checks()
