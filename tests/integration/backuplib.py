"""Shared pieces of the pull-mode backup tests (test-backup-*.py): the QMP
sequence libvirt runs on QEMU 7.2 to start and end a backup, reading a
full or incremental backup over NBD and applying it, and a sequential
writer that records when each write was issued and acknowledged."""
import json
import os
import subprocess
import threading
import time

import harness
from harness import check

harness.nbd_handle()
import nbd  # noqa: E402

MiB = 1 << 20


def make_scratch(path, size):
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)],
                       capture_output=True, text=True, errors="replace", timeout=60)
    check(p.returncode == 0, f"qemu-img create {path}: {p.stderr}")


def backup_start(qmp, node, k, scratch, size, prev_bitmap=None, persistent=False):
    """Backup k of node: a scratch qcow2 target, then one transaction that
    adds bitmap b{k} (recording what changes after this instant), disables
    prev_bitmap (what changed since the previous backup) and inserts the
    copy-before-write filter; then the snapshot-access view, exported
    read-only as "bk{k}" with prev_bitmap.  Returns the export name and
    the monotonic times just before the transaction and just after it
    returned (the backup's instant is between them)."""
    make_scratch(scratch, size)
    qmp.cmd("blockdev-add", driver="qcow2", node_name=f"tmp{k}",
            file={"driver": "file", "filename": scratch})
    actions = [{"type": "block-dirty-bitmap-add",
                "data": {"node": node, "name": f"b{k}", "persistent": persistent}}]
    if prev_bitmap:
        actions.append({"type": "block-dirty-bitmap-disable",
                        "data": {"node": node, "name": prev_bitmap}})
    actions.append({"type": "blockdev-backup",
                    "data": {"job-id": f"job{k}", "device": node, "target": f"tmp{k}",
                             "sync": "none", "filter-node-name": f"cbw{k}"}})
    t0 = time.monotonic()
    qmp.cmd("transaction", actions=actions)
    t1 = time.monotonic()
    qmp.cmd("blockdev-add", driver="snapshot-access", node_name=f"acc{k}",
            file=f"cbw{k}")
    exp = {"type": "nbd", "id": f"bk{k}", "node-name": f"acc{k}", "name": f"bk{k}"}
    if prev_bitmap:
        exp["bitmaps"] = [{"node": node, "name": prev_bitmap}]
    qmp.cmd("block-export-add", **{x.replace("-", "_"): v for x, v in exp.items()})
    return f"bk{k}", t0, t1


def backup_end(qmp, node, k, prev_bitmap=None, wait_job=True):
    """Ends backup k: export, view, job, target; drops prev_bitmap (its
    changes are in the backup just taken)."""
    qmp.cmd("block-export-del", id=f"bk{k}")
    # the export goes once its last client is gone
    deadline = time.time() + 10
    while any(e["id"] == f"bk{k}" for e in qmp.cmd("query-block-exports")):
        check(time.time() < deadline, f"export bk{k} did not go away")
        time.sleep(0.02)
    while True:
        try:
            qmp.cmd("blockdev-del", node_name=f"acc{k}")
            break
        except harness.QMPError as e:
            check(time.time() < deadline, f"blockdev-del acc{k}: {e}")
            time.sleep(0.05)
    qmp.cmd("block-job-cancel", device=f"job{k}")
    while wait_job and any(j["device"] == f"job{k}" for j in qmp.cmd("query-block-jobs")):
        check(time.time() < deadline, f"job{k} did not end")
        time.sleep(0.02)
    qmp.cmd("blockdev-del", node_name=f"tmp{k}")
    if prev_bitmap:
        qmp.cmd("block-dirty-bitmap-remove", node=node, name=prev_bitmap)


def read_all(uri, size, chunk=MiB, between=None):
    """The whole export, in chunk-sized reads; between(i) runs after
    chunk i (a writer may go on meanwhile)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray()
    for i, off in enumerate(range(0, size, chunk)):
        out += h.pread(min(chunk, size - off), off)
        if between:
            between(i)
    h.shutdown()
    return out


def dirty_extents(uri, bitmap):
    """[(off, len)] of the dirty extents nbdinfo reads from bitmap."""
    p = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri],
                       capture_output=True, text=True, errors="replace", timeout=60)
    check(p.returncode == 0, f"nbdinfo --map {uri}: {p.stderr}")
    return [(e["offset"], e["length"]) for e in json.loads(p.stdout) if e["type"] & 1]


def nbdinfo_map(uri, bitmap):
    p = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", uri],
                       capture_output=True, text=True, errors="replace", timeout=60)
    check(p.returncode == 0, f"nbdinfo --map {uri}: {p.stderr}")
    return p.stdout


def apply_incremental(uri, bitmap, image, between=None):
    """Reads the dirty extents of the export into image (a bytearray)."""
    ext = dirty_extents(uri, bitmap)
    h = nbd.NBD()
    h.connect_uri(uri)
    for i, (off, n) in enumerate(ext):
        for o in range(off, off + n, MiB):
            m = min(MiB, off + n - o)
            image[o:o + m] = h.pread(m, o)
        if between:
            between(i)
    h.shutdown()
    return ext


class Writer(threading.Thread):
    """One libnbd connection writing random data (4 KiB to 128 KiB,
    4 KiB-aligned; a write-zeroes now and then), one request at a time,
    until stopped.  Each request is logged as (t_issue, t_ack, off, data)
    with data None for zeroes; with flush_each, a write counts as
    acknowledged only once the flush after it returned."""

    def __init__(self, uri, size, rng, flush_each=False):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size, self.rng, self.flush_each = size, rng, flush_each
        self.log = []
        self.stop_ev = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stop_ev.is_set():
                n = self.rng.choice((4096, 4096, 16384, 65536, 131072))
                off = self.rng.randrange((self.size - n) // 4096 + 1) * 4096
                zero = self.rng.random() < 0.1
                data = None if zero else self.rng.randbytes(n)
                t0 = time.monotonic()
                if zero:
                    self.h.zero(n, off)
                else:
                    self.h.pwrite(data, off)
                if self.flush_each:
                    self.h.flush()
                self.log.append((t0, time.monotonic(), off, n, data))
                time.sleep(0.0005)
        except nbd.Error as e:
            self.error = e

    def stop(self):
        self.stop_ev.set()
        self.join(30)
        check(not self.is_alive(), "the writer did not stop")


def apply_write(image, w):
    _, _, off, n, data = w
    image[off:off + n] = data if data is not None else bytes(n)


def prefix_states(base, log, t0, t1):
    """The disk at an instant between t0 and t1 of a sequential writer:
    every write acknowledged before t0 is in, none issued after t1;
    those in between are in as a prefix.  Yields (count, image) for each
    candidate; base is the disk before log[0]."""
    img = bytearray(base)
    i = 0
    while i < len(log) and log[i][1] < t0:
        apply_write(img, log[i])
        i += 1
    yield i, bytes(img)
    while i < len(log) and log[i][0] <= t1:
        apply_write(img, log[i])
        i += 1
        yield i, bytes(img)


def match_instant(restored, base, log, t0, t1):
    """The number of writes of log the restored image holds (a prefix
    consistent with [t0, t1]), or None when it is no such state."""
    for count, img in prefix_states(base, log, t0, t1):
        if img == restored:
            return count
    return None


def first_diff(a, b):
    return harness.first_diff(a, b)


def cleanup_files(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
