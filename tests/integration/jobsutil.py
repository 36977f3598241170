"""Shared pieces of the chain-job tests (test-jobs-*.py): a libnbd workload
with a model of the disk, and qemu-img views of a chain."""
import json
import os
import random
import subprocess
import threading
import time

import harness
from harness import check

harness.nbd_handle()
import nbd  # noqa: E402

MiB = 1 << 20
BLK = 4096


def qimg(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def chain_files(top):
    """The layers of a chain, top first (qemu-img info --backing-chain), by
    the names their overlays resolve to: absolute paths, or rbd: specs
    (QEMU's own "filename" of an RBD node is a json: description)."""
    p = qimg("info", "-U", "--output=json", "--backing-chain", top)
    check(p.returncode == 0, f"qemu-img info {top}: {p.stderr}")
    layers = json.loads(p.stdout)
    names = [top] + [x.get("full-backing-filename") for x in layers[:-1]]
    check(None not in names, f"qemu-img info {top}: a layer without a backing name: {layers}")
    return names


def check_images(files, leaks_ok=False):
    """qemu-img check on every image (qcow2 only); exit 3 = leaks only."""
    for f in files:
        p = qimg("info", "-U", "--output=json", f)
        if json.loads(p.stdout)["format"] != "qcow2":
            continue
        p = qimg("check", f)
        good = p.returncode == 0 or (leaks_ok and p.returncode == 3)
        check(good, f"qemu-img check {f}: rc {p.returncode}\n{p.stdout}{p.stderr}")


def read_chain(top, size, out):
    """The guest view of a chain as QEMU reads it offline."""
    p = qimg("convert", "-U", "-O", "raw", top, out)
    check(p.returncode == 0, f"qemu-img convert {top}: {p.stderr}")
    with open(out, "rb") as f:
        data = f.read()
    check(len(data) == size, f"{top}: {len(data)} bytes, want {size}")
    return data


def make_base(path, size, seed):
    """A qcow2 base image with random data in about half of its MiB blocks;
    returns the content (bytearray)."""
    rng = random.Random(seed)
    model = bytearray(size)
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for blk in range(size // MiB):
            if rng.random() < 0.5:
                data = rng.randbytes(MiB)
                f.seek(blk * MiB)
                f.write(data)
                model[blk * MiB:(blk + 1) * MiB] = data
    p = qimg("convert", "-f", "raw", "-O", "qcow2", raw, path)
    check(p.returncode == 0, p.stderr)
    os.unlink(raw)
    return model


class Workload:
    """`conns` libnbd connections, each owning a slice of the disk and
    keeping `depth` requests in flight: writes of random data and
    write-zeroes (the model follows them), reads compared with the model
    (unless an overlapping write is in flight)."""

    def __init__(self, uri, model, conns=4, depth=16, seed=1, maxblk=64):
        self.uri = uri
        self.model = model
        self.size = len(model)
        self.conns = conns
        self.depth = depth
        self.seed = seed
        self.maxblk = maxblk
        self.stop_ev = threading.Event()
        self.errors = []
        self.counts = [0] * conns
        self.written = [0] * conns
        self.threads = []

    def start(self):
        for k in range(self.conns):
            t = threading.Thread(target=self._run, args=(k,), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(120)
            check(not t.is_alive(), "a workload connection hung")
        check(not self.errors, f"workload errors: {self.errors[:5]}")

    def _run(self, k):
        rng = random.Random(self.seed * 100 + k)
        span = self.size // self.conns
        base = k * span
        nblk = span // BLK
        h = nbd.NBD()
        inflight = []
        try:
            h.connect_uri(self.uri)
            while not self.stop_ev.is_set() or inflight:
                while len(inflight) < self.depth and not self.stop_ev.is_set():
                    off = base + rng.randrange(nblk) * BLK
                    n = min(rng.choice((1, 1, 2, 4, 16, self.maxblk)) * BLK, base + span - off)
                    overl = [it for it in inflight if it[2] < off + n and off < it[2] + it[3]]
                    r = rng.random()
                    if r < 0.6 and any(it[1] is None for it in overl):
                        # NBD does not order overlapping writes in flight:
                        # never have two, so the model stays exact
                        continue
                    if r < 0.55:
                        data = rng.randbytes(n)
                        self.model[off:off + n] = data
                        buf = nbd.Buffer.from_bytearray(bytearray(data))
                        cookie = h.aio_pwrite(buf, off)
                        for it in overl:
                            it[1] = None
                        inflight.append([cookie, None, off, n, buf])
                        self.written[k] += n
                    elif r < 0.6:
                        self.model[off:off + n] = bytes(n)
                        cookie = h.aio_zero(n, off)
                        for it in overl:
                            it[1] = None
                        inflight.append([cookie, None, off, n, None])
                    else:
                        buf = nbd.Buffer(n)
                        expect = bytes(self.model[off:off + n])
                        if any(it[1] is None for it in overl):
                            expect = None
                        cookie = h.aio_pread(buf, off)
                        inflight.append([cookie, expect, off, n, buf])
                h.poll(-1)
                still = []
                for item in inflight:
                    cookie, expect, off, n, buf = item
                    if h.aio_command_completed(cookie):
                        self.counts[k] += 1
                        if expect is not None and buf.to_bytearray() != bytearray(expect):
                            got = buf.to_bytearray()
                            i = next(i for i in range(n) if got[i] != expect[i])
                            self.errors.append(f"conn {k}: read at {off}+{n} differs from the "
                                               f"model at +{i} ({time.time() - harness.T0:.1f}s)")
                    else:
                        still.append(item)
                inflight = still
            h.flush()
            h.shutdown()
        except Exception as ex:  # noqa: BLE001
            self.errors.append(f"conn {k}: {ex!r}")


def nbd_read_all(uri, size):
    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray()
    for off in range(0, size, 4 * MiB):
        out += h.pread(min(4 * MiB, size - off), off)
    h.shutdown()
    return bytes(out)
