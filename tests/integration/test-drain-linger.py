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
TLS connection closes at once)."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
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



if __name__ == "__main__":
    main()
