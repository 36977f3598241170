#!/usr/bin/python3
"""The server-wide payload memory budget (--max-memory).

Eight greedy clients each queue 32 MiB reads and never read the replies.
Each connection alone may hold 64 MiB of payload, so without a global
bound they would pin about 512 MiB; with --max-memory 64M the daemon's
resident memory must stay within the budget (plus the small per-client
grant and a fixed slack), an honest client's small read must still be
served while the greedy ones hold everything, no request may fail for
lack of memory, and once the greedy clients go the memory serves large
requests again.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-memory-budget.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, check  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
BUDGET = 64 * MiB
GRANT = 256 * KiB          # NBD_BUDGET_MIN_GRANT
SLACK = 32 * MiB           # receive buffers, slot arrays, allocator
GREEDY = 8
READS = 4
LEN = 32 * MiB

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok

d = harness.tmpdir()
img = os.path.join(d, "disk.img")
size = 64 * MiB
pattern = bytes((i * 7 + 3) & 0xff for i in range(MiB))
with open(img, "wb") as f:
    for _ in range(size // MiB):
        f.write(pattern)

daemon = Daemon([f"name=disk,file={img},format=raw"],
                extra=["--max-memory", "64M", "-v"])
pid = daemon.proc.pid


def expected(off, length):
    out = bytearray()
    while len(out) < length:
        o = (off + len(out)) % MiB
        out += pattern[o:o + min(MiB - o, length - len(out))]
    return bytes(out)


# warm up: the loop, the coroutine pool and the chain are in memory
honest = Conn(daemon.sock)
honest.handshake("disk")
check(honest.read(1, 0, 4096) == (expected(0, 4096), 0), "warm-up read failed")
time.sleep(0.3)
base = harness.rss_kib(pid) * KiB
ok(f"baseline RSS {base / MiB:.1f} MiB")

greedy = []
for i in range(GREEDY):
    c = Conn(daemon.sock, timeout=30)
    c.handshake("disk")
    for k in range(READS):
        c.request(w.CMD_READ, 100 + k, offset=(k % 2) * LEN, length=LEN)
    greedy.append(c)

# Let the daemon take what it will: until its RSS stops growing.
peak = 0
last_growth = time.time()
deadline = time.time() + 30
while time.time() < deadline and time.time() - last_growth < 2.0:
    r = harness.rss_kib(pid) * KiB
    if r > peak + MiB:
        last_growth = time.time()
    peak = max(peak, r)
    time.sleep(0.1)
grown = peak - base
bound = BUDGET + (GREEDY + 1) * GRANT + SLACK
check(grown <= bound,
      f"RSS grew by {grown / MiB:.1f} MiB with {GREEDY} greedy clients: "
      f"more than the budget allows ({bound / MiB:.1f} MiB)")
# the greedy clients did take memory: the bound was what held them back
check(grown >= BUDGET // 2,
      f"RSS grew by only {grown / MiB:.1f} MiB: the greedy clients did not "
      f"pin payload memory, so this run proves nothing")
ok(f"{GREEDY} greedy clients x {READS} x 32 MiB reads unread: RSS +"
   f"{grown / MiB:.1f} MiB (bound {bound / MiB:.1f} MiB)")

# An honest client with nothing in flight still gets a small read.
check(honest.read(2, 12345 * 512, 64 * KiB) == (expected(12345 * 512, 64 * KiB), 0),
      "honest 64 KiB read failed or returned wrong data")
ok("an honest client's 64 KiB read is served while the budget is spent")

# The other greedy clients go; the first one finally reads its replies:
# every one succeeds (waiting for memory never fails a request), the
# ones that waited for memory included.
for c in greedy[1:]:
    c.close()
g = greedy[0]
for k in range(READS):
    data, err = g.read_data(g.reply_for(100 + k), (k % 2) * LEN, LEN)
    check(err == 0, f"greedy client 0, read {k}: error {err}")
    check(data == expected((k % 2) * LEN, LEN),
          f"greedy client 0, read {k}: wrong data")
g.disc()
ok("once the others left, a greedy client that reads gets all its replies, "
   "none failed")
time.sleep(0.5)
# A large request fits again once the memory is back.
c = Conn(daemon.sock, timeout=30)
c.handshake("disk")
check(c.read(3, 8 * MiB, 16 * MiB) == (expected(8 * MiB, 16 * MiB), 0),
      "16 MiB read after the greedy clients left failed or was wrong")
c.disc()
honest.disc()
ok("after the greedy clients left, a 16 MiB read is served")
check(daemon.stop() == 0, "stratad did not exit cleanly")
print("PASS")
