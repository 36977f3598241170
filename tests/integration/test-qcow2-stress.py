#!/usr/bin/python3
"""Concurrency stress test of qcow2 allocation and copy-on-write.

Many concurrent writes with disjoint byte ranges that share clusters, at
high queue depth: every cluster picked by a round is cut into random
pieces (1 byte to a few KiB, unaligned), a random subset of the pieces is
written (data or write-zeroes), all of them submitted at once from 4
connections with up to 64 requests in flight each, in random order.  The
pieces never overlap, so the result is deterministic whatever the order:
written pieces hold their data and every byte of the cluster not written
keeps what the backing file had.  That is exactly what goes wrong when two
allocating writes to one cluster race (the second allocation loses the
first's data) or when the copy-on-write of the untouched part of a new
cluster overwrites a concurrent write with stale backing data.

Rounds on the same image mix new clusters with ones allocated earlier
(in-place writes racing with allocations).  Images: 64 KiB clusters, 64 KiB
clusters with extended L2 (subclusters), and 4 KiB clusters with 64-bit
refcounts (the refcount table grows while writes race).  After each image:
a full read through NBD equals the model; after stopping stratad,
`qemu-img check` is clean and `qemu-img convert` gives the model.

Seed: STRATA_SEED (default 20240601).
"""
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, fail, first_diff, need, ok  # noqa: E402

need("qemu-img")
harness.nbd_handle()
import nbd  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
SEED = int(os.environ.get("STRATA_SEED", "20240601"))
CONNS = 4
DEPTH = 64
DEADLINE = time.time() + 280      # bounds a hang only; meson's timeout is 300


def run(*args):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=120)
    return p.returncode, p.stdout


def pieces_of(rnd, start, length):
    """Cuts [start, start+length) into random disjoint pieces."""
    cuts = sorted(rnd.sample(range(1, length), rnd.randint(3, 24)))
    bounds = [0] + cuts + [length]
    return [(start + a, b - a) for a, b in zip(bounds, bounds[1:])]


class Conn(threading.Thread):
    def __init__(self, uri, ops):
        super().__init__()
        self.uri = uri
        self.ops = ops
        self.error = None

    def run(self):
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            inflight = {}
            i = 0
            while i < len(self.ops) or inflight:
                if time.time() > DEADLINE:
                    raise RuntimeError("did not finish in time")
                while i < len(self.ops) and len(inflight) < DEPTH:
                    kind, off, data = self.ops[i]
                    if kind == "write":
                        buf = nbd.Buffer.from_bytearray(bytearray(data))
                        c = h.aio_pwrite(buf, off)
                    else:
                        buf = None
                        c = h.aio_zero(len(data), off)
                    inflight[c] = (self.ops[i], buf)
                    i += 1
                h.poll(1000)
                while inflight:
                    c = h.aio_peek_command_completed()
                    if c <= 0:
                        break
                    (kind, off, data), _ = inflight.pop(c)
                    try:
                        h.aio_command_completed(c)
                    except nbd.Error as e:
                        raise RuntimeError(f"{kind} off={off} len={len(data)}: {e}")
            h.shutdown()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            self.error = str(e)


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray()
    for off in range(0, SIZE, 4 * MiB):
        out += h.pread(4 * MiB, off)
    h.shutdown()
    return out


def one_image(root, label, create_opts, cluster):
    rnd = random.Random(f"{SEED}-{label}")
    d = os.path.join(root, label)
    os.makedirs(d)
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.write(rnd.randbytes(SIZE))
    top = os.path.join(d, "top.qcow2")
    rc, out = run("qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts,
                  "-b", "base.raw", "-F", "raw", top, str(SIZE))
    check(rc == 0, f"qemu-img create: {out}")
    with open(base, "rb") as f:
        model = bytearray(f.read())

    s = harness.Daemon([f"name=t,file={top},format=qcow2"], extra=["--max-inflight", "128"])
    uri = s.uri("t")
    nclusters = SIZE // cluster
    used = set()
    total_ops = 0
    for rnd_no in range(4):
        # fresh clusters, plus some already written (in place vs allocate)
        fresh = rnd.sample(sorted(set(range(nclusters)) - used), min(48, nclusters - len(used)))
        again = rnd.sample(sorted(used), min(16, len(used)))
        ops = []
        for c in fresh + again:
            used.add(c)
            for off, n in pieces_of(rnd, c * cluster, cluster):
                if rnd.random() < 0.35:
                    continue          # not written: must keep the old bytes
                if rnd.random() < 0.15:
                    data = bytes(n)
                    ops.append(("zero", off, data))
                else:
                    data = rnd.randbytes(n)
                    ops.append(("write", off, data))
                model[off:off + n] = data
        rnd.shuffle(ops)
        conns = [Conn(uri, ops[k::CONNS]) for k in range(CONNS)]
        for t in conns:
            t.start()
        for t in conns:
            t.join(max(1, DEADLINE - time.time()))
            if t.is_alive():
                fail(f"{label}: round {rnd_no}: a connection did not finish in time")
            if t.error:
                fail(f"{label}: round {rnd_no}: {t.error}\n" + s.logtext()[-2000:])
        total_ops += len(ops)
        got = read_all(uri)
        if got != model:
            k = first_diff(got, model)
            c = k // cluster
            fail(f"{label}: round {rnd_no}: byte {k} (cluster {c}, offset {k % cluster} in it) "
                 f"is {got[k:k + 8].hex()}, expected {model[k:k + 8].hex()}")
    rs = s.stop()
    check(rs == 0, f"{label}: stratad exit status {rs}")
    rc, out = run("qemu-img", "check", top)
    check(rc == 0, f"{label}: qemu-img check: exit {rc}\n{out}")
    raw = os.path.join(d, "out.raw")
    rc, out = run("qemu-img", "convert", "-O", "raw", top, raw)
    check(rc == 0, f"qemu-img convert: {out}")
    with open(raw, "rb") as f:
        check(f.read() == model, f"{label}: qemu-img reads something else than the model")
    ok(f"{label}: {total_ops} concurrent disjoint writes into shared clusters "
       f"({CONNS} connections x {DEPTH} in flight) match the model; qemu-img check clean")


def main():
    print(f"seed: {SEED} (STRATA_SEED={SEED} to replay)", flush=True)
    root = harness.tmpdir()
    one_image(root, "64k", "cluster_size=65536", 65536)
    one_image(root, "64k-extl2", "cluster_size=65536,extended_l2=on", 65536)
    one_image(root, "4k-refcount64", "cluster_size=4096,refcount_bits=64", 4096)
    print("PASS")


if __name__ == "__main__":
    main()
