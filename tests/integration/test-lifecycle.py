#!/usr/bin/python3
"""stratad lifecycle: many clients, clients that vanish, signals, limits, --fork.

 1. 32 concurrent clients (threads, one libnbd handle each, half over unix,
    half over TCP), each writing and reading back its own region.  The
    daemon, which serves a local file only, has not loaded librbd.
 2. Clients vanishing mid-request over TCP (hand-rolled NBD handshake):
    a 16 MiB write whose payload stops halfway before the socket closes, and
    a 16 MiB read whose reply is never read before the socket is reset.
    Meanwhile other clients keep working; afterwards the daemon is alive and
    a fresh client works.
 3. SIGTERM while 8 clients write with FUA in a loop: exit 0 (30 s bound a hang);
    every write acknowledged to a client is in the file afterwards (a write
    that was in flight but never acknowledged may or may not be).
 4. The same with SIGINT.
 5. --max-connections 2: a third client is refused (closed or error during
    the handshake, within 10 s) while the first two keep working; once one
    of them leaves, a new client gets in.
 6. --fork --pid-file: the command returns, the pid file names a live
    daemon that serves, SIGTERM stops it.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-lifecycle.py
"""
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, fail, need  # noqa: E402

need("nbdinfo")
harness.nbd_handle()
import nbd  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
T0 = time.time()


def ok(msg):
    print(f"ok: [{time.time() - T0:5.1f}s] {msg}", flush=True)


def read_file(path, off=0, n=None):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read() if n is None else f.read(n)


def run_threads(fns, timeout):
    """Runs each fn in a thread; returns the list of exceptions (None = ok)."""
    errs = [None] * len(fns)

    def wrap(k, fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errs[k] = e

    ts = [threading.Thread(target=wrap, args=(k, fn), daemon=True) for k, fn in enumerate(fns)]
    for t in ts:
        t.start()
    deadline = time.time() + timeout
    for t in ts:
        t.join(max(0.1, deadline - time.time()))
        if t.is_alive():
            fail(f"a client thread did not finish within {timeout}s")
    return errs


# ---------------------------------------------------------------------------
# raw NBD client (for misbehaving clients)

NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_CMD_READ, NBD_CMD_WRITE = 0, 1


def recvall(s, n):
    buf = b""
    while len(buf) < n:
        x = s.recv(n - len(buf))
        if not x:
            raise EOFError(f"server closed the connection ({len(buf)}/{n} bytes)")
        buf += x
    return buf


def raw_connect(port, name):
    """TCP connection after a fixed-newstyle handshake with NBD_OPT_GO
    (simple replies).  Returns (socket, export size)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    magic, opt, flags = struct.unpack(">QQH", recvall(s, 18))
    check(magic == 0x4e42444d41474943 and opt == 0x49484156454F5054,
          f"raw client: bad greeting {magic:#x} {opt:#x}")
    s.sendall(struct.pack(">I", 3))          # FIXED_NEWSTYLE | NO_ZEROES
    data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, NBD_OPT_GO, len(data)) + data)
    size = None
    while True:
        rmagic, ropt, rtype, rlen = struct.unpack(">QIII", recvall(s, 20))
        payload = recvall(s, rlen)
        check(rmagic == 0x3e889045565a9, f"raw client: bad option reply magic {rmagic:#x}")
        if rtype == NBD_REP_ACK:
            break
        if rtype == NBD_REP_INFO and len(payload) >= 12:
            itype, = struct.unpack(">H", payload[:2])
            if itype == 0:
                size, _ = struct.unpack(">QH", payload[2:12])
        elif rtype & (1 << 31):
            fail(f"raw client: NBD_OPT_GO refused, reply type {rtype:#x}")
    return s, size


def request(cmd, handle, off, length, flags=0):
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, handle, off, length)


# ---------------------------------------------------------------------------

def test_many_clients(d):
    n_clients = 32
    region = 2 * MiB
    path = harness.make_file(os.path.join(d, "many.img"), n_clients * region)
    daemon = harness.Daemon([f"name=many,file={path},format=raw"], tcp=True)
    barrier = threading.Barrier(n_clients, timeout=30)
    counts = [0] * n_clients

    def client(k):
        rnd = random.Random(1000 + k)
        h = nbd.NBD()
        h.set_handle_name(f"client{k}")
        h.connect_uri(daemon.uri("many", tcp=(k % 2 == 1)))
        barrier.wait()                # all 32 connected at the same time
        base = k * region
        model = bytearray(region)
        for _ in range(40):
            n = rnd.choice([512, 4 * KiB, 64 * KiB, 256 * KiB, 1000, 12345])
            off = rnd.randrange(0, region - n + 1)
            data = rnd.randbytes(n)
            h.pwrite(data, base + off, nbd.CMD_FLAG_FUA if rnd.random() < 0.25 else 0)
            model[off:off + n] = data
            got = h.pread(n, base + off)
            if got != data:
                raise AssertionError(f"client {k}: read back of {n} bytes at {base + off} differs")
            counts[k] += 1
        h.flush()
        whole = h.pread(region, base)
        if whole != model:
            raise AssertionError(f"client {k}: its region differs from what it wrote")
        h.shutdown()

    errs = run_threads([lambda k=k: client(k) for k in range(n_clients)], 90)
    bad = [(k, e) for k, e in enumerate(errs) if e is not None]
    check(not bad, f"32 concurrent clients: expected all to succeed, {len(bad)} failed: "
                   f"{[(k, repr(e)) for k, e in bad[:5]]}\n" + daemon.logtext()[-2000:])
    check(daemon.alive(), "stratad died with 32 clients:\n" + daemon.logtext()[-2000:])
    ok(f"32 concurrent clients (16 unix, 16 tcp), {sum(counts)} verified write+read pairs")
    # librbd costs ~18 MiB of RSS: a daemon with no rbd: export must not load it
    libs = harness.mapped_ceph_libs(daemon.proc.pid)
    check(not libs, f"stratad serving only a local file has Ceph libraries mapped: {libs} "
                    f"(expected them loaded only when an rbd: export opens)")
    ok("no librbd/librados mapped in a daemon without rbd: exports")
    rc = daemon.stop()
    check(rc == 0, f"after the 32-client test: SIGTERM exit status expected 0, got {rc}")


def test_vanishing_client(d):
    size = 64 * MiB
    path = harness.make_file(os.path.join(d, "vanish.img"), size)
    daemon = harness.Daemon([f"name=vanish,file={path},format=raw"], tcp=True)
    stop = threading.Event()
    done = [0, 0]

    def bystander(k):
        # keeps working on [48M + k*4M, +4M) all along
        rnd = random.Random(k)
        h = nbd.NBD()
        h.connect_uri(daemon.uri("vanish", tcp=True))
        base = 48 * MiB + k * 4 * MiB
        while not stop.is_set():
            data = rnd.randbytes(64 * KiB)
            off = base + rnd.randrange(0, 4 * MiB - 64 * KiB + 1)
            h.pwrite(data, off)
            if h.pread(len(data), off) != data:
                raise AssertionError(f"bystander {k}: read back differs at {off}")
            done[k] += 1
        h.shutdown()

    by = [threading.Thread(target=lambda k=k: errs.__setitem__(k, _catch(bystander, k)),
                           daemon=True) for k in range(2)]
    errs = [None, None]
    for t in by:
        t.start()

    # (a) a 16 MiB write whose payload stops halfway; FIN-close
    s, esize = raw_connect(daemon.port, "vanish")
    check(esize == size, f"raw client: export size expected {size}, got {esize}")
    s.sendall(request(NBD_CMD_WRITE, 1, 0, 16 * MiB))
    s.sendall(random.Random(7).randbytes(8 * MiB))
    time.sleep(0.3)
    s.close()
    ok("client closed its TCP socket halfway through a 16 MiB write")

    # (b) same, but the socket is reset (RST) instead of closed
    s, _ = raw_connect(daemon.port, "vanish")
    s.sendall(request(NBD_CMD_WRITE, 2, 16 * MiB, 16 * MiB))
    s.sendall(bytes(8 * MiB))
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    ok("client reset its TCP socket halfway through a 16 MiB write")

    # (c) a 16 MiB read whose reply the client never reads (server hits EPIPE)
    for k in range(3):
        s, _ = raw_connect(daemon.port, "vanish")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(request(NBD_CMD_READ, 3, 0, 16 * MiB))
        s.sendall(request(NBD_CMD_READ, 4, 16 * MiB, 16 * MiB))
        time.sleep(0.2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    ok("client reset its socket while the server was sending 2 x 16 MiB read replies (x3)")

    # (d) the connection drops in the middle of the option haggling
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    recvall(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, NBD_OPT_GO, 100)
              + b"\0\0")
    s.close()
    ok("client vanished in the middle of an option")

    time.sleep(0.5)
    stop.set()
    for t in by:
        t.join(30)
        check(not t.is_alive(), "a bystander client hung after another client vanished")
    check(all(e is None for e in errs),
          f"bystander clients failed while others vanished: {errs}\n" + daemon.logtext()[-2000:])
    check(daemon.alive(), "stratad died after clients vanished mid-request:\n"
          + daemon.logtext()[-2000:])
    ok(f"bystanders unaffected ({done[0]}+{done[1]} verified ops), daemon alive")

    h = nbd.NBD()
    h.connect_uri(daemon.uri("vanish", tcp=True))
    h.pwrite(b"\x5a" * 4096, 40 * MiB, nbd.CMD_FLAG_FUA)
    check(h.pread(4096, 40 * MiB) == b"\x5a" * 4096, "fresh client after vanishing clients: "
          "read back differs")
    h.shutdown()
    h = nbd.NBD()
    h.connect_uri(daemon.uri("vanish"))
    check(h.get_size() == size, "fresh unix client: wrong size")
    h.shutdown()
    ok("a fresh client (tcp and unix) works")
    rc = daemon.stop()
    check(rc == 0, f"after the vanishing-client test: SIGTERM exit status expected 0, got {rc}")


def _catch(fn, *a):
    try:
        fn(*a)
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def test_signal_under_load(d, sig):
    """8 clients, each keeping `depth` FUA writes of 64 KiB in flight to its
    own region, round-robin over 64 slots (never two writes in flight on one
    slot).  The clients behave as the NBD spec asks: after the first error
    reply they stop issuing requests, collect the remaining replies and
    disconnect (soft disconnect if the connection still works).

    Checks: exit status 0 (30 s bound a hang); every acknowledged write is in the file
    (unless a later write to the same slot, in flight at the end, replaced
    it); and no write was carried out without its reply reaching the client
    (its data in the file while the client saw the connection drop instead
    of a reply), since the daemon is to finish in-flight requests: the spec
    says a server shutting down SHOULD let in-flight requests complete,
    answer later ones with NBD_ESHUTDOWN, and the client then disconnects."""
    n_clients = 8
    wsize = 64 * KiB
    region = 4 * MiB
    slots = region // wsize
    depth = 4
    path = harness.make_file(os.path.join(d, f"sig{int(sig)}.img"), n_clients * region)
    daemon = harness.Daemon([f"name=load,file={path},format=raw,cache=writeback"])
    # per client: slot -> (acked data or None, pending data or None)
    state = [dict() for _ in range(n_clients)]
    # per client: [(slot, data, errno)] of writes that got no success reply
    unacked = [[] for _ in range(n_clients)]
    writes = [0] * n_clients
    first_ack = threading.Barrier(n_clients + 1, timeout=30)
    quit_ = threading.Event()

    def writer(k):
        h = nbd.NBD()
        h.connect_uri(daemon.uri("load"))
        base = k * region
        seq = 0
        waited = False
        stopping = False
        inflight = {}                                     # cookie -> (slot, data, buf)

        def harvest():
            nonlocal stopping
            for cookie, (slot, data, _) in list(inflight.items()):
                try:
                    done = h.aio_command_completed(cookie)
                except nbd.Error as e:
                    del inflight[cookie]                  # failed: stays "pending"
                    unacked[k].append((slot, data, e.errnum))
                    stopping = True
                    continue
                if done:
                    del inflight[cookie]
                    state[k][slot] = (data, None)         # acknowledged
                    writes[k] += 1
        try:
            while not quit_.is_set():
                busy = {v[0] for v in inflight.values()}
                while not stopping and len(inflight) < depth and seq % slots not in busy:
                    slot = seq % slots
                    data = struct.pack(">IIQ", k, seq, 0x5354524154410000 + slot) * (wsize // 16)
                    acked, _ = state[k].get(slot, (None, None))
                    state[k][slot] = (acked, data)        # in flight
                    buf = nbd.Buffer.from_bytearray(data)
                    try:
                        cookie = h.aio_pwrite(buf, base + slot * wsize, flags=nbd.CMD_FLAG_FUA)
                    except nbd.Error:
                        state[k][slot] = (acked, None)    # never sent
                        stopping = True
                        break
                    inflight[cookie] = (slot, data, buf)
                    busy.add(slot)
                    seq += 1
                if not inflight:
                    break                                 # stopping, all collected
                h.poll(1000)
                harvest()
                if not waited and writes[k] >= 8:
                    waited = True
                    first_ack.wait()
        except nbd.Error:
            harvest()                                     # connection gone
            for slot, data, _ in inflight.values():
                unacked[k].append((slot, data, None))
        finally:
            if not waited:
                first_ack.abort()
            try:
                if h.aio_is_ready():
                    h.shutdown()                          # soft disconnect
            except nbd.Error:
                pass

    ts = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(n_clients)]
    for t in ts:
        t.start()
    try:
        first_ack.wait()
    except threading.BrokenBarrierError:
        fail(f"{sig.name} test: not every client got 8 writes acknowledged before the signal\n"
             + daemon.logtext()[-2000:])
    time.sleep(0.5)                                       # let the load run
    before = sum(writes)
    t_sig = time.time()
    daemon.proc.send_signal(sig)
    try:
        rc = daemon.proc.wait(30)
    except subprocess.TimeoutExpired:
        fail(f"{sig.name} with 8 clients writing: stratad did not exit within 30 s\n"
             + daemon.logtext()[-2000:])
    took = time.time() - t_sig
    check(rc == 0, f"{sig.name} with 8 clients writing: expected exit 0, got {rc}\n"
          + daemon.logtext()[-2000:])
    deadline = time.time() + 20
    for t in ts:
        t.join(max(0.1, deadline - time.time()))
    quit_.set()
    check(not any(t.is_alive() for t in ts),
          f"{sig.name}: a client still had an open, working connection 20 s after the "
          f"daemon exited")
    data = read_file(path)
    lost, pending_seen = 0, 0
    first_bad = None
    for k in range(n_clients):
        for slot, (acked, pending) in state[k].items():
            off = k * region + slot * wsize
            cur = data[off:off + wsize]
            if cur == acked:
                continue
            if pending is not None and cur == pending:
                pending_seen += 1
                continue
            if acked is None and pending is not None and cur == bytes(wsize):
                continue
            lost += 1
            if first_bad is None:
                first_bad = (k, slot, off)
    check(lost == 0, f"{sig.name}: {lost} acknowledged writes are not on disk after exit "
                     f"(first: client {first_bad[0]} slot {first_bad[1]} offset {first_bad[2]})"
          if first_bad else "")
    errnos = {}
    silent = []
    for k in range(n_clients):
        for slot, wdata, err in unacked[k]:
            name = {None: "connection lost"}.get(err) or os.strerror(err)
            errnos[name] = errnos.get(name, 0) + 1
            off = k * region + slot * wsize
            if err != 108 and data[off:off + wsize] == wdata:     # 108 = ESHUTDOWN
                silent.append((k, slot, off, name))
    ok(f"{sig.name} under load: exit 0 after {took:.2f}s; {sum(writes)} FUA 64k writes acked "
       f"({before} before the signal), all on disk; unacknowledged: {errnos or 'none'}")
    check(not silent,
          f"{sig.name}: {len(silent)} in-flight writes were carried out (their data is in the "
          f"file) but the client never got their reply, the connection dropped instead "
          f"(first: client {silent[0][0]} offset {silent[0][2]}: {silent[0][3]}). Expected: "
          f"in-flight requests are finished AND answered before the connection closes; "
          f"later requests get NBD_ESHUTDOWN (the daemon must keep reading the socket "
          f"while draining)" if silent else "")


def test_max_connections(d):
    path = harness.make_file(os.path.join(d, "max.img"), 4 * MiB, b"\x42")
    daemon = harness.Daemon([f"name=max,file={path},format=raw"],
                            extra=("--max-connections", "2"))
    uri = daemon.uri("max")
    h1 = nbd.NBD()
    h1.connect_uri(uri)
    h2 = nbd.NBD()
    h2.connect_uri(uri)
    check(h1.pread(512, 0) == b"\x42" * 512 and h2.pread(512, 4096) == b"\x42" * 512,
          "--max-connections 2: the first two clients cannot read")
    try:
        p = subprocess.run(["nbdinfo", "--size", uri], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        fail("--max-connections 2: a third client was neither served nor refused within "
             "10 s (it hangs); expected the connection closed or an error in the handshake")
    check(p.returncode != 0,
          f"--max-connections 2: a third client was served (nbdinfo --size said "
          f"{p.stdout.strip()}); expected it to be refused")
    ok(f"--max-connections 2: third client refused ({p.stderr.strip().splitlines()[-1][:90]})")
    check(h1.pread(512, 8192) == b"\x42" * 512 and h2.pread(512, 0) == b"\x42" * 512,
          "--max-connections 2: the first two clients stopped working after the refusal")
    h1.pwrite(b"\x43" * 512, 0)
    check(h2.pread(512, 0) == b"\x43" * 512, "--max-connections 2: client 2 does not see "
          "client 1's write")
    ok("--max-connections 2: the first two clients keep working")
    h1.shutdown()
    del h1
    deadline = time.time() + 30             # bounds a hang: the slot frees at once
    while True:
        p = subprocess.run(["nbdinfo", "--size", uri], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=10)
        if p.returncode == 0 or time.time() > deadline:
            break
        time.sleep(0.1)
    check(p.returncode == 0 and p.stdout.strip() == str(4 * MiB),
          f"--max-connections 2: after one of two clients left, a new client should get in; "
          f"nbdinfo exit {p.returncode}: {p.stderr.strip()}")
    ok("--max-connections 2: a slot freed by a leaving client is reused")
    h2.shutdown()
    rc = daemon.stop()
    check(rc == 0, f"--max-connections test: SIGTERM exit status expected 0, got {rc}")


def test_fork(d):
    path = harness.make_file(os.path.join(d, "fork.img"), MiB, b"\x17")
    sock = os.path.join(d, "fork.sock")
    pidfile = os.path.join(d, "fork.pid")
    args = [harness.STRATAD, "--fork", "--pid-file", pidfile, "--listen", "unix:" + sock,
            "--export", f"name=fork,file={path},format=raw"]
    # stdout and stderr are pipes, as in `out=$(stratad --fork ...)` or a
    # supervisor capturing output: the command has returned only once the
    # parent exited AND the daemon let go of the caller's stdout/stderr.
    later = []
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        fail(f"--fork: the command did not return within 10 s: {' '.join(args)}")
    try:
        out, err = p.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        later.append("--fork: the parent exited but the daemon keeps the caller's stdout/"
                     "stderr open, so `out=$(stratad --fork ...)` or a supervisor reading "
                     "its output waits until the daemon exits (expected: the forked daemon "
                     "detaches from the caller's stdio once serving, like qemu-nbd --fork)")
        print("problem:", later[-1], flush=True)
        out = err = b""
    check(p.returncode == 0, f"--fork: expected the command to exit 0, got {p.returncode}: "
          + (out + err).decode(errors="replace"))
    check(os.path.exists(pidfile), "--fork: when the command returned, the pid file "
          f"{pidfile} did not exist (the parent must return only once the daemon is ready)")
    pid = int(read_file(pidfile).split()[0])

    def kill_leftover():
        try:
            if b"stratad" in read_file(f"/proc/{pid}/cmdline"):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    import atexit
    atexit.register(kill_leftover)
    check(pid != os.getpid() and os.path.exists(f"/proc/{pid}"),
          f"--fork: pid file names {pid}, which is not a live process")
    comm = read_file(f"/proc/{pid}/cmdline").split(b"\0")
    ok(f"--fork returned 0; pid file names live pid {pid} ({os.path.basename(comm[0].decode())})")
    r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///fork?socket={sock}"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=10)
    check(r.returncode == 0 and r.stdout.strip() == str(MiB),
          f"--fork: the forked daemon does not serve right after the command returned: "
          f"nbdinfo exit {r.returncode} {r.stdout.strip()} {r.stderr.strip()}")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///fork?socket={sock}")
    check(h.pread(4096, 0) == b"\x17" * 4096, "--fork: wrong data read from the forked daemon")
    h.shutdown()
    ok("--fork: the forked daemon serves")
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 10
    while True:
        try:
            # after ')' of comm: state; a zombie has exited (its new parent
            # may take a while to reap it)
            st = read_file(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[0]
        except OSError:
            break
        if st in (b"Z", b"X"):
            break
        if time.time() > deadline:
            fail(f"--fork: the forked daemon (pid {pid}) did not stop within 10 s of SIGTERM")
        time.sleep(0.05)
    ok("--fork: SIGTERM stops the forked daemon"
       + ("" if not os.path.exists(pidfile) else " (note: it left its pid file behind)"))
    if later:
        fail(later[0])


def main():
    d = harness.tmpdir()
    failed = []
    # each part runs even when an earlier one failed; harness.fail() inside a
    # part prints "FAIL: ..." and raises SystemExit, caught here
    for name, fn in (("many clients", lambda: test_many_clients(d)),
                     ("vanishing clients", lambda: test_vanishing_client(d)),
                     ("SIGTERM under load", lambda: test_signal_under_load(d, signal.SIGTERM)),
                     ("SIGINT under load", lambda: test_signal_under_load(d, signal.SIGINT)),
                     ("max-connections", lambda: test_max_connections(d)),
                     ("fork", lambda: test_fork(d))):
        try:
            fn()
        except SystemExit as e:
            if e.code not in (0, None):
                failed.append(name)
    if failed:
        print(f"FAIL: {len(failed)} part(s) failed: {', '.join(failed)}")
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
