#!/usr/bin/python3
"""Differential test of the qcow2 driver on a 3-layer backing chain.

The chain: base.raw (56 MiB, random data with holes) <- mid.qcow2 (60 MiB,
partly rewritten, a zeroed and a discarded range, written by qemu-io) <-
top.qcow2 (64 MiB, empty).  So the backing files are shorter than their
overlays, and reads past their ends must be zeros.  Three copies of the
directory: A served by qemu-nbd (-f qcow2, --discard=unmap), B by stratad
(format=qcow2, cache=writeback), C by the same stratad with cache=none and
4 KiB clusters in its top (its ops widened to 4 KiB blocks, checked
against its own model).

The same seeded sequence of writes (some FUA), write zeroes (with and
without NO_HOLE), trims, flushes and reads runs against each, with up to
DEPTH requests in flight (workload.py: every read checked against the
model, reads of both servers compared with each other).  Phase 1: one
connection.  Phase 2: the servers restarted on the same chains, 4
connections at once on disjoint quarters.  After each phase, with the
servers stopped:
  - qemu-img compare: stratad's top and qemu-nbd's top are identical as
    guest disks, and equal to the model (qemu-img convert to raw);
  - qemu-img check: every image stratad wrote is clean (no errors, no
    leaks after a clean shutdown);
  - the backing files (base, mid) are unchanged byte for byte.

Seed: STRATA_SEED (default 20240601), ops: STRATA_OPS (default 2000).
"""
import hashlib
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need  # noqa: E402

need("qemu-nbd", "qemu-img", "qemu-io")
import workload  # noqa: E402
from workload import (QemuNbd, compare_files, make_initial, ok,  # noqa: E402
                      phase_many_connections, phase_one_connection)

MiB = 1 << 20
SIZE = 64 * MiB
DEPTH = 16
SEED = int(os.environ.get("STRATA_SEED", "20240601"))
SEQ_OPS = int(os.environ.get("STRATA_OPS", "2000"))
CONNS = 4
workload.configure(SIZE, DEPTH, 370)   # bounds a hang only; meson's timeout is 400


def run(*args, **kw):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=kw.pop("timeout", 120), **kw)
    return p.returncode, p.stdout


def must(*args):
    rc, out = run(*args)
    check(rc == 0, f"{' '.join(args)}: exit {rc}: {out.strip()}")
    return out


def make_chain(d, top_cluster):
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, "base.raw")
    make_initial(base, SEED)
    os.truncate(base, 56 * MiB)
    mid = os.path.join(d, "mid.qcow2")
    must("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         mid, str(60 * MiB))
    must("qemu-io", "-f", "qcow2",
         "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xa5 7000 9000",
         "-c", "write -z 8M 2M", "-c", "discard 12M 1M",
         "-c", "write -P 0x33 55M 4M", "-c", "write -P 0x77 30M 64k", mid)
    top = os.path.join(d, "top.qcow2")
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={top_cluster}",
         "-b", "mid.qcow2", "-F", "qcow2", top, str(SIZE))
    return top


def guest_bytes(top, tmp):
    raw = os.path.join(tmp, "guest.raw")
    must("qemu-img", "convert", "-O", "raw", top, raw)
    return raw


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_images(what, top, backing_digests):
    d = os.path.dirname(top)
    rc, out = run("qemu-img", "check", top)
    check(rc == 0, f"{what}: qemu-img check {top}: exit {rc} (1 = errors, 2 = check "
          f"failed, 3 = leaks):\n{out}")
    for name, dg in backing_digests.items():
        check(digest(os.path.join(d, name)) == dg,
              f"{what}: backing file {name} was modified")
    ok(f"{what}: qemu-img check clean on {os.path.basename(d)}/top.qcow2; "
       f"backing files unchanged")


def start(ta, tb, tc):
    q = QemuNbd(ta, "diff", shared=CONNS + 1, fmt="qcow2")
    s = harness.Daemon([f"name=diff,file={tb},format=qcow2,cache=writeback",
                        f"name=direct,file={tc},format=qcow2,cache=none"])
    return q, s


def stop(q, s, what):
    rq = q.stop()
    rs = s.stop()
    check(rs == 0, f"{what}: stratad exit status after SIGTERM: {rs}\n" + s.logtext()[-2000:])
    if rq != 0:
        print(f"note: qemu-nbd exited with {rq}")


def verify(what, ta, tb, tc, ma, mc, backing):
    tmp = harness.tmpdir()
    # Each side against the model first, so that a difference says who
    # is wrong; then the two chains against each other.
    compare_files([(guest_bytes(tb, tmp), "stratad")], ma, what)
    os.unlink(os.path.join(tmp, "guest.raw"))
    compare_files([(guest_bytes(ta, tmp), "qemu-nbd")], ma, what + " (reference)")
    os.unlink(os.path.join(tmp, "guest.raw"))
    rc, out = run("qemu-img", "compare", ta, tb)
    check(rc == 0, f"{what}: qemu-img compare qemu-nbd's and stratad's chains: {out.strip()}")
    ok(f"{what}: qemu-img compare: qemu-nbd's and stratad's chains are identical")
    compare_files([(guest_bytes(tc, tmp), "stratad cache=none")], mc, what + " (cache=none)")
    check_images(what, tb, backing)
    check_images(what + " (cache=none)", tc, backing)


def main():
    print(f"seed: {SEED} (STRATA_SEED={SEED} to replay), ops: {SEQ_OPS}, depth: {DEPTH}",
          flush=True)
    root = harness.tmpdir()
    ta = make_chain(os.path.join(root, "a"), 65536)
    tb = make_chain(os.path.join(root, "b"), 65536)
    tc = make_chain(os.path.join(root, "c"), 4096)
    backing = {n: digest(os.path.join(root, "b", n)) for n in ("base.raw", "mid.qcow2")}
    tmp = harness.tmpdir()
    with open(guest_bytes(ta, tmp), "rb") as f:
        initial = bytearray(f.read())
    check(len(initial) == SIZE, "initial guest disk has the wrong size")
    check(initial[61 * MiB:62 * MiB] == bytes(MiB), "past the end of mid: not zeros (test bug)")

    # ---- phase 1: one connection ------------------------------------------
    q, s = start(ta, tb, tc)
    uris = (q.uri(), s.uri("diff"), s.uri("direct"))
    ra, rb, rc = phase_one_connection(SEED, SEQ_OPS, uris, initial)
    stop(q, s, "phase 1")
    verify("phase 1", ta, tb, tc, ra.model, rc.model, backing)

    # ---- phase 2: 4 connections on disjoint regions -----------------------
    q, s = start(ta, tb, tc)
    uris = (q.uri(), s.uri("diff"), s.uri("direct"))
    phase_many_connections(SEED, SEQ_OPS, CONNS, uris, (ra, rb, rc))
    stop(q, s, "phase 2")
    verify("phase 2", ta, tb, tc, ra.model, rc.model, backing)
    print("PASS")


if __name__ == "__main__":
    main()
