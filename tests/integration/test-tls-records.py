#!/usr/bin/python3
"""TLS record boundaries against NBD message boundaries: a raw TLS client
(Python's ssl over memory BIOs) chooses how its plaintext is cut into
records and how the ciphertext is cut into socket writes, so stratad's
stream sees what real clients produce only by chance:

- a request header split across two records, a write payload split across
  records of 1, 7, 4000 bytes and full ones, the next request's header in
  the same record as the end of a payload;
- records split across the server's recvs (the ciphertext dribbled in
  pieces of 1, 2, 3, 5 bytes and odd sizes, with pauses, TCP_NODELAY);
- many requests in one record, and one write's header and payload in one
  record;
- large reads at depth: eight 1 MiB reads (and odd-sized ones) pipelined,
  their replies sealed while the client still sends.

Every write is checked by reading it back over TLS and, after the client's
close_notify, in the file itself; stratad must keep serving throughout.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-tls-records.py
"""
import os
import random
import select
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need, ok  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402
import tlscerts  # noqa: E402

need("certtool")
harness.require_built()
harness.report_unexpected_exceptions()
MiB = 1 << 20
SIZE = 16 * MiB
certs = tlscerts.Certs()
d = harness.tmpdir()
rng = random.Random(int(os.environ.get("STRATA_SEED", "20261203")))
initial = rng.randbytes(SIZE)
path = os.path.join(d, "disk.img")
with open(path, "wb") as f:
    f.write(initial)
model = bytearray(initial)

srv = harness.Daemon(
    [f"name=disk,file={path},format=raw,cache=writeback"], tcp=True,
    extra=["--tls=require", "--tls-certificates", certs.server,
           "--tls-verify-peer", "-v"])


class SplitTLS:
    """A TLS client session whose record and segment boundaries the test
    sets: what sendall() gets is cut into records at `cuts` (plaintext
    sizes, cycled; 0: OpenSSL's own full records) and the ciphertext into
    socket writes of `wire` bytes (cycled; 0: one write), each followed by
    `pause` seconds.  Stands in for Conn.sock (sendall, recv, settimeout)."""

    def __init__(self, sock, who="alice"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(os.path.join(certs.path(who), "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(certs.path(who), "client-cert.pem"),
                            os.path.join(certs.path(who), "client-key.pem"))
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        self.cuts, self.wire, self.pause = [0], [0], 0.0
        self.timeout = 30.0
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def settimeout(self, t):
        self.timeout = t

    def _flush(self, wire=(0,), pause=0.0):
        data = self.out.read()
        self.records = []       # the ciphertext lengths of what goes out
        p = 0
        while p + 5 <= len(data):
            n = int.from_bytes(data[p + 3:p + 5], "big")
            self.records.append(n)
            p += 5 + n
        i = 0
        while data:
            n = wire[i % len(wire)] or len(data)
            self.sock.sendall(data[:n])
            data = data[n:]
            i += 1
            if data and pause:
                time.sleep(pause)

    def _fill(self):
        r, _, _ = select.select([self.sock], [], [], self.timeout)
        if not r:
            raise socket.timeout("no TLS data from the server")
        data = self.sock.recv(1 << 20)
        if not data:
            self.inc.write_eof()
        else:
            self.inc.write(data)

    def seal(self, data):
        """Cuts data into records as self.cuts says; the ciphertext stays
        in the output BIO until send_sealed()."""
        i = 0
        while data:
            n = self.cuts[i % len(self.cuts)] or len(data)
            self.obj.write(data[:n])
            data = data[n:]
            i += 1

    def send_sealed(self):
        self._flush(self.wire, self.pause)

    def sendall(self, data):
        self.seal(data)
        self.send_sealed()

    def recv(self, n):
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLZeroReturnError:
                return b""

    def close_notify(self):
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()


def connect():
    c = Conn(("127.0.0.1", srv.port), timeout=30)
    c.start()
    reps = c.option(w.OPT_STARTTLS)
    check(reps == [(w.REP_ACK, b"")], f"STARTTLS: {reps}")
    t = SplitTLS(c.sock)
    raw = c.sock
    c.sock = t
    c.go("disk")
    check(c.export_size == SIZE, f"export size {c.export_size}")
    return c, t, raw


def verify(c, what, cookie=1000):
    """Reads the whole export back over TLS, 1 MiB at a time, eight
    requests in flight."""
    for base in range(0, SIZE, 8 * MiB):
        for k in range(8):
            c.request(w.CMD_READ, cookie + k, base + k * MiB, MiB)
        for k in range(8):
            data, err = c.read_data(c.reply_for(cookie + k), base + k * MiB, MiB)
            off = base + k * MiB
            check(err == 0 and data == bytes(model[off:off + MiB]),
                  f"{what}: data at {off} differs (error {err}, first diff "
                  f"{harness.first_diff(data or b'', model[off:off + MiB])})")


def write(c, cookie, off, data):
    """A write request's bytes (header and payload), model updated."""
    model[off:off + len(data)] = data
    return c.header(w.CMD_WRITE, cookie, off, len(data)) + data


def check_replies(c, cookies, what):
    for ck in cookies:
        reps = c.reply_for(ck)
        check(all(not r.is_error for r in reps), f"{what}: cookie {ck}: {reps}")


c, t, raw = connect()

# 1. A header split across two records; the payload across records of
# 1, 7 and 4000 bytes and full ones; the last record of the payload also
# carries the first 10 bytes of the next header.
d1 = rng.randbytes(128 * 1024 + 512)
d2 = rng.randbytes(4096)
m = write(c, 1, MiB + 512, d1) + write(c, 2, 3 * MiB, d2)
first = len(m) - 28 - 4096
t.cuts = [10, 18 + 1, 7, 4000, 16384, 16384, 16384, 16384,
          first - 10 - 19 - 7 - 4000 - 4 * 16384 + 10, 0]
t.sendall(m)
# TLS 1.3 adds 17 bytes to each record (content type, 16-byte tag)
plain = [n - 17 for n in t.records]
check(plain[:5] == [10, 19, 7, 4000, 16384] and len(plain) == 13 and
      sum(plain) == len(m), f"records as cut: {plain}")
check_replies(c, [1, 2], "split header and payload")
t.cuts = [0]
data, err = c.read(3, MiB + 512, len(d1))
check(err == 0 and data == d1, "split header and payload: read back")
ok("a header across two records, a payload across records of 1, 7, 4000 "
   "and 16384 bytes, the next header sharing the payload's last record")

# 2. Records split across recvs: a 1 MiB write and a 4 KiB one sealed in
# full records, the ciphertext dribbled in tiny and odd pieces.
d3 = rng.randbytes(MiB)
d4 = rng.randbytes(4096)
t.cuts = [0]
t.wire = [1, 2, 3, 5, 4096, 17000, 100, 33333, 1, 16411, 16412, 16413]
t.pause = 0.002
t.sendall(write(c, 4, 5 * MiB, d3) + write(c, 5, 7 * MiB + 4096, d4))
check_replies(c, [4, 5], "dribbled ciphertext")
t.wire, t.pause = [0], 0.0
data, err = c.read(6, 5 * MiB, MiB)
check(err == 0 and data == d3, "dribbled ciphertext: 1 MiB read back")
ok("records split across recvs (ciphertext in pieces of 1, 2, 3, 5 bytes "
   "and odd sizes, 2 ms apart): a 1 MiB and a 4 KiB write landed")

# 3. Seventeen flushes, then thirteen writes and a flush (about 56 KiB)
# handed to one SSL write: OpenSSL cuts it into 16 KiB records, so a
# record holds many whole requests, the first cut falls 8 bytes into the
# second write's header and the others inside payloads.
ms, cookies = b"", []
for k in range(17):
    ms += c.header(w.CMD_FLUSH, 100 + k)
    cookies.append(100 + k)
ms += write(c, 9, 8 * MiB - 15872, rng.randbytes(15872))
cookies.append(9)
cut_in_header = len(ms)          # 16376: this header spans byte 16384
for k in range(12):
    dk = rng.randbytes(512 * (k + 1))
    ms += write(c, 10 + k, 8 * MiB + k * 65536, dk)
    cookies.append(10 + k)
ms += c.header(w.CMD_FLUSH, 30)
cookies.append(30)
check(cut_in_header < 16384 < cut_in_header + 28, "case 3 layout")
t.cuts = [len(ms)]              # OpenSSL still cuts at 16 KiB
t.sendall(ms)
plain = [n - 17 for n in t.records]
check(len(plain) == 4 and plain[0] == 16384, f"records as cut: {plain}")
check_replies(c, cookies, "many requests per record")
t.cuts = [0]
ok("seventeen flushes and thirteen writes sealed together: many requests "
   "per record, a header and payloads straddling records")

# 4. Large reads at depth: eight 1 MiB reads and odd-sized ones sent in
# one batch, then writes to other regions pipelined behind them before
# any reply is read: replies are sealed while requests still arrive.
reads = [(40 + k, k * MiB, MiB) for k in range(8)]
reads += [(48, 9 * MiB + 512, MiB - 1024), (49, 10 * MiB + 4096, 12288 + 512),
          (50, 11 * MiB, 2 * MiB)]
batch = b""
for ck, off, n in reads:
    c.read_lengths[ck] = n
    batch += c.header(w.CMD_READ, ck, off, n)
expect = {ck: bytes(model[off:off + n]) for ck, off, n in reads}
wr = []
for k in range(6):
    dk = rng.randbytes(MiB // 2)
    batch += write(c, 60 + k, 13 * MiB + k * (MiB // 2), dk)
    wr.append(60 + k)
t.cuts = [0]
t.wire = [65536 + 7]
t.sendall(batch)
t.wire = [0]
for ck, off, n in reads:
    data, err = c.read_data(c.reply_for(ck), off, n)
    check(err == 0 and data == expect[ck],
          f"read at depth, cookie {ck} ({n} bytes at {off}): error {err}")
check_replies(c, wr, "writes behind reads")
ok(f"{len(reads)} reads (eight of 1 MiB, one of 2 MiB) at depth with six "
   "512 KiB writes pipelined behind them")

verify(c, "after the record games")
ok("the whole export read back over TLS matches the model")
still = srv.alive()
check(still, "stratad died:\n" + srv.logtext()[-3000:])

# A close_notify ends the session; the file holds every write.
c.request(w.CMD_DISC, 99)
t.close_notify()
raw.settimeout(10)
try:
    while raw.recv(65536):
        pass                    # the server's close_notify, then EOF
except ConnectionResetError:
    pass
raw.close()
with open(path, "rb") as f:
    ondisk = f.read()
check(ondisk == bytes(model),
      f"the file differs from the model at {harness.first_diff(ondisk, model)}")
ok("after DISC and close_notify the file holds every write")

# A second session on the same daemon, with the default record layout.
c2, t2, raw2 = connect()
verify(c2, "a second session")
c2.request(w.CMD_DISC, 1)
t2.close_notify()
raw2.close()
ok("a new TLS session reads everything back")

check(srv.stop() == 0, "stratad exit status after SIGTERM")
ok("stratad stopped cleanly")
print("PASS")
