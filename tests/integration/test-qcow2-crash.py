#!/usr/bin/python3
"""qcow2 crash safety: kill -9 stratad in the middle of a write workload.

Two 3-layer chains, raw base (data) <- qcow2 middle <- qcow2 top:
  "l2":       top with 4 KiB clusters over 1 GiB, so that writes spread
              over the disk keep allocating new L2 tables;
  "reftable": top with 512-byte clusters and refcount_bits=64 (a refcount
              block covers 64 clusters, one refcount table cluster 2 MiB of
              file), so the refcount table keeps growing.
Rounds alternate between the chains until ROUNDS rounds or the time budget;
every other pair of rounds runs with metadata caches of two tables, so that
tables are evicted (written back) all the time.
Each round: start stratad on the top (read-write), run a seeded workload
through libnbd with up to 8 requests in flight (writes of 1 B..64 KiB, some
over data of earlier rounds, some FUA; write zeroes with and without
NO_HOLE; trims; flushes), all byte ranges of one round disjoint, and
SIGKILL the daemon after a random number of completions plus a random
delay of up to 5 ms.  Then:
  - qemu-img check on the top exits 0 or 3 (leaked clusters are allowed
    after a crash, nothing else);
  - QEMU (qemu-nbd -r on the chain) reads every range of the round as:
      not sent:                          the old bytes;
      write acknowledged before a FLUSH that completed, or acknowledged
      with FUA:                          the new bytes;
      write zeroes, same:                zeros;
      any other write / write zeroes:    each byte old or new;
      trim:                              each byte old or zero.
The old bytes of a round are read through QEMU before it starts (so each
round builds on what the previous one left).  At the end, a fresh stratad
must read both chains exactly as QEMU does, and the rounds must have grown
the refcount table and allocated L2 tables (else the test did not test).

Seed: STRATA_SEED (default 20240923), printed; STRATA_ROUNDS (default 24).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-qcow2-crash.py
"""
import bisect
import os
import random
import signal
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import qcow2lib  # noqa: E402
import workload  # noqa: E402
from harness import check, fail, need, ok  # noqa: E402
from qcow2lib import KiB, MiB, qemu_io, run  # noqa: E402

need("qemu-img", "qemu-io", "qemu-nbd")
harness.require_built()
harness.nbd_handle()
harness.report_unexpected_exceptions()
import nbd  # noqa: E402

SEED = int(os.environ.get("STRATA_SEED", "20240923"))
ROUNDS = int(os.environ.get("STRATA_ROUNDS", "24"))
BUDGET = 150                       # seconds for the rounds
OPS_PER_ROUND = 600
GiB = 1 << 30
DEPTH = 8


class Chain:
    def __init__(self, d, name, size, cluster, top_opts, rnd):
        self.name = name
        self.size = size
        self.cluster = cluster
        self.base = os.path.join(d, name + "-base.raw")
        self.mid = os.path.join(d, name + "-mid.qcow2")
        self.top = os.path.join(d, name + "-top.qcow2")
        with open(self.base, "wb") as f:       # 32 MiB, data and holes
            f.truncate(32 * MiB)
            for _ in range(24):
                f.seek(rnd.randrange(0, 31 * MiB))
                f.write(rnd.randbytes(rnd.choice([4 * KiB, 64 * KiB, 512 * KiB])))
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(self.base),
             "-F", "raw", self.mid, str(128 * MiB)])
        qemu_io(self.mid, [f"write -P {rnd.randrange(1, 256)} {rnd.randrange(0, 120) * MiB} "
                           f"{rnd.choice([4 * KiB, 64 * KiB, 1 * MiB])}" for _ in range(20)])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", top_opts,
             "-b", os.path.basename(self.mid), "-F", "qcow2", self.top, str(size)])
        self.written = []                      # (off, len) of earlier rounds' writes
        self.leaks = 0

    def header(self):
        with open(self.top, "rb") as f:
            h = f.read(72)
        l1_size, l1_off, rt_off, rt_clusters = struct.unpack(">IQQI", h[36:60])
        with open(self.top, "rb") as f:
            f.seek(l1_off)
            l1 = f.read(l1_size * 8)
        l2_tables = sum(1 for i in range(l1_size) if l1[i * 8:i * 8 + 8] != bytes(8))
        return l2_tables, rt_clusters, rt_off


class Round:
    """One round's ops over disjoint ranges, and what became of each."""

    def __init__(self, chain, rnd):
        self.ops = []        # [kind, off, len, flags, data or None]
        taken = []           # sorted disjoint (start, end)

        def free(off, n):
            i = bisect.bisect_right(taken, (off, float("inf")))
            if i > 0 and taken[i - 1][1] > off:
                return False
            return i == len(taken) or taken[i][0] >= off + n

        while len(self.ops) < OPS_PER_ROUND:
            r = rnd.random()
            if r < 0.12:
                self.ops.append(["flush", 0, 0, 0, None])
                continue
            kind = "write" if r < 0.70 else "zero" if r < 0.85 else "trim"
            n = workload.rand_len(rnd, 64 * KiB if kind == "write" else 256 * KiB)
            if chain.written and rnd.random() < 0.3:
                # over data of an earlier round: overwrite, COW of partial
                # clusters, zeroing/trimming allocated clusters
                o, ln = rnd.choice(chain.written)
                off = max(0, min(chain.size - n, o + rnd.randrange(-ln, ln + 1)))
            else:
                off = workload.rand_off(rnd, 0, chain.size, n)
            for _ in range(8):
                if free(off, n):
                    break
                off = workload.rand_off(rnd, 0, chain.size, n)
            else:
                continue
            bisect.insort(taken, (off, off + n))
            flags = 0
            data = None
            if kind == "write":
                data = rnd.randbytes(n)
                if rnd.random() < 0.2:
                    flags = nbd.CMD_FLAG_FUA
            elif kind == "zero":
                if rnd.random() < 0.5:
                    flags |= nbd.CMD_FLAG_NO_HOLE
                if rnd.random() < 0.15:
                    flags |= nbd.CMD_FLAG_FUA
            self.ops.append([kind, off, n, flags, data])
        self.state = ["new"] * len(self.ops)   # new, sent, acked, durable
        self.old = [None] * len(self.ops)
        self.error = None

    def read_old(self, uri):
        h = nbd.NBD()
        h.connect_uri(uri)
        for i, (kind, off, n, _, _) in enumerate(self.ops):
            if kind != "flush":
                self.old[i] = h.pread(n, off)
        h.shutdown()

    def run(self, uri, stop, kill_after, kill):
        """Runs the ops until the server dies; records their states.  After
        kill_after completions, kill() is called (it kills the server a
        moment later, and sets stop)."""
        done = 0
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            inflight = {}
            flushes = {}         # cookie -> ops acked when the flush was sent
            i = 0
            while (i < len(self.ops) or inflight) and not stop.is_set():
                while i < len(self.ops) and len(inflight) < DEPTH:
                    kind, off, n, flags, data = self.ops[i]
                    if kind == "write":
                        c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off,
                                         flags=flags)
                    elif kind == "zero":
                        c = h.aio_zero(n, off, flags=flags)
                    elif kind == "trim":
                        c = h.aio_trim(n, off)
                    else:
                        c = h.aio_flush()
                        flushes[c] = [k for k, s in enumerate(self.state) if s == "acked"]
                    self.state[i] = "sent"
                    inflight[c] = i
                    i += 1
                h.poll(100)
                while inflight:
                    c = h.aio_peek_command_completed()
                    if c <= 0:
                        break
                    k = inflight.pop(c)
                    h.aio_command_completed(c)      # raises on a server error
                    kind, _, _, flags, _ = self.ops[k]
                    fua = flags & nbd.CMD_FLAG_FUA
                    self.state[k] = "durable" if fua or kind == "flush" else "acked"
                    for j in flushes.pop(c, ()):
                        self.state[j] = "durable"
                    done += 1
                    if done == kill_after:
                        kill()
            if not stop.is_set():
                h.flush()
                self.state = ["durable"] * len(self.ops)
        except nbd.Error as e:
            if not stop.is_set():
                self.error = f"{type(e).__name__}: {e}"

    def verify(self, uri, label):
        """Reads every range back through uri; returns counts per state."""
        h = nbd.NBD()
        h.connect_uri(uri)
        counts = {}
        for i, (kind, off, n, _, data) in enumerate(self.ops):
            if kind == "flush":
                continue
            st = self.state[i]
            counts[st] = counts.get(st, 0) + 1
            got = h.pread(n, off)
            old = self.old[i]
            new = data if kind == "write" else bytes(n)
            if st == "new":
                allowed = [old]
            elif kind == "trim" or st != "durable":
                allowed = [old, new]
            else:
                allowed = [new]
            if got in allowed:
                continue
            if len(allowed) == 2:
                bad = next((k for k in range(n) if got[k] != old[k] and got[k] != new[k]),
                           None)
                if bad is None:
                    continue        # torn: each byte old or new
            else:
                bad = harness.first_diff(got, allowed[0])
            fail(f"{label}: op #{i} {kind} off={off} len={n} flags={self.ops[i][3]} "
                 f"state={st}: byte {off + bad} is {got[bad]:#04x}; old {old[bad]:#04x}, "
                 f"new {new[bad]:#04x}" + (" (must be new)" if st == "durable" and
                                           kind != "trim" else ""))
        h.shutdown()
        return counts


def qemu_reader(chain):
    return workload.QemuNbd(chain.top, "top", 1, fmt="qcow2", extra=("-r",))


def one_round(n, chain, rnd):
    label = f"round {n} ({chain.name})"
    rd = Round(chain, rnd)
    q = qemu_reader(chain)
    rd.read_old(q.uri())
    q.stop()

    spec = f"name=top,file={chain.top},format=qcow2"
    if n % 4 >= 2:
        # tiny metadata caches: tables are evicted (written back) all the
        # time, so the write order of evictions matters too
        spec += f",l2-cache-size={2 * chain.cluster},refcount-cache-size={2 * chain.cluster}"
    srv = harness.Daemon([spec])
    # the kill: after a random number of completions, plus a random delay
    # of up to 5 ms while the workload goes on
    kill_after = rnd.randrange(1, OPS_PER_ROUND)
    delay = rnd.uniform(0, 0.005)
    stop = threading.Event()
    timers = []

    def do_kill():
        srv.proc.send_signal(signal.SIGKILL)
        stop.set()

    def kill():
        t = threading.Timer(delay, do_kill)
        timers.append(t)
        t.start()
    rd.run(srv.uri("top"), stop, kill_after, kill)
    if not timers:
        kill()
    timers[0].join()
    srv.proc.wait()
    check(rd.error is None, f"{label}: the workload failed before the kill: {rd.error}\n"
          + srv.logtext()[-3000:])
    check(srv.proc.returncode == -signal.SIGKILL,
          f"{label}: stratad exit status {srv.proc.returncode}, expected SIGKILL\n"
          + srv.logtext()[-3000:])

    code, out = qcow2lib.qemu_img_check(chain.top)
    check(code in (0, 3), f"{label}: qemu-img check after the crash: exit {code} "
          f"(0 or 3 = leaks only expected)\n{out[-3000:]}")
    chain.leaks = 0                  # qemu-img reports all leaks so far
    for line in out.splitlines():
        if "leaked clusters were found" in line:
            chain.leaks = int(line.split()[0])

    q = qemu_reader(chain)
    counts = rd.verify(q.uri(), label)
    q.stop()
    for kind, off, ln, _, _ in rd.ops:
        if kind == "write":
            chain.written.append((off, ln))
    l2, rtc, _ = chain.header()
    ok(f"{label}{' tiny caches' if n % 4 >= 2 else ''}: killed {delay * 1000:.1f} ms after {kill_after} completions; check exit {code}; ranges verified: "
       + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
       + f"; {l2} L2 tables, refcount table {rtc} cluster(s)")
    return counts


def main():
    print(f"seed: {SEED} (STRATA_SEED={SEED} to replay), rounds: {ROUNDS}", flush=True)
    rnd = random.Random(SEED)
    d = harness.tmpdir()
    chains = [Chain(d, "l2", GiB, 4096, "cluster_size=4k", rnd),
              Chain(d, "reftable", 256 * MiB, 512, "cluster_size=512,refcount_bits=64", rnd)]
    start = {c.name: c.header() for c in chains}
    deadline = time.time() + BUDGET
    totals = {}
    n = 0
    # 6 rounds always, however slow the machine; more while the budget lasts
    while n < ROUNDS and (time.time() < deadline or n < 6):
        counts = one_round(n, chains[n % 2], rnd)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
        n += 1
    check(n >= 6, f"only {n} rounds (STRATA_ROUNDS={ROUNDS} is below 6)")
    check(totals.get("durable", 0) > 0 and totals.get("sent", 0) + totals.get("acked", 0) > 0,
          f"the kills never fell inside the workload: {totals}")

    # a fresh stratad reads both chains as QEMU does
    srv = harness.Daemon([f"name={c.name},file={c.top},format=qcow2,readonly=on"
                          for c in chains])
    for c in chains:
        q = qemu_reader(c)
        hq, hs = nbd.NBD(), nbd.NBD()
        hq.connect_uri(q.uri())
        hs.connect_uri(srv.uri(c.name))
        for off in range(0, c.size, 16 * MiB):
            want = hq.pread(16 * MiB, off)
            got = hs.pread(16 * MiB, off)
            if got != want:
                fail(f"{c.name}: a fresh stratad reads the chain differently from QEMU "
                     f"at byte {off + harness.first_diff(got, want)}")
        hq.shutdown()
        hs.shutdown()
        q.stop()
    check(srv.stop() == 0, "the fresh stratad did not exit cleanly")
    ok("a fresh stratad reads both crashed chains exactly as QEMU does")

    l2_0, _, _ = start["l2"]
    l2_1, _, _ = chains[0].header()
    _, rtc0, rto0 = start["reftable"]
    _, rtc1, rto1 = chains[1].header()
    check(l2_1 > l2_0 + 10, f"chain l2: only {l2_1 - l2_0} L2 tables allocated")
    check(rtc1 > rtc0, f"chain reftable: the refcount table never grew ({rtc0} cluster(s))")
    ok(f"{n} rounds: {totals}; {l2_1 - l2_0} L2 tables allocated in chain l2; refcount "
       f"table of chain reftable grew {rtc0} -> {rtc1} clusters (moved {rto0:#x} -> "
       f"{rto1:#x}); leaked clusters reported: "
       + ", ".join(f"{c.name} {c.leaks}" for c in chains))
    print("PASS")


if __name__ == "__main__":
    main()
