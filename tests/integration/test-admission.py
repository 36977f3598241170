#!/usr/bin/python3
"""Fair admission: per-peer limits and handshakes finished before new ones.

Clients that connect and never finish the handshake must not keep real
clients out.  Checked with raw sockets from several 127.0.0.0/8 source
addresses (each a different peer to the daemon) and over the unix socket
(where the peer is the user id):
  1. slow handshakes from one address: past --max-handshakes-per-peer the
     next ones are closed at once, and a real client from another address
     is served while the slow ones still hold their slots;
  2. --max-connections-per-peer: a peer's extra connection is closed,
     another peer still gets in;
  3. --max-handshakes: with that many handshakes in progress the daemon
     stops accepting (a new client gets no greeting) and starts again as
     soon as one of them ends;
  4. the same per-user limit on the unix socket.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-admission.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Daemon, check  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
ok = harness.ok

d = harness.tmpdir()
img = os.path.join(d, "disk.img")
harness.make_file(img, 1 << 20, pattern=b"\x5a")
daemon = Daemon([f"name=disk,file={img},format=raw"], tcp=True,
                extra=["--max-connections", "32",
                       "--max-connections-per-peer", "6",
                       "--max-handshakes", "8",
                       "--max-handshakes-per-peer", "3",
                       "--handshake-timeout", "60", "-v"])
addr = ("127.0.0.1", daemon.port)


def served(source, what):
    """A full client from source: handshake and a read."""
    c = Conn(addr, timeout=20, source=source)
    c.handshake("disk")
    data, err = c.read(1, 4096, 4096)
    check(err == 0 and data == b"\x5a" * 4096, f"{what}: read failed ({err})")
    return c


def greeted(c, wait=1.0):
    """Did the server send its greeting within wait seconds?  False when it
    closed the connection instead, None when nothing came yet."""
    try:
        data = c.pending(wait)
    except w.Closed:
        return False
    return True if data else None


# 1. slow handshakes from 127.0.0.2
slow = [Conn(addr, source="127.0.0.2") for _ in range(6)]
states = [greeted(c) for c in slow]
check(states.count(True) == 3 and states.count(False) == 3,
      f"6 slow handshakes from one address with --max-handshakes-per-peer 3: "
      f"expected 3 greeted and 3 closed, got {states}")
ok("slow handshakes past the per-peer limit are closed at once")
real = served("127.0.0.9", "a client from another address")
for c in slow[:3]:
    check(greeted(c, 0.1) is None,
          "a slow handshake was dropped before the real client was served")
ok("a real client is served while one address holds its handshake slots")
real.disc()

# 2. per-peer connection limit: six in transmission from 127.0.0.3
full = [served("127.0.0.3", f"client {i} of 127.0.0.3") for i in range(6)]
extra = Conn(addr, source="127.0.0.3")
check(greeted(extra) is False,
      "a 7th connection of one address was not closed "
      "(--max-connections-per-peer 6)")
extra.close()
other = served("127.0.0.4", "a client of another address")
ok("--max-connections-per-peer: the 7th connection of one address is "
   "closed, another address is served")
for c in full + [other]:
    c.disc()

# 3. the global handshake limit: 3 slow ones still hold; add 5 more
more = [Conn(addr, source=f"127.0.0.{5 + i // 3}") for i in range(5)]
for c in more:
    check(greeted(c) is True, "a slow handshake within the limits was refused")
waiting = Conn(addr, timeout=20, source="127.0.0.8")
check(greeted(waiting, 1.5) is None,
      "with --max-handshakes 8 in progress a new client was greeted (or "
      "closed) instead of waiting")
more[0].close()  # one handshake ends: accepting resumes
check(greeted(waiting, 10) is True,
      "after a handshake ended, the waiting client got no greeting")
waiting.send_client_flags(w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES)
waiting.no_zeroes = True
waiting.go("disk")
data, err = waiting.read(1, 0, 512)
check(err == 0 and data == b"\x5a" * 512, "the client that waited cannot read")
waiting.disc()
ok("--max-handshakes: new clients wait while 8 handshakes run and are "
   "accepted as soon as one ends")
for c in slow + more:
    c.close()
check("handshakes in progress (--max-handshakes)" in daemon.logtext(),
      "the daemon did not log that accepting paused")

# 4. the unix socket: the peer is the user
mine = []
for i in range(6):
    c = Conn(daemon.sock)
    c.handshake("disk")
    mine.append(c)
seventh = Conn(daemon.sock)
check(greeted(seventh) is False,
      "a 7th unix-socket connection of one user was not closed")
check("refusing a client from uid %d" % os.getuid() in daemon.logtext(),
      "the refusal does not name the user")
seventh.close()
for c in mine:
    c.disc()
ok("--max-connections-per-peer on the unix socket counts per user")

final = served("127.0.0.1", "a client after everything")
final.disc()
ok("the daemon still serves")
check(daemon.stop() == 0, "stratad did not exit cleanly")
print("PASS")
