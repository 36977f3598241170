#!/usr/bin/env python3
"""strata: a client slow to read its replies while the daemon stops.

8 writes are done (their data is in the file) and answered, the libnbd
client reads none of the replies, SIGTERM, and only after the daemon has
drained (quiet for DRAIN_QUIET_MS) does the client send one more write and
then read.  libnbd fails every command in flight with ENOTCONN when a send
fails, also those whose replies it has not read yet; so the daemon, done
draining, half-closes (FIN) and keeps reading and dropping input until the
client closes (or DRAIN_LINGER_MS passes) instead of closing at once.
Expected: all 8 writes reported done, exit status 0.  Plaintext only (a
TLS connection closes at once).

Second case: a write refused while draining is answered (NBD_ESHUTDOWN)
only once its whole payload has been read."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import nbdwire as w  # noqa: E402
from harness import check, ok  # noqa: E402

harness.nbd_handle()
import nbd  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
DRAIN_QUIET_S = 0.25   # the daemon's DRAIN_QUIET_MS (daemon/nbd/conn.h)


def main():
    d = harness.tmpdir()
    path = harness.make_file(os.path.join(d, "slow.img"), 4 * MiB)
    daemon = harness.Daemon([f"name=slow,file={path},format=raw"])
    h = nbd.NBD()
    h.connect_uri(daemon.uri("slow"))
    data = [bytes([i + 1]) * (4 * KiB) for i in range(8)]
    bufs = [nbd.Buffer.from_bytearray(bytearray(b)) for b in data]
    cookies = [h.aio_pwrite(bufs[i], i * 4 * KiB) for i in range(8)]
    deadline = time.time() + 30
    while True:
        with open(path, "rb") as f:
            f.seek(7 * 4 * KiB)
            if f.read(4 * KiB) == data[7]:
                break
        check(time.time() < deadline, "slow reader: the writes did not reach the file")
        time.sleep(0.05)
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(4 * DRAIN_QUIET_S)       # the daemon's drain ends meanwhile
    try:
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4096)), 1 * MiB)
    except nbd.Error:
        pass                            # refused at once: nothing in flight lost
    res = {}
    deadline = time.time() + 30
    while len(res) < 8 and time.time() < deadline:
        try:
            h.poll(200)
        except nbd.Error:
            pass
        for i, c in enumerate(cookies):
            if i not in res:
                try:
                    if h.aio_command_completed(c):
                        res[i] = 0
                except nbd.Error as e:
                    res[i] = e.errnum
        if not h.aio_is_ready() and not h.aio_is_processing():
            break
    del h
    rc = daemon.proc.wait(30)
    check(rc == 0, f"slow reader: exit status {rc}")
    check(len(res) == 8 and all(v == 0 for v in res.values()),
          f"slow reader: the 8 writes done before SIGTERM were reported as "
          f"{res} (errno; missing = no reply), not all done")
    ok("slow reader at shutdown: a client that reads its replies after the "
       "drain and sends once more still gets all 8 (the daemon half-closes)")
    half_sent_write(d)


def half_sent_write(d):
    """A write whose header arrives while the daemon drains (after SIGTERM)
    and whose payload comes in two parts: the daemon answers it with
    NBD_ESHUTDOWN only after reading the rest, never while the client is
    still sending it (libnbd would see a cookie it has not filed yet and
    hang up, failing its other requests).  The header must arrive within
    DRAIN_QUIET_MS of the signal; a round where this host was too slow for
    that (the daemon already half-closed) is repeated, up to 3 times."""
    for rnd in range(3):
        path = harness.make_file(os.path.join(d, f"half{rnd}.img"), 4 * MiB)
        daemon = harness.Daemon([f"name=half,file={path},format=raw"])
        c = w.Conn(daemon.sock)
        c.handshake("half", structured=True)
        payload = b"\x66" * (256 * KiB)
        cookie = 0x4841_4c46
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while "shutting down" not in daemon.logtext():
            check(time.time() < deadline, "SIGTERM: no 'shutting down' in the log within 10 s")
            time.sleep(0.005)
        try:
            c.send(c.header(w.CMD_WRITE, cookie, 0, len(payload)) + payload[:64 * KiB])
            early = c.pending(2 * DRAIN_QUIET_S)
        except (w.Closed, OSError):
            c.close()
            daemon.proc.wait(30)
            print(f"note: round {rnd}: the header came after the drain ended; again")
            continue
        check(early == b"", f"write sent while draining: {len(early)} bytes came back "
              f"before the client had sent the whole payload (expected: nothing yet)")
        c.send(payload[64 * KiB:])
        reps = c.reply_for(cookie)
        errs = [r.error for r in reps if r.is_error]
        with open(path, "rb") as f:
            written = f.read(len(payload)) == payload
        check(errs == [w.ESHUTDOWN] and not written,
              f"write sent while draining: replies {reps}, data in the file: {written}; "
              f"expected NBD_ESHUTDOWN and nothing written")
        c.disc()
        c.close()
        rc = daemon.proc.wait(30)
        check(rc == 0, f"write sent while draining: exit status {rc}")
        ok("write sent while draining, payload in two parts: NBD_ESHUTDOWN after the "
           "whole payload, nothing written, exit 0")
        return
    print("note: the write-while-draining case did not run: this host was slower than "
          "DRAIN_QUIET_MS three times")


if __name__ == "__main__":
    main()
